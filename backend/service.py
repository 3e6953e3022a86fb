"""The segmentation service behind the HTTP app: model lifecycle, /setup and /predict logic."""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backend.images import ImageError, ImageFetcher
from backend.label_config import LabelConfigError, Target, parse_targets
from backend.results import build_results
from backend.jobs import TrainingJobs
from backend.settings import Settings
from backend.store import Store, Version, project_key
from model.calibration import task_score, unsure_fraction

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

                segmenter = build_segmenter(self.clip, dense_method=self.settings.dense_method)
                metadata = load_checkpoint(checkpoint, segmenter, self.clip.identity)
                base = self.predictor
                # Each version carries the temperature its training job fitted on the project's annotations.
                self._tuned[checkpoint] = Predictor(segmenter, self.encoder, self.clip.mean, self.clip.std,
                                                    base.inference_size, base.batch_size, device=base.device,
                                                    temperature=metadata.get("temperature", 1.0))
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
    segmenter = build_segmenter(clip, dense_method=settings.dense_method)
    encoder = TextEncoder(clip, cache_dir=settings.cache_dir)
    predictor = Predictor(segmenter, encoder, clip.mean, clip.std, inference_size=settings.inference_size,
                          batch_size=settings.predict_batch_size, device=settings.device,
                          temperature=settings.temperature)
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
        self.fetcher = ImageFetcher(settings.label_studio_url, settings.label_studio_api_key,
                                    settings.allowed_image_hosts, settings.max_image_bytes,
                                    settings.max_image_pixels, settings.fetch_timeout)
        self.metrics = Metrics()
        self._model: LoadedModel | None = None
        self._model_error: str | None = None
        self._loaded = threading.Event()
        self._model_loader = model_loader
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fetch")
        self.store = Store(settings.model_dir)
        self.jobs = TrainingJobs(settings, self.store)
        self._configs: dict[str, str] = {}

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
        return status

    # ------------------------------------------------------------------ versions
    def current_version(self, project: str) -> Version | None:
        """The version a project is served: the pinned one, else its newest; None = zero-shot."""
        versions = self.store.versions(project) if project else []
        pin = self.settings.pinned_versions.get(project)
        if pin is not None:
            matching = [v for v in versions if v.version == pin]
            if pin and not matching:
                raise ServiceError(f"PINNED_VERSIONS asks for v{pin} of project {project}, which doesn't exist", 500)
            return matching[0] if matching else None
        return versions[-1] if versions else None

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

    def setup(self, payload: dict) -> dict:
        schema = payload.get("schema") or payload.get("label_config") or ""
        targets = self._targets(schema)
        project = project_key(payload.get("project"))
        self._remember_config(project, schema)
        hostname, token = payload.get("hostname"), payload.get("access_token")
        if hostname and token and not self.settings.label_studio_url:
            # Label Studio says where and how to fetch its images; environment settings win.
            self.fetcher.configure(hostname, self.settings.label_studio_api_key or token)
            self.jobs.configure(LABEL_STUDIO_URL=hostname, LABEL_STUDIO_API_KEY=self.settings.label_studio_api_key or token)
        if self.state == "error":
            raise ServiceError(f"the model could not be loaded: {self._model_error}", 500)
        # Answer at once (Label Studio waits ~3 s); the model may still be loading.
        return {"model_version": self.model_version(self._served_name(project, self.current_version(project)),
                                                    targets)}

    def webhook(self, payload: dict) -> dict:
        """Store annotation events and start training; answers at once (Label Studio waits ~1 s)."""
        action = payload.get("action")
        if not action:
            raise ServiceError("webhook payload without an 'action'")
        project_info = payload.get("project") or {}
        annotation = payload.get("annotation") or {}
        task = payload.get("task") or {}
        project = project_key(project_info or task.get("project") or annotation.get("project"))
        if isinstance(project_info, dict):
            self._remember_config(project, project_info.get("label_config", ""))
        answer = {"status": "ok", "action": action, "project": project}
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            if not project or "id" not in annotation:
                raise ServiceError(f"{action} without a project or an annotation id")
            self.store.upsert_annotation(project, annotation, task)
            threshold = self.settings.train_after_annotations
            if threshold and self.store.changes_since_training(project) >= threshold:
                answer["training"] = self.jobs.request(project)
        elif action in ("ANNOTATION_DELETED", "ANNOTATIONS_DELETED"):
            for deleted in payload.get("annotations") or [annotation]:
                if "id" in deleted:
                    self.store.delete_annotation(project, deleted["id"])
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
                                                                  "temperature", "ece_before", "ece_after")}}
                    for v in self.store.versions()]
        current = {p: (v.name if v else "zero-shot") for p in {v["project"] for v in versions}
                   for v in [self.current_version(p)]}
        return {"versions": versions, "current": current, "base_model": self.base_name,
                "model_dir": str(self.settings.model_dir)}

    @staticmethod
    def _targets(label_config: str) -> tuple[Target, ...]:
        try:
            return parse_targets(label_config)
        except LabelConfigError as error:
            raise ServiceError(str(error), 400) from None

    def _load_image(self, task: dict, target: Target) -> np.ndarray:
        data = task.get("data") or {}
        if target.data_key not in data:
            raise ImageError(f"task data has no {target.data_key!r} field (the Image tag reads ${target.data_key})")
        return self.fetcher.fetch(data[target.data_key], task.get("id"))

    def predict(self, payload: dict) -> dict:
        started = time.time()
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise ServiceError("the request has no tasks: expected {\"tasks\": [...], \"label_config\": ...}")
        if not all(isinstance(t, dict) for t in tasks):
            raise ServiceError("every task must be a JSON object")
        label_config = payload.get("label_config") or payload.get("schema") or ""
        targets = self._targets(label_config)
        project = project_key(payload.get("project") or tasks[0].get("project"))
        self._remember_config(project, label_config)
        model = self.model()
        served = self.current_version(project)
        predictor = model.predictor_for(served.path if served else None)
        version = self.model_version(self._served_name(project, served), targets)
        errors: dict[int, str] = {}
        results: list[list[dict]] = [[] for _ in tasks]
        scores: list[list[float]] = [[] for _ in tasks]
        unsure: list[list[float]] = [[] for _ in tasks]
        # Each image is fetched once; targets with the same image and vocabulary share one prediction.
        images: dict[str, dict[int, np.ndarray]] = {}
        for data_key, target in {t.data_key: t for t in targets}.items():
            futures = [self._pool.submit(self._load_image, task, target) for task in tasks]
            images[data_key] = {}
            for index, future in enumerate(futures):
                try:
                    images[data_key][index] = future.result()
                except ImageError as error:
                    errors.setdefault(index, str(error))
                except Exception as error:  # never let one task break the batch
                    log.exception("unexpected error loading task %s", tasks[index].get("id"))
                    errors.setdefault(index, f"{error.__class__.__name__}: {error}")
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
        return {"results": answer, "model_version": version}


def _group_targets(targets: tuple[Target, ...]) -> dict[tuple[str, str], list[Target]]:
    groups: dict[tuple[str, str], list[Target]] = {}
    for target in targets:
        groups.setdefault((target.data_key, target.vocabulary.key), []).append(target)
    return groups
