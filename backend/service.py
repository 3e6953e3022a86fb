"""The segmentation service behind the HTTP app: model lifecycle, /setup and /predict logic."""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from backend.annotations import AnnotationError, validate_results
from backend.images import ImageError, ImageFetcher
from backend.jobs import TrainingJobs
from backend.label_config import LabelConfigError, Target, parse_targets
from backend.results import build_results
from backend.settings import Settings
from backend.store import ProjectIdError, Store, Version, project_key
from model.calibration import task_score, unsure_fraction
from model.checkpoint import CheckpointError

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A request the service can't answer; ``status`` is the HTTP status to send."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class LoadedModel:
    """The CLIP, its cached text encoder and the zero-shot predictor; fine-tuned predictors are
    built on the same CLIP (the frozen tower is shared, only the small decoder differs)."""

    predictor: object
    name: str  # model identity, e.g. "ViT-B-16/openai"
    clip: object = None
    encoder: object = None
    settings: Settings | None = None
    _tuned: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def predictor_for(self, checkpoint: Path | None):
        """The predictor serving ``checkpoint`` (None: zero-shot), loaded once and kept."""
        if checkpoint is None:
            return self.predictor
        with self._lock:
            if checkpoint not in self._tuned:
                from model.checkpoint import load_checkpoint
                from model.predictor import Predictor
                from model.segmenter import build_segmenter

                segmenter = build_segmenter(self.clip, **self.settings.segmenter_options())
                metadata = load_checkpoint(checkpoint, segmenter, self.clip.identity)
                base = self.predictor
                # Each version carries the temperature its training job fitted on the project's annotations.
                self._tuned[checkpoint] = Predictor(segmenter, self.encoder, self.clip.mean, self.clip.std,
                                                    base.inference_size, base.batch_size, device=base.device,
                                                    temperature=metadata.get("temperature", 1.0),
                                                    max_area=base.max_area)
                log.info("loaded checkpoint %s", checkpoint)
            return self._tuned[checkpoint]


@dataclass
class Metrics:
    requests: int = 0
    tasks: int = 0
    task_errors: int = 0
    predict_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict:
        with self.lock:
            return {"predict_requests": self.requests, "predicted_tasks": self.tasks,
                    "failed_tasks": self.task_errors, "predict_seconds_total": round(self.predict_seconds, 3)}


def load_model(settings: Settings) -> LoadedModel:
    """CLIP → segmenter → predictor, as the settings say."""
    from model.clip import load_clip
    from model.predictor import Predictor
    from model.segmenter import build_segmenter
    from model.vocabulary import TextEncoder

    clip = load_clip(settings.clip_model, settings.clip_pretrained, settings.device)
    segmenter = build_segmenter(clip, **settings.segmenter_options())
    encoder = TextEncoder(clip, cache_dir=settings.cache_dir, max_vocabularies=settings.text_cache_vocabularies,
                          max_disk_bytes=settings.text_cache_disk_bytes)
    predictor = Predictor(segmenter, encoder, clip.mean, clip.std, inference_size=settings.inference_size,
                          batch_size=settings.predict_batch_size, device=settings.device,
                          temperature=settings.temperature, max_area=settings.max_inference_area)
    return LoadedModel(predictor=predictor, name=model_name(settings), clip=clip, encoder=encoder,
                       settings=settings)


def model_name(settings: Settings) -> str:
    """Names the model and its weights; known before the model has loaded."""
    from model.clip import clip_identity

    return clip_identity(settings.clip_model, settings.clip_pretrained)


class SegmentationService:
    """Loads the model in the background and answers /setup and /predict payloads."""

    def __init__(self, settings: Settings, model_loader=load_model):
        self.settings = settings
        self.fetcher = ImageFetcher.from_settings(settings)
        self.metrics = Metrics()
        self._model: LoadedModel | None = None
        self._model_error: str | None = None
        self._loaded = threading.Event()
        self._model_loader = model_loader
        self.store = Store(settings.model_dir)
        self.jobs = TrainingJobs(settings, self.store)
        self._configs: dict[str, str] = {}
        self._unreadable: dict[tuple[str, int], str] = {}  # (project, version) → why its checkpoint failed
        if settings.label_studio_api_key and not settings.label_studio_url:
            log.warning("LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL: the key is not used; images "
                        "are fetched with the token Label Studio sends to /setup")
        trusted = self.store.get_meta(TRUSTED_LABEL_STUDIO)
        if trusted and not settings.label_studio_url:
            self.fetcher.configure(trusted, "")  # its token comes with Label Studio's next /setup

    # ------------------------------------------------------------------ model lifecycle
    def start(self) -> None:
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        started = time.time()
        try:
            self._model = self._model_loader(self.settings)
            log.info("model %s ready in %.1fs", self._model.name, time.time() - started)
        except Exception as error:
            self._model_error = str(error)
            log.error("model failed to load: %s", error)
        finally:
            self._loaded.set()

    def model(self, wait: float = 300.0) -> LoadedModel:
        if not self._loaded.wait(wait):
            raise ServiceError("the model is still loading; try again shortly", 503)
        if self._model is None:
            raise ServiceError(f"the model could not be loaded: {self._model_error}", 500)
        return self._model

    @property
    def state(self) -> str:
        if not self._loaded.is_set():
            return "loading"
        return "ready" if self._model is not None else "error"

    def status(self) -> dict:
        status = {"model_state": self.state, "model": self.base_name, "training": self.jobs.status()}
        if self._model_error:
            status["model_error"] = self._model_error
        if self._unreadable:
            status["unreadable_checkpoints"] = [{"project": p, "version": f"v{v}", "error": error}
                                                for (p, v), error in sorted(self._unreadable.items())]
        return status

    def shutdown(self) -> None:
        """Stop training jobs (they register nothing); called when the server stops."""
        self.jobs.shutdown()

    # ------------------------------------------------------------------ versions
    def current_version(self, project: str) -> Version | None:
        """The version a project is served: the pinned one, else its newest readable one; None = zero-shot."""
        versions = self.store.versions(project) if project else []
        pin = self.settings.pinned_versions.get(project)
        if pin is not None:
            matching = [v for v in versions if v.version == pin]
            if pin and not matching:
                raise ServiceError(f"PINNED_VERSIONS asks for v{pin} of project {project}, which doesn't exist", 500)
            if matching and (project, pin) in self._unreadable:
                raise ServiceError(f"PINNED_VERSIONS asks for v{pin} of project {project}, whose checkpoint "
                                   f"can't be read: {self._unreadable[project, pin]}", 500)
            return matching[0] if matching else None
        readable = [v for v in versions if (project, v.version) not in self._unreadable]
        return readable[-1] if readable else None

    def _serving(self, project: str, model: LoadedModel):
        """(version, predictor) for ``project``; an unreadable checkpoint is reported and skipped."""
        while True:
            version = self.current_version(project)
            try:
                return version, model.predictor_for(version.path if version else None)
            except CheckpointError as error:
                self._unreadable[project, version.version] = str(error)
                log.error("project %s: checkpoint %s can't be read (%s); serving the newest readable version "
                          "instead", project, version.path, error)

    @property
    def base_name(self) -> str:
        return self._model.name if self._model is not None else model_name(self.settings)

    def _served_name(self, project: str, version: Version | None) -> str:
        return f"{self.base_name}@{f'p{project}-{version.name}' if version else 'zero-shot'}"

    def _remember_config(self, project: str, label_config: str) -> None:
        if project and label_config and self._configs.get(project) != label_config:
            self.store.set_label_config(project, label_config)
            self._configs[project] = label_config

    # ------------------------------------------------------------------ protocol
    @staticmethod
    def model_version(name: str, targets: tuple[Target, ...]) -> str:
        """``<model>/<weights>@<checkpoint>:vocab-<hash>``: a new vocabulary or checkpoint is a new version."""
        vocab = hashlib.sha1("|".join(t.vocabulary.key for t in targets).encode()).hexdigest()[:8]
        return f"{name}:vocab-{vocab}"

    def setup(self, payload: dict, authenticated: bool = False) -> dict:
        """Answer Label Studio's /setup; ``authenticated``: the caller passed basic auth."""
        schema = _label_config(payload)
        targets = self._targets(schema)
        project = _project(payload.get("project"))
        self._remember_config(project, schema)
        self._learn_label_studio(payload.get("hostname"), payload.get("access_token"), authenticated)
        if self.state == "error":
            raise ServiceError(f"the model could not be loaded: {self._model_error}", 500)
        # Answer at once (Label Studio waits ~3 s); the model may still be loading.
        return {"model_version": self.model_version(self._served_name(project, self.current_version(project)),
                                                    targets)}

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
        if trusted != origin:
            self.store.set_meta(TRUSTED_LABEL_STUDIO, origin)
            log.warning("trusting the Label Studio at %s (learnt from /setup)", origin)
        self.fetcher.configure(origin, token)
        self.jobs.configure(LABEL_STUDIO_URL=origin, LABEL_STUDIO_API_KEY=token)

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
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
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

    def versions(self) -> dict:
        versions = [{"project": v.project, "version": v.name, "created": v.created,
                     "model_version": f"{self.base_name}@p{v.project}-{v.name}",
                     "summary": {k: v.summary.get(k) for k in ("images", "classes", "steps", "seconds", "loss",
                                                                  "temperature", "ece_before", "ece_after",
                                                                  "skipped_annotations")},
                     **({"readable": False, "error": self._unreadable[v.project, v.version]}
                        if (v.project, v.version) in self._unreadable else {})}
                    for v in self.store.versions()]
        current = {p: (v.name if v else "zero-shot") for p in {v["project"] for v in versions}
                   for v in [self.current_version(p)]}
        return {"versions": versions, "current": current, "base_model": self.base_name}

    @staticmethod
    def _targets(label_config: str) -> tuple[Target, ...]:
        try:
            return parse_targets(label_config)
        except LabelConfigError as error:
            raise ServiceError(str(error), 400) from None

    def _load_image(self, task: dict, target: Target, predictor) -> np.ndarray:
        data = task.get("data") or {}
        if not isinstance(data, dict):
            raise ImageError("the task's 'data' is not an object")
        if target.data_key not in data:
            raise ImageError(f"task data has no {target.data_key!r} field (the Image tag reads ${target.data_key})")
        image = self.fetcher.fetch(data[target.data_key], task.get("id"))
        try:
            predictor.inference_shape(*image.shape[:2])  # refuse before any model work
        except ValueError as error:
            raise ImageError(str(error)) from None
        return image

    def predict(self, payload: dict) -> dict:
        started = time.time()
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise ServiceError("the request has no tasks: expected {\"tasks\": [...], \"label_config\": ...}")
        if not all(isinstance(t, dict) for t in tasks):
            raise ServiceError("every task must be a JSON object")
        label_config = _label_config(payload)
        targets = self._targets(label_config)
        project = _project(payload.get("project") or tasks[0].get("project"))
        if project and self.store.has_project(project):  # /predict alone never adds a project
            self._remember_config(project, label_config)
        model = self.model()
        served, predictor = self._serving(project, model)
        version = self.model_version(self._served_name(project, served), targets)
        errors: dict[int, str] = {}
        results: list[list[dict]] = [[] for _ in tasks]
        scores: list[list[float]] = [[] for _ in tasks]
        unsure: list[list[float]] = [[] for _ in tasks]
        # Each image is fetched once; targets with the same image and vocabulary share one prediction.
        images: dict[str, dict[int, np.ndarray]] = {}
        # A pool per request: one request's slow image servers never delay another request's images.
        with ThreadPoolExecutor(max_workers=min(self.settings.fetch_threads, len(tasks)),
                                thread_name_prefix="fetch") as pool:
            for data_key, target in {t.data_key: t for t in targets}.items():
                futures = [pool.submit(self._load_image, task, target, predictor) for task in tasks]
                images[data_key] = {}
                for index, future in enumerate(futures):
                    try:
                        images[data_key][index] = future.result()
                    except ImageError as error:
                        errors.setdefault(index, str(error))
                    except Exception as error:  # never let one task break the batch
                        log.exception("unexpected error loading task %s", str(tasks[index].get("id"))[:20])
                        errors.setdefault(index, f"unexpected {error.__class__.__name__} (see the backend's log)")
        for (data_key, _), group in _group_targets(targets).items():
            loaded = images[data_key]
            if not loaded:
                continue
            predictions = predictor.predict(list(loaded.values()), group[0].vocabulary)
            for index, prediction in zip(loaded, predictions):
                scores[index].append(task_score(prediction, self.settings.task_score,
                                                self.settings.unsure_below or 0.5))
                if self.settings.unsure_below:
                    unsure[index].append(unsure_fraction(prediction.confidence, self.settings.unsure_below))
                for target in group:
                    results[index].extend(build_results(target, prediction))
        answer = []
        for index, task in enumerate(tasks):
            if index in errors:
                log.warning("task %s: %s", task.get("id"), errors[index])
                # No "result" key: Label Studio then stores nothing for this task, so a later
                # "Retrieve predictions" tries it again instead of keeping an empty prediction.
                answer.append({"model_version": version, "error": errors[index]})
            else:
                # Significant digits, not decimals: products of many region scores get small.
                answer.append({"result": results[index], "score": float(f"{np.mean(scores[index]):.4g}"),
                               "model_version": version})
                if unsure[index]:
                    answer[-1]["meta"] = {"unsure_fraction": round(float(np.mean(unsure[index])), 4),
                                          "unsure_below": self.settings.unsure_below}
        with self.metrics.lock:
            self.metrics.requests += 1
            self.metrics.tasks += len(tasks)
            self.metrics.task_errors += len(errors)
            self.metrics.predict_seconds += time.time() - started
        release_freed_memory()
        return {"results": answer, "model_version": version}


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


def _group_targets(targets: tuple[Target, ...]) -> dict[tuple[str, str], list[Target]]:
    groups: dict[tuple[str, str], list[Target]] = {}
    for target in targets:
        groups.setdefault((target.data_key, target.vocabulary.key), []).append(target)
    return groups
