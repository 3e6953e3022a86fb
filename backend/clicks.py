"""The annotator's smart clicks and boxes, answered with one label's refined mask per target.

Label Studio sends them as a /predict of one task whose ``params.context`` holds the smart regions
(:mod:`backend.smart_tools` reads them). The label's mask comes from :func:`model.refinement.refine`,
over the image's kept forward pass (:class:`backend.smart_tools.ImageStates`): the one the task's own
/predict kept when the annotator opened it, or one made now.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from backend.control_tags import ControlTag
from backend.images import ImageError
from backend.payloads import task_name
from backend.pipeline import PredictPipeline, TaskPrediction, pass_key
from backend.runtime import Serving
from backend.settings import Settings
from backend.smart_tools import ContextError, ImageStates, SmartRegion, as_prompt, label_groups
from model.config import RegionRules
from model.predictor import SemanticPrediction
from model.refinement import ImageState, PromptError, refine
from model.vocabulary import UNLABELED

log = logging.getLogger(__name__)


@dataclass
class ClickHandler:
    settings: Settings
    pipeline: PredictPipeline
    passes: ImageStates

    def answer(self, project: str, tasks: list[dict], targets: tuple[ControlTag, ...], serving: Serving,
               smart: tuple[SmartRegion, ...]) -> list[TaskPrediction]:
        """Each task's answer to the smart regions; a task whose regions or image can't be used fails alone.
        No regions (an empty context) get no suggestion, not the pre-label: accepting it would duplicate it."""
        if not smart:
            return [TaskPrediction([], 0.0) for _ in tasks]
        answers = []
        for task in tasks:
            try:
                answers.append(self._refine_task(project, task, targets, serving, smart))
            except (ContextError, PromptError, ImageError) as error:
                answers.append(TaskPrediction(error=str(error)))
        return answers

    def _refine_task(self, project: str, task: dict, targets: tuple[ControlTag, ...], serving: Serving,
                     smart: tuple[SmartRegion, ...]) -> TaskPrediction:
        results, scores = [], []
        for group, label, regions in label_groups(smart, targets):
            started = time.perf_counter()
            key, state = self._image_state(project, task, group[0], serving)
            prompt = as_prompt(label, regions, state.height, state.width)
            by_rules: dict[RegionRules, SemanticPrediction] = {}
            for target in group:
                rules = target.rules(serving.region_rules(self.settings, target.vocabulary.labels))
                if rules not in by_rules:
                    mask, probability = refine(state, prompt, rules)
                    by_rules[rules] = SemanticPrediction(np.where(mask, label, UNLABELED).astype(np.int16), probability)
                results += target.build(by_rules[rules])
            scores += [p.region_scores.get(label, 0.0) for p in by_rules.values()]
            self.passes.put(key, state)  # measured again: the click may have grown it
            log.info("project %s %s: %r from %d prompts in %.0f ms", project, task_name(task),
                     group[0].vocabulary.labels[label], len(regions), (time.perf_counter() - started) * 1000)
        return TaskPrediction(results, round(float(np.mean(scores)), 4))

    def _image_state(self, project: str, task: dict, target: ControlTag, serving: Serving) -> tuple[tuple, ImageState]:
        """The task's image's kept forward pass for ``target``'s vocabulary (made on a miss), and its key.

        The image is downloaded on every click, with the project's own token: a project that may not see
        it gets Label Studio's refusal, and an image changed behind its URL gets a new pass (its digest).
        """
        content, digest = self.pipeline.download(project, task, target.data_key)
        key = pass_key(serving, project, target, digest)
        state = self.passes.get(key)
        if state is None:
            image = self.pipeline.decode(content, serving.predictor)
            (scores,) = serving.predictor.logits_and_embeddings([image], target.vocabulary)
            state = ImageState.from_image(*scores, image, serving.predictor)
            self.passes.put(key, state)
        return key, state
