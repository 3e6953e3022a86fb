"""Label Studio's ML-backend protocol: /setup, /predict, /webhook and /versions, over the model runtime.

The service composes the floors below it and speaks the protocol; the work is theirs:

* :class:`backend.runtime.ModelRuntime`: which predictor serves a project (version, pins);
* :class:`backend.pipeline.PredictPipeline`: task images → one pass → results and scores;
* :class:`backend.clicks.ClickHandler`: the annotator's smart clicks and boxes;
* :class:`backend.webhooks.WebhookHandler`: annotations stored and deleted, training started;
* :class:`backend.projects.Projects` and :class:`backend.credentials.Credentials`: what each project is,
  and which Label Studio token serves it;
* :mod:`backend.jobs`: training jobs, and the job queue /predict hands work to past its time budget.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from backend.clicks import ClickHandler
from backend.control_tags import ControlTag
from backend.credentials import Credentials
from backend.errors import ServiceError
from backend.images import ImageFetcher
from backend.jobs import QueueUnavailable, job_queue, training_jobs
from backend.label_config import has_smart_tools
from backend.memory import map_large_buffers, release_freed_memory
from backend.payloads import json_object, label_config_of, project_of, targets_of, task_name
from backend.pipeline import KeepPasses, PredictPipeline, TaskPrediction
from backend.projects import Projects
from backend.prometheus import Metrics
from backend.runtime import ModelRuntime, Serving, load_model
from backend.settings import Settings
from backend.smart_tools import ContextError, ImageStates, parse_context
from backend.store import MAX_ID, Store
from backend.webhooks import WebhookHandler
from model.build import SegmentationModel

log = logging.getLogger(__name__)


class SegmentationService:
    """Label Studio's ML-backend protocol over the runtime: /setup, /predict, /webhook, /versions."""

    def __init__(self, settings: Settings,
                 model_loader: Callable[[Settings], SegmentationModel] | None = load_model):
        self.settings = settings
        self.metrics = Metrics()
        self.store = Store(settings.model_dir)
        self.runtime = ModelRuntime(settings, self.store, model_loader)
        self.fetcher = ImageFetcher.from_settings(settings)
        self.credentials = Credentials(settings, self.store, settings.fetch_timeout)
        self.queue = job_queue(settings)
        self.jobs = training_jobs(settings, self.store, self.queue,
                                  on_end=lambda outcome: self.metrics.training_jobs.labels(outcome=outcome).inc())
        self.projects = Projects(settings, self.store, self.credentials, self.jobs)
        self.passes = ImageStates(settings.interactive_cache_bytes)
        self.pipeline = PredictPipeline(settings, self.fetcher, self.credentials, self.passes)
        self.clicks = ClickHandler(settings, self.pipeline, self.passes)
        self.webhooks = WebhookHandler(settings, self.store, self.projects, self.metrics)

    def start(self) -> None:
        map_large_buffers()
        self.runtime.start()

    def status(self) -> dict:
        """/health's answer; never waits on the job queue (its training status is the last one read)."""
        status = {**self.runtime.status(), "training": self.jobs.status()}
        if self.queue is not None:
            status["queue"] = "answering" if self.queue.answering else f"not answering ({self.queue.error})"
        return status

    def metrics_summary(self) -> dict:
        """The JSON of ``/metrics``; also brings the Prometheus gauges up to date."""
        status = self.status()
        training = status["training"]
        self.metrics.model_ready.set(1 if status["model_state"] == "ready" else 0)
        self.metrics.training_running.set(sum(1 for job in training.values() if job.get("state") == "running"))
        self.metrics.training_queued.set(sum(1 for job in training.values() if job.get("queued")))
        return {**self.metrics.summary(), "annotations": self.store.annotation_counts(), **status}

    def shutdown(self) -> None:
        """Stop training jobs (they register nothing); called when the server stops."""
        self.jobs.shutdown()

    # ------------------------------------------------------------------ /setup, /webhook, /versions
    def setup(self, payload: dict, authenticated: bool = False) -> dict:
        """Answer Label Studio's /setup; ``authenticated``: the caller passed basic auth."""
        schema = label_config_of(payload)
        targets = targets_of(schema)
        project = project_of(payload.get("project"))
        self.credentials.learn(project, payload.get("hostname"), payload.get("access_token"), authenticated,
                               self.fetcher.is_allowed_host)
        self.projects.set_up(project, schema)
        if self.runtime.state == "error":
            raise ServiceError(f"the model could not be loaded: {self.runtime.error}", 500)
        # Answer at once (Label Studio waits ~3 s); the model may still be loading.
        return {"model_version": self.runtime.naming(project).model_version(targets)}

    def webhook(self, payload: dict) -> dict:
        return self.webhooks.handle(payload)

    def versions(self) -> dict:
        versions = [{"project": v.project, "version": v.name, "created": v.created,
                     "model_version": self.runtime.version_model_version(v),
                     "summary": {k: v.summary.get(k) for k in ("images", "classes", "background", "steps", "seconds", "loss",
                                                                  "temperature", "presence_weight", "ece_before", "ece_after",
                                                                  "confidence_scale", "served_ece_before",
                                                                  "served_ece_after", "min_region_score", "region_recall_weight", "frozen_trust",
                                                                  "skipped_annotations")},
                     **({"readable": False, "error": self.runtime.unreadable[v.project, v.version]}
                        if (v.project, v.version) in self.runtime.unreadable else {})}
                    for v in self.store.versions()]
        current = {p: (v.name if v else "zero-shot") for p in {v["project"] for v in versions}
                   for v in [self.runtime.current_version(p)]}
        return {"versions": versions, "current": current, "base_model": self.runtime.name}

    # ------------------------------------------------------------------ /predict
    def predict(self, payload: dict) -> dict:
        """Pre-labels for the tasks, or (with a context of smart regions) the annotator's refined masks."""
        started = time.time()
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise ServiceError("the request has no tasks: expected {\"tasks\": [...], \"label_config\": ...}")
        if not all(isinstance(t, dict) for t in tasks):
            raise ServiceError("every task must be a JSON object")
        label_config = label_config_of(payload)
        targets = targets_of(label_config)
        project = project_of(payload.get("project") or tasks[0].get("project"))
        if self.projects.is_set_up(project):  # /predict alone never adds a project
            self.projects.remember_config(project, label_config)
        serving = self.runtime.serving(project)
        version = serving.model_version(targets)
        try:
            smart = parse_context(json_object(payload, "params").get("context"))
        except ContextError as error:
            refused = TaskPrediction(error=f"the smart regions can't be used: {error}")
            return {"results": [self._answer(task, refused, version) for task in tasks],
                    "model_version": version}
        if smart is not None:
            predictions, queued = self.clicks.answer(project, tasks, targets, serving, smart), []
        else:
            # An opened task's pass is kept for clicks only where the config has a tool that clicks.
            keep = KeepPasses.OPENED_TASK if has_smart_tools(label_config) else KeepPasses.NEVER
            predictions, queued = self._predict_within_budget(project, tasks, targets, serving, version, started, keep)
        results = [self._answer(task, p, version) for task, p in zip(tasks, predictions, strict=False)] + queued
        self.metrics.predicted(len(predictions), sum(p.error is not None for p in predictions), time.time() - started)
        release_freed_memory()
        return {"results": results, "model_version": version}

    def _predict_within_budget(self, project: str, tasks: list[dict], targets: tuple[ControlTag, ...],
                               serving: Serving, version: str, started: float, keep: KeepPasses
                               ) -> tuple[list[TaskPrediction], list[dict]]:
        """The tasks' predictions, chunk by chunk; with a job queue, the tasks that the next chunk would take
        past ``PREDICT_BUDGET_SECONDS`` go to the workers instead (their answers say so)."""
        predictions: list[TaskPrediction] = []
        may_hand_over = self._may_hand_over(project, tasks)
        chunks = self.pipeline.chunks(project, tasks, targets, serving, keep)
        for chunk in chunks:
            predictions += chunk
            done, elapsed = len(predictions), time.time() - started
            if may_hand_over and done < len(tasks) and \
                    elapsed + elapsed / done * len(chunk) > self.settings.predict_budget_seconds:
                queued = self._enqueue_rest(int(project), tasks[done:], version)
                if queued is not None:
                    chunks.close()
                    return predictions, queued
                may_hand_over = False  # the queue is away: the rest is predicted here
        return predictions, []

    def _may_hand_over(self, project: str, tasks: list[dict]) -> bool:
        """Whether this /predict may hand tasks over to the queue's workers: a queue that answered its last
        call, a project Label Studio's /setup named (work for unknown projects is never queued) and integer
        task ids."""
        if self.queue is None or not self.queue.answering or not self.projects.is_set_up(project):
            return False
        return all(isinstance(t.get("id"), int) and 0 <= t["id"] <= MAX_ID for t in tasks)

    def _enqueue_rest(self, project: int, tasks: list[dict], version: str) -> list[dict] | None:
        """Hand ``tasks`` over to the workers; their answers say so (Label Studio stores nothing for them,
        and the workers post their predictions through its API). None when the queue does not answer."""
        try:
            jobs = self.queue.enqueue_tasks(project, [t["id"] for t in tasks])
        except QueueUnavailable as error:
            log.error("/predict: the job queue is not answering (%s); predicting every task here", error)
            return None
        size = self.queue.chunk_size
        log.info("/predict: %d tasks of project %d handed to the queue in %d chunks (PREDICT_BUDGET_SECONDS=%g)",
                 len(tasks), project, len(jobs), self.settings.predict_budget_seconds)
        return [{"model_version": version,
                 "error": f"queued for a worker (job {jobs[i // size]}): the prediction will be posted to Label "
                          "Studio shortly; not predicted within this request's time budget"}
                for i in range(len(tasks))]

    def _answer(self, task: dict, prediction: TaskPrediction, version: str) -> dict:
        """One task's entry in the /predict answer; an error names the task and its cause."""
        if prediction.error is not None:
            error = f"{task_name(task)}: {prediction.error}"
            log.warning(error)
            # No "result" key: Label Studio then stores nothing for this task, so a later
            # "Retrieve predictions" tries it again instead of keeping an empty prediction.
            return {"model_version": version, "error": error}
        answer = {"result": prediction.result, "score": prediction.score, "model_version": version}
        if prediction.unsure is not None:
            answer["meta"] = {"unsure_fraction": prediction.unsure, "unsure_below": self.settings.unsure_below}
        return answer

