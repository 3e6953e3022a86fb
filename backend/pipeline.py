"""The predict pipeline that every entry point uses: the service's /predict, ``prelabel`` and the workers.

    pipeline = PredictPipeline(settings, fetcher, credentials, passes)
    for chunk in pipeline.chunks(project, tasks, targets, serving, KeepPasses.OPENED_TASK):
        ...                                   # one TaskPrediction per task, PREDICT_BATCH_SIZE at a time

Per chunk: each task's image is fetched with its project's Label Studio token (once per data key,
however many targets read it) → one forward pass per image and vocabulary (the targets that share
both share it) → each target's predictions, pruned by its own rules → Label Studio results, and the
task score. A task whose image fails gets an error and the rest of the chunk is answered. With
:attr:`KeepPasses.OPENED_TASK` (the service asks for it where the config has a smart tool), a request of
one task (an annotator opening it) keeps its pass, the pre-label it served and its superpixels, made
beside the answer, for the clicks that may follow (:mod:`backend.clicks`).
"""
from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from backend.control_tags import ControlTag
from backend.credentials import Credentials
from backend.images import ImageError, ImageFetcher
from backend.runtime import Serving
from backend.settings import Settings
from backend.smart_tools import ImageStates
from model.acquisition import TaskView
from model.config import RegionRules
from model.predictor import Calibrated, Predictor
from model.refinement import ImageState
from model.task_scores import task_score, unsure_fraction

log = logging.getLogger(__name__)


class KeepPasses(enum.Enum):
    """Which forward passes a prediction keeps for the annotator's clicks."""

    NEVER = "never"  # batch work: prelabel, the workers
    OPENED_TASK = "opened task"  # a request of one task is an annotator opening it: keep its pass


@dataclass
class TaskPrediction:
    """One task's prediction: its Label Studio results and score, or the error that stopped it.

    Attributes:
        result: the targets' results (regions); None when the task failed.
        score: the task score (:mod:`model.task_scores`).
        unsure: the mean share of pixels under ``UNSURE_BELOW`` (None when that is not set).
        error: why the task has no result, in words.
        view: what the acquisition of the next tasks to annotate reads of it (None for a kept pass).
    """

    result: list[dict] | None = None
    score: float | None = None
    unsure: float | None = None
    error: str | None = None
    view: TaskView | None = None


@dataclass
class PredictPipeline:
    settings: Settings
    fetcher: ImageFetcher
    credentials: Credentials
    passes: ImageStates  # the kept forward passes, for clicks

    def predict(self, project: str, tasks: list[dict], targets: tuple[ControlTag, ...], serving: Serving,
                keep: KeepPasses = KeepPasses.NEVER, views: bool = False) -> list[TaskPrediction]:
        """Every task's prediction, in order."""
        return [prediction for chunk in self.chunks(project, tasks, targets, serving, keep, views) for prediction in chunk]

    def chunks(self, project: str, tasks: list[dict], targets: tuple[ControlTag, ...], serving: Serving,
               keep: KeepPasses = KeepPasses.NEVER, views: bool = False) -> Iterator[list[TaskPrediction]]:
        """The tasks' predictions, ``PREDICT_BATCH_SIZE`` tasks at a time: memory holds one chunk's images
        however many tasks come, and a caller may stop between chunks (the service's time budget)."""
        opened = keep is KeepPasses.OPENED_TASK and len(tasks) == 1
        batch = self.settings.predict_batch_size
        # A pool per call: one request's slow image servers never delay another request's images.
        with ThreadPoolExecutor(max_workers=min(self.settings.fetch_threads, len(tasks)),
                                thread_name_prefix="fetch") as pool:
            for start in range(0, len(tasks), batch):
                chunk = tasks[start:start + batch]
                images, digests, errors = self._fetch_images(pool, project, chunk, targets, serving.predictor)
                parts = [{"result": [], "scores": [], "unsure": []} for _ in chunk]
                for (data_key, _), group in _group_targets(targets).items():
                    kept = (project, digests[data_key].get(0)) if opened else None
                    self._predict_group(serving, images[data_key], group, parts, kept, views)
                yield [_prediction(parts[i], errors.get(i)) for i in range(len(chunk))]
                del images

    # ------------------------------------------------------------------ images
    def download(self, project: str, task: dict, data_key: str) -> tuple[bytes, str]:
        """The task's image file, fetched with its project's Label Studio token, and the digest that names a
        kept pass of it: its source, its project and its bytes."""
        data = task.get("data") or {}
        if not isinstance(data, dict):
            raise ImageError("the task's 'data' is not an object")
        if data_key not in data:
            raise ImageError(f"task data has no {data_key!r} field (the Image tag reads ${data_key})")
        content = self.fetcher.download(data[data_key], task.get("id"), self.credentials.for_project(project))
        source = hashlib.sha256(f"{project}\n{data[data_key]}".encode()).digest()
        return content, hashlib.sha256(source + content).hexdigest()

    def decode(self, content: bytes, predictor: Predictor) -> np.ndarray:
        """The image (H, W, 3) uint8, refused before any model work when the predictor can't take its shape."""
        image = self.fetcher.decode(content)
        try:
            predictor.inference_shape(*image.shape[:2])
        except ValueError as error:
            raise ImageError(str(error)) from None
        return image

    def _fetch_images(self, pool: ThreadPoolExecutor, project: str, tasks: list[dict],
                      targets: tuple[ControlTag, ...], predictor: Predictor
                      ) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, dict[int, str]], dict[int, str]]:
        """Each task's image per data key, its digest, and the error of each task whose image can't be used;
        keyed by the task's position in ``tasks``."""
        images: dict[str, dict[int, np.ndarray]] = {}
        digests: dict[str, dict[int, str]] = {}
        errors: dict[int, str] = {}
        for data_key in {t.data_key for t in targets}:
            futures = [pool.submit(self._load, project, task, data_key, predictor) for task in tasks]
            images[data_key], digests[data_key] = {}, {}
            for index, future in enumerate(futures):
                try:
                    images[data_key][index], digests[data_key][index] = future.result()
                except ImageError as error:
                    errors.setdefault(index, str(error))
                except Exception as error:  # never let one task break the batch
                    log.exception("unexpected error loading task %s", str(tasks[index].get("id"))[:20])
                    errors.setdefault(index, f"unexpected {error.__class__.__name__} (see the backend's log)")
        return images, digests, errors

    def _load(self, project: str, task: dict, data_key: str, predictor: Predictor) -> tuple[np.ndarray, str]:
        content, digest = self.download(project, task, data_key)
        return self.decode(content, predictor), digest

    # ------------------------------------------------------------------ the pass
    def _predict_group(self, serving: Serving, loaded: dict[int, np.ndarray], group: list[ControlTag],
                       parts: list[dict], keep: tuple[str, str | None] | None = None, views: bool = False) -> None:
        """One forward pass per image for targets sharing an image and a vocabulary; each target's results,
        pruned by its own rules (the task score reads the first target's prediction). ``keep``: (project,
        image digest) of the one task whose pass is kept for the annotator's clicks. ``views``: also each task's
        :class:`TaskView` (for ``prelabel --annotate-next``; off elsewhere, so /predict does no work it does not serve)."""
        if not loaded:
            return
        predictor, images = serving.predictor, list(loaded.values())
        state = None
        if keep:
            (scores,) = predictor.logits_and_embeddings(images, group[0].vocabulary)
            state = ImageState.from_image(*scores, images[0], predictor)
            threading.Thread(target=_make_superpixels, args=(state,), name="superpixels", daemon=True).start()
            passes = [Calibrated(state.logits, state.prior, state.presence)]
        else:
            passes = predictor.calibrated(images, group[0].vocabulary)
        by_rules: dict[RegionRules, list] = {}
        for target in group:
            rules = target.rules(serving.region_rules(self.settings, target.vocabulary.labels))
            if rules not in by_rules:
                by_rules[rules] = predictor.semantic(images, passes, rules, target.vocabulary)
            for index, prediction in zip(loaded, by_rules[rules], strict=True):
                parts[index]["result"].extend(target.build(prediction))
        if state is not None:
            self._keep(pass_key(serving, keep[0], group[0], keep[1]), state, by_rules)
        unsure_below = self.settings.unsure_below
        for position, (index, prediction) in enumerate(zip(loaded, next(iter(by_rules.values())), strict=True)):
            parts[index]["scores"].append(task_score(prediction, self.settings.task_score, unsure_below or 0.5))
            if views and "view" not in parts[index]:  # the first target's, as the task score
                parts[index]["view"] = TaskView.of(prediction, passes[position].prior.cpu().numpy())
            if unsure_below:
                parts[index]["unsure"].append(unsure_fraction(prediction.confidence, unsure_below))

    def _keep(self, key: tuple, state: ImageState, served: dict[RegionRules, list]) -> None:
        """Keep an opened task's pass with what a first click needs: the pre-labels just served, and the
        superpixels, being made beside the answer (a click that comes before they are waits for them)."""
        for rules, (prediction,) in served.items():
            state.keep_prelabel(rules, prediction.label_map)
        self.passes.put(key, state)


def _make_superpixels(state: ImageState) -> None:
    """An opened task's superpixels, made beside its pre-label and answer (they need only the pass) at the
    lowest priority, on the cores the answer leaves idle: the opening is not slower, and a click that comes
    at once finds them made or nearly."""
    with contextlib.suppress(AttributeError, OSError):  # Linux's nice is per thread; elsewhere at the usual priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    _ = state.superpixels  # a cached property: made once, kept with the pass


def pass_key(serving: Serving, project: str, target: ControlTag, digest: str | None) -> tuple:
    """What identifies a kept forward pass: the model, the project, the vocabulary and the image (the digest of
    its source, project and bytes, :meth:`PredictPipeline.download`)."""
    return serving.name, project, target.vocabulary.key, digest


def _prediction(parts: dict, error: str | None) -> TaskPrediction:
    if error is not None:
        return TaskPrediction(error=error)
    unsure = round(float(np.mean(parts["unsure"])), 4) if parts["unsure"] else None
    # Significant digits, not decimals: products of many region scores get small.
    return TaskPrediction(parts["result"], float(f"{np.mean(parts['scores']):.4g}"), unsure, view=parts.get("view"))


def _group_targets(targets: tuple[ControlTag, ...]) -> dict[tuple[str, str], list[ControlTag]]:
    groups: dict[tuple[str, str], list[ControlTag]] = {}
    for target in targets:
        groups.setdefault((target.data_key, target.vocabulary.key), []).append(target)
    return groups
