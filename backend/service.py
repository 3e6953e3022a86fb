"""Label Studio's ML-backend protocol: /setup, /predict, /webhook and /versions, over the model runtime."""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from backend.annotations import AnnotationError, validate_results
from backend.control_tags import ControlTag
from backend.credentials import Credentials
from backend.errors import ServiceError
from backend.images import ImageError, ImageFetcher
from backend.interactive import ContextError, ImageStates, SmartRegion, as_prompt, label_groups, parse_context
from backend.jobs import TrainingJobs
from backend.label_config import LabelConfigError, parse_targets
from backend.metrics import Metrics
from backend.queue import JobQueue, QueuedTrainingJobs, QueueUnavailable
from backend.runtime import ModelRuntime, load_model
from backend.settings import Settings
from backend.store import MAX_ID, ProjectIdError, Store, integer_id, project_key
from model.calibration import task_score, unsure_fraction
from model.interactive import ImageState, PromptError, refine
from model.predictor import SemanticPrediction
from model.regions import RegionRules
from model.vocabulary import UNLABELED

log = logging.getLogger(__name__)


class SegmentationService:
    """Label Studio's ML-backend protocol over the runtime: /setup, /predict, /webhook, /versions.

    Which predictor serves a project is :class:`backend.runtime.ModelRuntime`'s business;
    this class validates payloads, fetches images, turns predictions into results and keeps
    the annotations and training jobs that webhooks bring.
    """

    def __init__(self, settings: Settings, model_loader=load_model):
        self.settings = settings
        self.fetcher = ImageFetcher.from_settings(settings)
        self.metrics = Metrics()
        self.store = Store(settings.model_dir)
        self.runtime = ModelRuntime(settings, self.store, model_loader)
        self.states = ImageStates(settings.interactive_cache_bytes)
        self.queue = JobQueue.from_settings(settings)
        self.jobs = QueuedTrainingJobs(self.queue) if self.queue is not None else TrainingJobs(
            settings, self.store, on_end=lambda outcome: self.metrics.training_jobs.labels(outcome=outcome).inc())
        self.credentials = Credentials(settings, self.store, settings.fetch_timeout)
        self._configs: dict[str, str] = {}  # project → digest of the label config last stored (bounded)

    def start(self) -> None:
        self.runtime.start()

    def status(self) -> dict:
        """/health's answer; never waits on the job queue (its training status is the last one read)."""
        status = {**self.runtime.status(), "training": self.jobs.status()}
        if self.queue is not None:
            status["queue"] = "answering" if self.jobs.answering else f"not answering ({self.jobs.error})"
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

    def _remember_config(self, project: str, label_config: str) -> None:
        """Store a project's label config once it has been parsed (:func:`_targets`: bounded and valid)."""
        digest = hashlib.sha256(label_config.encode()).hexdigest()
        if project and label_config and self._configs.get(project) != digest:
            self.store.set_label_config(project, label_config)
            self._configs.pop(project, None)
            self._configs[project] = digest
            while len(self._configs) > MAX_REMEMBERED_CONFIGS:
                del self._configs[next(iter(self._configs))]

    def _train(self, project: str, pull: bool) -> str:
        """Ask for a training job for ``project``, which must have been set up (Label Studio's /setup);
        ``pull``: its annotations come from Label Studio's API when the project's token is known."""
        if not self.store.is_set_up(project):
            return (f"refused: project {project} was never set up (Label Studio's /setup, when the model is "
                    "connected, comes first)")
        env = self.credentials.training_env(project)
        return self.jobs.request(project, pull=pull and bool(env or self.settings.label_studio_url), env=env)

    # ------------------------------------------------------------------ /setup
    def setup(self, payload: dict, authenticated: bool = False) -> dict:
        """Answer Label Studio's /setup; ``authenticated``: the caller passed basic auth."""
        schema = _label_config(payload)
        targets = _targets(schema)
        project = _project(payload.get("project"))
        self.credentials.learn(project, payload.get("hostname"), payload.get("access_token"), authenticated,
                               self.fetcher.is_allowed_host)
        self._remember_config(project, schema)
        if project:
            self.store.mark_set_up(project)
        if self.runtime.state == "error":
            raise ServiceError(f"the model could not be loaded: {self.runtime.error}", 500)
        # Answer at once (Label Studio waits ~3 s); the model may still be loading.
        return {"model_version": self.runtime.naming(project).model_version(targets)}

    # ------------------------------------------------------------------ /webhook
    def webhook(self, payload: dict) -> dict:
        """Store annotation events and start training; answers at once (Label Studio waits ~1 s)."""
        action = payload.get("action")
        if not action or not isinstance(action, str):
            raise ServiceError("webhook payload without an 'action'")
        project_info = _object(payload, "project")
        annotation = _object(payload, "annotation")
        task = _object(payload, "task")
        project = _project(project_info or task.get("project") or annotation.get("project"))
        label_config = _label_config(project_info) if project_info else ""
        if label_config:
            try:
                parse_targets(label_config)
            except LabelConfigError as error:  # the event is still answered; the config is not kept
                answer_config = f"not stored: {error}"
            else:
                self._remember_config(project, label_config)
                answer_config = "stored"
        answer = {"status": "ok", "action": action, "project": project}
        if label_config:
            answer["label_config"] = answer_config
        self.metrics.webhook(action, known=action in WEBHOOK_ACTIONS)
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            self._store_annotation(action, project, annotation, task, answer)
        elif action in ("ANNOTATION_DELETED", "ANNOTATIONS_DELETED"):
            deleted = payload.get("annotations") or [annotation]
            if not isinstance(deleted, list) or not all(isinstance(a, dict) for a in deleted):
                raise ServiceError(f"{action}: 'annotations' must be a list of objects")
            if len(deleted) > MAX_DELETED_ANNOTATIONS:
                raise ServiceError(f"{action} names {len(deleted)} annotations; at most {MAX_DELETED_ANNOTATIONS} "
                                   "in one event")
            ids = [_annotation_id(a) for a in deleted if "id" in a]  # all checked before any is deleted
            self.store.delete_annotations(project, ids)
        elif action == "START_TRAINING":
            if not project:
                raise ServiceError("START_TRAINING without a project")
            # The event carries no annotations: the job pulls them from Label Studio's API.
            answer["training"] = self._train(project, pull=True)
        else:
            answer["status"] = "ignored"
        log.info("webhook %s for project %s: %s", action, project or "?", answer["status"])
        return answer

    def _store_annotation(self, action: str, project: str, annotation: dict, task: dict, answer: dict) -> None:
        """Validate and store a created or updated annotation; start training when enough changed."""
        if not project or "id" not in annotation:
            raise ServiceError(f"{action} without a project or an annotation id")
        annotation = {**annotation, "id": _annotation_id(annotation)}
        if task.get("id") is not None:
            task = {**task, "id": _integer_id(task["id"], "task")}
        if not isinstance(task.get("data", {}), dict):
            raise ServiceError(f"{action}: the task's 'data' must be an object")
        try:
            validate_results(annotation.get("result") or [], self.settings.max_image_pixels)
        except AnnotationError as error:
            raise ServiceError(f"{action}: annotation {annotation['id']} of task {str(task.get('id'))[:20]}: "
                               f"{error}; nothing was stored") from None
        self.store.upsert_annotation(project, annotation, task)
        threshold = self.settings.train_after_annotations
        if threshold and self.store.changes_since_training(project) >= threshold:
            answer["training"] = self._train(project, pull=False)

    # ------------------------------------------------------------------ /versions
    def versions(self) -> dict:
        versions = [{"project": v.project, "version": v.name, "created": v.created,
                     "model_version": self.runtime.version_model_version(v),
                     "summary": {k: v.summary.get(k) for k in ("images", "classes", "steps", "seconds", "loss",
                                                                  "temperature", "ece_before", "ece_after",
                                                                  "skipped_annotations")},
                     **({"readable": False, "error": self.runtime.unreadable[v.project, v.version]}
                        if (v.project, v.version) in self.runtime.unreadable else {})}
                    for v in self.store.versions()]
        current = {p: (v.name if v else "zero-shot") for p in {v["project"] for v in versions}
                   for v in [self.runtime.current_version(p)]}
        return {"versions": versions, "current": current, "base_model": self.runtime.name}

    # ------------------------------------------------------------------ /predict
    def predict(self, payload: dict) -> dict:
        started = time.time()
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise ServiceError("the request has no tasks: expected {\"tasks\": [...], \"label_config\": ...}")
        if not all(isinstance(t, dict) for t in tasks):
            raise ServiceError("every task must be a JSON object")
        label_config = _label_config(payload)
        targets = _targets(label_config)
        project = _project(payload.get("project") or tasks[0].get("project"))
        if project and self.store.is_set_up(project):  # /predict alone never adds a project
            self._remember_config(project, label_config)
        serving = self.runtime.serving(project)
        version = serving.model_version(targets)
        try:
            smart = parse_context(_object(payload, "params").get("context"))
        except ContextError as error:
            return self._refused(tasks, version, f"the smart regions can't be used: {error}")
        if smart:
            return self._predict_interactive(project, tasks, targets, serving, version, smart)
        results: list[dict] = []
        failures = 0
        batch = self.settings.predict_batch_size
        handover, handed = self._handover(project, tasks), 0
        # A pool per request: one request's slow image servers never delay another request's images.
        with ThreadPoolExecutor(max_workers=min(self.settings.fetch_threads, len(tasks)),
                                thread_name_prefix="fetch") as pool:
            # Chunk by chunk (fetch, predict, encode): memory holds one chunk's images however many tasks come.
            for start in range(0, len(tasks), batch):
                elapsed = time.time() - started
                if handover is not None and start and elapsed + elapsed / start * batch > handover[0]:
                    queued = self._enqueue_rest(handover[1], tasks[start:], version)
                    if queued is not None:
                        handed = len(queued)
                        results += queued
                        break
                    handover = None  # the queue is away: the rest is predicted here
                chunk = tasks[start:start + batch]
                images, digests, errors = self._fetch_images(pool, project, chunk, targets, serving.predictor)
                parts = [{"result": [], "scores": [], "unsure": []} for _ in chunk]
                for (data_key, _), group in _group_targets(targets).items():
                    # A task opened alone (an annotator's) keeps its pass for clicks, under its image's digest.
                    keep = (project, digests[data_key].get(0)) if len(tasks) == 1 else None
                    self._predict_group(serving, images[data_key], group, parts, keep)
                results += [self._answer(task, parts[i], errors.get(i), version) for i, task in enumerate(chunk)]
                failures += len(errors)
                del images
        self.metrics.predicted(len(tasks) - handed, failures, time.time() - started)
        release_freed_memory()
        return {"results": results, "model_version": version}

    def _handover(self, project: str, tasks: list[dict]) -> tuple[float, int] | None:
        """(seconds, Label Studio project id) when this /predict may hand tasks over to the queue's workers:
        a queue that answered its last status read, a project Label Studio's /setup named (work for unknown
        projects is never queued) and integer task ids (None: every task is predicted here)."""
        if self.queue is None or not project or not self.jobs.answering or not self.store.is_set_up(project):
            return None
        if not all(isinstance(t.get("id"), int) and 0 <= t["id"] <= MAX_ID for t in tasks):
            return None
        return self.settings.predict_budget_seconds, int(project)

    def _enqueue_rest(self, project: int, tasks: list[dict], version: str) -> list[dict] | None:
        """Hand ``tasks`` over to the workers; their answers say so (Label Studio stores nothing for them,
        and the workers post their predictions through its API). None when Redis does not answer."""
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

    def _fetch_images(self, pool: ThreadPoolExecutor, project: str, tasks: list[dict],
                      targets: tuple[ControlTag, ...], predictor
                      ) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, dict[int, str]], dict[int, str]]:
        """Each task's image per data key (fetched once however many targets read it), its digest, and
        the error of each task whose image can't be used; keyed by the task's position in ``tasks``."""
        images: dict[str, dict[int, np.ndarray]] = {}
        digests: dict[str, dict[int, str]] = {}
        errors: dict[int, str] = {}
        for data_key in {t.data_key for t in targets}:
            futures = [pool.submit(self._load_image, project, task, data_key, predictor) for task in tasks]
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

    def _download(self, project: str, task: dict, data_key: str) -> tuple[bytes, str]:
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

    def _decode(self, content: bytes, predictor) -> np.ndarray:
        image = self.fetcher.decode(content)
        try:
            predictor.inference_shape(*image.shape[:2])  # refuse before any model work
        except ValueError as error:
            raise ImageError(str(error)) from None
        return image

    def _load_image(self, project: str, task: dict, data_key: str, predictor) -> tuple[np.ndarray, str]:
        content, digest = self._download(project, task, data_key)
        return self._decode(content, predictor), digest

    def _predict_group(self, serving, loaded: dict[int, np.ndarray], group: list[ControlTag],
                       answers: list[dict], keep: tuple[str, str | None] | None = None) -> None:
        """One forward pass per image for targets sharing an image and a vocabulary; each target's results,
        pruned by its own rules (the task score reads the first target's prediction). ``keep``: (project,
        image digest) of the one task whose pass is kept for the annotator's clicks (a task they opened)."""
        if not loaded:
            return
        predictor, images = serving.predictor, list(loaded.values())
        state = None
        if keep:
            (logits, embeddings), = predictor.logits_and_embeddings(images, group[0].vocabulary)
            state = ImageState.from_image(logits, embeddings, images[0], predictor)
            logits = [logits]
        else:
            logits = predictor.logits(images, group[0].vocabulary)
        by_rules: dict[RegionRules, list] = {}
        for target in group:
            rules = target.rules(self.settings.region_rules())
            if rules not in by_rules:
                by_rules[rules] = predictor.semantic(images, logits, rules)
            for index, prediction in zip(loaded, by_rules[rules], strict=True):
                answers[index]["result"].extend(target.build(prediction))
        if state is not None:
            self._keep(_state_key(serving, keep[0], group[0], keep[1]), state, by_rules)
        unsure_below = self.settings.unsure_below
        for index, prediction in zip(loaded, next(iter(by_rules.values())), strict=True):
            answers[index]["scores"].append(task_score(prediction, self.settings.task_score, unsure_below or 0.5))
            if unsure_below:
                answers[index]["unsure"].append(unsure_fraction(prediction.confidence, unsure_below))

    def _keep(self, key: tuple, state: ImageState, served: dict[RegionRules, list]) -> None:
        """Keep an opened task's pass with what a first click needs: the pre-labels just served, the superpixels."""
        for rules, (prediction,) in served.items():
            state.keep_prelabel(rules, prediction.label_map)
        state.superpixels  # noqa: B018 (made now, while the annotator looks at the pre-label)
        self.states.put(key, state)

    # ------------------------------------------------------------------ /predict with smart regions
    def _predict_interactive(self, project: str, tasks: list[dict], targets: tuple[ControlTag, ...], serving,
                             version: str, smart: tuple[SmartRegion, ...]) -> dict:
        """Each task's answer to the annotator's smart regions: the label's refined mask, per target."""
        started, results = time.time(), []
        for task in tasks:
            try:
                results.append(self._refine_task(project, task, targets, serving, version, smart))
            except (ContextError, PromptError, ImageError) as error:
                results.append(self._failed(task, str(error), version))
        self.metrics.predicted(len(tasks), sum("error" in r for r in results), time.time() - started)
        release_freed_memory()
        return {"results": results, "model_version": version}

    def _refine_task(self, project: str, task: dict, targets: tuple[ControlTag, ...], serving, version: str,
                     smart: tuple[SmartRegion, ...]) -> dict:
        results, scores = [], []
        for group, label, regions in label_groups(smart, targets):
            key, state = self._image_state(project, task, group[0], serving)
            prompt = as_prompt(label, regions, state.height, state.width)
            by_rules: dict[RegionRules, SemanticPrediction] = {}
            for target in group:
                rules = target.rules(self.settings.region_rules())
                if rules not in by_rules:
                    mask, probability = refine(state, prompt, rules)
                    by_rules[rules] = SemanticPrediction(np.where(mask, label, UNLABELED).astype(np.int16), probability)
                results += target.build(by_rules[rules])
            scores += [p.region_scores.get(label, 0.0) for p in by_rules.values()]
            self.states.put(key, state)  # measured again: the click may have grown it
        return {"result": results, "score": round(float(np.mean(scores)), 4), "model_version": version}

    def _image_state(self, project: str, task: dict, target: ControlTag, serving) -> tuple[tuple, ImageState]:
        """The task's image's kept forward pass for ``target``'s vocabulary (made on a miss), and its key.

        The image is downloaded on every click, with the project's own token: a project that may not see
        it gets Label Studio's refusal, and an image changed behind its URL gets a new pass (its digest).
        """
        content, digest = self._download(project, task, target.data_key)
        key = _state_key(serving, project, target, digest)
        state = self.states.get(key)
        if state is None:
            image = self._decode(content, serving.predictor)
            (logits, embeddings), = serving.predictor.logits_and_embeddings([image], target.vocabulary)
            state = ImageState.from_image(logits, embeddings, image, serving.predictor)
            self.states.put(key, state)
        return key, state

    def _refused(self, tasks: list[dict], version: str, error: str) -> dict:
        return {"results": [self._failed(task, error, version) for task in tasks], "model_version": version}

    def _failed(self, task: dict, error: str, version: str) -> dict:
        """A task's answer saying why it has no result, naming the task."""
        return self._answer(task, {}, f"task {str(task.get('id'))[:20]}: {error}", version)

    def _answer(self, task: dict, parts: dict, error: str | None, version: str) -> dict:
        """One task's entry in the /predict answer."""
        if error is not None:
            log.warning("task %s: %s", task.get("id"), error)
            # No "result" key: Label Studio then stores nothing for this task, so a later
            # "Retrieve predictions" tries it again instead of keeping an empty prediction.
            return {"model_version": version, "error": error}
        # Significant digits, not decimals: products of many region scores get small.
        answer = {"result": parts["result"], "score": float(f"{np.mean(parts['scores']):.4g}"),
                  "model_version": version}
        if parts["unsure"]:
            answer["meta"] = {"unsure_fraction": round(float(np.mean(parts["unsure"])), 4),
                              "unsure_below": self.settings.unsure_below}
        return answer


# Label Studio's webhook actions (webhooks/models.py): others are counted as "other".
WEBHOOK_ACTIONS = {"PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED", "TASKS_CREATED", "TASKS_DELETED",
                   "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED",
                   "ANNOTATIONS_DELETED", "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED",
                   "START_TRAINING"}
MAX_REMEMBERED_CONFIGS = 4096  # projects whose label config's digest is kept, to skip rewriting it
MAX_DELETED_ANNOTATIONS = 100_000  # ids in one deletion event (deleted in one transaction)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS after a request.

    glibc keeps what full-resolution maps and new vocabularies freed: without this the
    worker's RSS only grows (measured +300 MB over 700 label sets, flat with it; ~4 ms).
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _object(payload: dict, key: str) -> dict:
    """``payload[key]`` as a JSON object ({} when absent); a 400 when it is something else."""
    value = payload.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ServiceError(f"'{key}' must be a JSON object, not {type(value).__name__}")
    return value


def _label_config(payload: dict) -> str:
    value = payload.get("schema") or payload.get("label_config") or ""
    if not isinstance(value, str):
        raise ServiceError(f"the label config ('schema' or 'label_config') must be a string, not {type(value).__name__}")
    return value


def _project(value) -> str:
    try:
        return project_key(value)
    except ProjectIdError as error:
        raise ServiceError(str(error)) from None


def _integer_id(value, what: str) -> int:
    try:
        return integer_id(value, what)
    except ValueError as error:
        raise ServiceError(str(error)) from None


def _annotation_id(annotation: dict) -> int:
    return _integer_id(annotation.get("id"), "annotation")


def _targets(label_config: str) -> tuple[ControlTag, ...]:
    try:
        return parse_targets(label_config)
    except LabelConfigError as error:
        raise ServiceError(str(error), 400) from None


def _state_key(serving, project: str, target: ControlTag, digest: str | None) -> tuple:
    """What identifies a kept forward pass: the model, the project, the vocabulary and the image (the digest of
    its source, project and bytes, :meth:`SegmentationService._download`)."""
    return serving.name, project, target.vocabulary.key, digest


def _group_targets(targets: tuple[ControlTag, ...]) -> dict[tuple[str, str], list[ControlTag]]:
    groups: dict[tuple[str, str], list[ControlTag]] = {}
    for target in targets:
        groups.setdefault((target.data_key, target.vocabulary.key), []).append(target)
    return groups
