"""Label Studio's ML-backend protocol: /setup, /predict, /webhook and /versions, over the model runtime."""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import redis

from backend.annotations import AnnotationError, validate_results
from backend.control_tags import ControlTag
from backend.errors import ServiceError
from backend.images import ImageError, ImageFetcher
from backend.interactive import ContextError, ImageStates, SmartRegion, as_prompt, label_groups, parse_context
from backend.jobs import TrainingJobs
from backend.label_config import LabelConfigError, parse_targets
from backend.labelstudio import LabelStudioError
from backend.metrics import Metrics
from backend.queue import JobQueue, QueuedTrainingJobs
from backend.runtime import ModelRuntime, load_model
from backend.settings import Settings
from backend.store import ProjectIdError, Store, project_key
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
        self._configs: dict[str, str] = {}
        if settings.label_studio_api_key and not settings.label_studio_url:
            log.warning("LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL: the key is not used; images "
                        "are fetched with the token Label Studio sends to /setup")
        trusted = self.store.get_meta(TRUSTED_LABEL_STUDIO)
        if trusted and not settings.label_studio_url:
            self.fetcher.configure(trusted, "")  # its token comes with Label Studio's next /setup

    def start(self) -> None:
        self.runtime.start()

    def status(self) -> dict:
        return {**self.runtime.status(), "training": self.jobs.status()}

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
        if project and label_config and self._configs.get(project) != label_config:
            self.store.set_label_config(project, label_config)
            self._configs[project] = label_config

    # ------------------------------------------------------------------ /setup
    def setup(self, payload: dict, authenticated: bool = False) -> dict:
        """Answer Label Studio's /setup; ``authenticated``: the caller passed basic auth."""
        schema = _label_config(payload)
        targets = _targets(schema)
        project = _project(payload.get("project"))
        self._remember_config(project, schema)
        self._learn_label_studio(payload.get("hostname"), payload.get("access_token"), authenticated)
        if self.runtime.state == "error":
            raise ServiceError(f"the model could not be loaded: {self.runtime.error}", 500)
        # Answer at once (Label Studio waits ~3 s); the model may still be loading.
        return {"model_version": self.runtime.naming(project).model_version(targets)}

    def _learn_label_studio(self, hostname, token, authenticated: bool) -> None:
        """Take Label Studio's address and token from /setup, unless the environment names them.

        The first address learned is trusted (stored in MODEL_DIR): it gets the token that came
        with it and may be a private address. Moving to another address takes a /setup that
        passed basic auth, or an address in ALLOWED_IMAGE_HOSTS; anyone else is refused.
        """
        if self.settings.label_studio_url or not hostname or not token:
            return
        if not isinstance(hostname, str) or not isinstance(token, str):
            raise ServiceError("/setup's 'hostname' and 'access_token' must be strings")
        parts = urlsplit(hostname.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise ServiceError(f"/setup's hostname {hostname[:80]!r} is not an http(s) address without credentials")
        origin = f"{parts.scheme}://{parts.netloc.lower()}"
        trusted = self.store.get_meta(TRUSTED_LABEL_STUDIO)
        if trusted and trusted != origin and not (authenticated or self.fetcher.is_allowed_host(origin)):
            raise ServiceError(
                f"this backend trusts the Label Studio at {trusted}; a /setup naming {origin} needs basic auth "
                "(BASIC_AUTH_USER/BASIC_AUTH_PASS) or the host in ALLOWED_IMAGE_HOSTS", 403)
        try:
            self.fetcher.configure(origin, token)
        except LabelStudioError as error:
            raise ServiceError(f"/setup: {error}") from None
        if trusted != origin:
            self.store.set_meta(TRUSTED_LABEL_STUDIO, origin)
            log.warning("trusting the Label Studio at %s (learnt from /setup)", origin)
        self.jobs.configure(LABEL_STUDIO_URL=origin, LABEL_STUDIO_API_KEY=token)

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
        self._remember_config(project, _label_config(project_info) if project_info else "")
        answer = {"status": "ok", "action": action, "project": project}
        self.metrics.webhook(action, known=action in WEBHOOK_ACTIONS)
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            self._store_annotation(action, project, annotation, task, answer)
        elif action in ("ANNOTATION_DELETED", "ANNOTATIONS_DELETED"):
            deleted = payload.get("annotations") or [annotation]
            if not isinstance(deleted, list) or not all(isinstance(a, dict) for a in deleted):
                raise ServiceError(f"{action}: 'annotations' must be a list of objects")
            ids = [_annotation_id(a) for a in deleted if "id" in a]  # all checked before any is deleted
            for annotation_id in ids:
                self.store.delete_annotation(project, annotation_id)
        elif action == "START_TRAINING":
            if not project:
                raise ServiceError("START_TRAINING without a project")
            # The event carries no annotations: the job pulls them from Label Studio's API.
            answer["training"] = self.jobs.request(project, pull=bool(self.settings.label_studio_url
                                                                      or self.jobs.env.get("LABEL_STUDIO_URL")))
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
            answer["training"] = self.jobs.request(project)

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
        if project and self.store.has_project(project):  # /predict alone never adds a project
            self._remember_config(project, label_config)
        serving = self.runtime.serving(project)
        version = serving.model_version(targets)
        try:
            smart = parse_context(_object(payload, "params").get("context"))
        except ContextError as error:
            return self._refused(tasks, version, f"the smart regions can't be used: {error}")
        if smart:
            return self._predict_interactive(tasks, targets, serving, version, smart)
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
                images, errors = self._fetch_images(pool, chunk, targets, serving.predictor)
                parts = [{"result": [], "scores": [], "unsure": []} for _ in chunk]
                for (data_key, _), group in _group_targets(targets).items():
                    self._predict_group(serving, images[data_key], group, parts, chunk if len(tasks) == 1 else None)
                results += [self._answer(task, parts[i], errors.get(i), version) for i, task in enumerate(chunk)]
                failures += len(errors)
                del images
        self.metrics.predicted(len(tasks) - handed, failures, time.time() - started)
        release_freed_memory()
        return {"results": results, "model_version": version}

    def _handover(self, project: str, tasks: list[dict]) -> tuple[float, int] | None:
        """(seconds, Label Studio project id) when this /predict may hand tasks over to the queue's workers:
        a queue, a project (its :func:`project_key`) and integer task ids (None: every task is predicted here)."""
        if self.queue is None or not project or not all(isinstance(t.get("id"), int) for t in tasks):
            return None
        return self.settings.predict_budget_seconds, int(project)

    def _enqueue_rest(self, project: int, tasks: list[dict], version: str) -> list[dict] | None:
        """Hand ``tasks`` over to the workers; their answers say so (Label Studio stores nothing for them,
        and the workers post their predictions through its API). None when Redis does not answer."""
        try:
            jobs = self.queue.enqueue_tasks(project, [t["id"] for t in tasks])
        except redis.RedisError as error:
            log.error("/predict: the job queue is not answering (%s); predicting every task here", error)
            return None
        size = self.queue.chunk_size
        log.info("/predict: %d tasks of project %d handed to the queue in %d chunks (PREDICT_BUDGET_SECONDS=%g)",
                 len(tasks), project, len(jobs), self.settings.predict_budget_seconds)
        return [{"model_version": version,
                 "error": f"queued for a worker (job {jobs[i // size]}): the prediction will be posted to Label "
                          "Studio shortly; not predicted within this request's time budget"}
                for i in range(len(tasks))]

    def _fetch_images(self, pool: ThreadPoolExecutor, tasks: list[dict], targets: tuple[ControlTag, ...],
                      predictor) -> tuple[dict[str, dict[int, np.ndarray]], dict[int, str]]:
        """Each task's image per data key (fetched once however many targets read it), and the
        error of each task whose image can't be used; keyed by the task's position in ``tasks``."""
        images: dict[str, dict[int, np.ndarray]] = {}
        errors: dict[int, str] = {}
        for data_key in {t.data_key for t in targets}:
            futures = [pool.submit(self._load_image, task, data_key, predictor) for task in tasks]
            images[data_key] = {}
            for index, future in enumerate(futures):
                try:
                    images[data_key][index] = future.result()
                except ImageError as error:
                    errors.setdefault(index, str(error))
                except Exception as error:  # never let one task break the batch
                    log.exception("unexpected error loading task %s", str(tasks[index].get("id"))[:20])
                    errors.setdefault(index, f"unexpected {error.__class__.__name__} (see the backend's log)")
        return images, errors

    def _load_image(self, task: dict, data_key: str, predictor) -> np.ndarray:
        data = task.get("data") or {}
        if not isinstance(data, dict):
            raise ImageError("the task's 'data' is not an object")
        if data_key not in data:
            raise ImageError(f"task data has no {data_key!r} field (the Image tag reads ${data_key})")
        image = self.fetcher.fetch(data[data_key], task.get("id"))
        try:
            predictor.inference_shape(*image.shape[:2])  # refuse before any model work
        except ValueError as error:
            raise ImageError(str(error)) from None
        return image

    def _predict_group(self, serving, loaded: dict[int, np.ndarray], group: list[ControlTag],
                       answers: list[dict], keep_for: list[dict] | None = None) -> None:
        """One forward pass per image for targets sharing an image and a vocabulary; each target's results,
        pruned by its own rules (the task score reads the first target's prediction). ``keep_for``: the
        one task whose pass is kept for the annotator's clicks (a task they opened)."""
        if not loaded:
            return
        predictor, images = serving.predictor, list(loaded.values())
        state = None
        if keep_for:
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
            self._keep(_state_key(serving, keep_for[0], group[0]), state, by_rules)
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
    def _predict_interactive(self, tasks: list[dict], targets: tuple[ControlTag, ...], serving, version: str,
                             smart: tuple[SmartRegion, ...]) -> dict:
        """Each task's answer to the annotator's smart regions: the label's refined mask, per target."""
        started, results = time.time(), []
        for task in tasks:
            try:
                results.append(self._refine_task(task, targets, serving, version, smart))
            except (ContextError, PromptError, ImageError) as error:
                results.append(self._failed(task, str(error), version))
        self.metrics.predicted(len(tasks), sum("error" in r for r in results), time.time() - started)
        return {"results": results, "model_version": version}

    def _refine_task(self, task: dict, targets: tuple[ControlTag, ...], serving, version: str,
                     smart: tuple[SmartRegion, ...]) -> dict:
        results, scores = [], []
        for group, label, regions in label_groups(smart, targets):
            state = self._image_state(task, group[0], serving)
            prompt = as_prompt(label, regions, state.height, state.width)
            by_rules: dict[RegionRules, SemanticPrediction] = {}
            for target in group:
                rules = target.rules(self.settings.region_rules())
                if rules not in by_rules:
                    mask, probability = refine(state, prompt, rules)
                    by_rules[rules] = SemanticPrediction(np.where(mask, label, UNLABELED).astype(np.int16), probability)
                results += target.build(by_rules[rules])
            scores += [p.region_scores.get(label, 0.0) for p in by_rules.values()]
        return {"result": results, "score": round(float(np.mean(scores)), 4), "model_version": version}

    def _image_state(self, task: dict, target: ControlTag, serving) -> ImageState:
        """The task's image's kept forward pass for ``target``'s vocabulary, made on a miss."""
        key = _state_key(serving, task, target)
        state = self.states.get(key)
        if state is None:
            image = self._load_image(task, target.data_key, serving.predictor)
            (logits, embeddings), = serving.predictor.logits_and_embeddings([image], target.vocabulary)
            state = ImageState.from_image(logits, embeddings, image, serving.predictor)
            self.states.put(key, state)
        return state

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
TRUSTED_LABEL_STUDIO = "trusted_label_studio_url"
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
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise ServiceError(f"{what} id {str(value)[:20]!r} is not an integer")
    return int(value)


def _annotation_id(annotation: dict) -> int:
    return _integer_id(annotation.get("id"), "annotation")


def _targets(label_config: str) -> tuple[ControlTag, ...]:
    try:
        return parse_targets(label_config)
    except LabelConfigError as error:
        raise ServiceError(str(error), 400) from None


def _state_key(serving, task: dict, target: ControlTag) -> tuple:
    """What identifies a kept forward pass: the model, the vocabulary and the image."""
    image = (task.get("data") or {}).get(target.data_key) if isinstance(task.get("data"), dict) else None
    return serving.name, target.vocabulary.key, hashlib.sha256(str(image).encode()).hexdigest()


def _group_targets(targets: tuple[ControlTag, ...]) -> dict[tuple[str, str], list[ControlTag]]:
    groups: dict[tuple[str, str], list[ControlTag]] = {}
    for target in targets:
        groups.setdefault((target.data_key, target.vocabulary.key), []).append(target)
    return groups
