"""Which predictor serves project P: the model, its fine-tuned versions, pins, and the model version.

The HTTP service, training jobs, the ``prelabel`` command, benchmarks and tests all get
their predictors here:

    runtime = ModelRuntime(settings, store)
    runtime.start()                                  # loads the CLIP in the background
    serving = runtime.serving("12")                  # the pinned or newest readable version
    serving.predictor.predict(images, vocabulary)
    serving.model_version(targets)                   # e.g. "ViT-B-16/openai+clearclip@p12-v3:vocab-1a2b3c4d"
"""
from __future__ import annotations

import atexit
import dataclasses
import gc
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backend.control_tags import ControlTag
from backend.errors import ServiceError
from backend.label_config import LabelConfigError, parse_targets
from backend.settings import Settings
from backend.store import Store, Version
from model.build import SegmentationModel
from model.build import load_model as build_model
from model.checkpoint import CheckpointError
from model.config import RegionRules, model_identity
from model.predictor import Predictor

log = logging.getLogger(__name__)


def load_model(settings: Settings) -> SegmentationModel:
    """The :class:`model.build.SegmentationModel` the settings name (loads the CLIP)."""
    model = build_model(settings.model_config())
    # A loaded CLIP leaves some 400,000 objects that the cyclic collector walks again as the interpreter exits
    # (1.4 s of the 2.6 s a stopped demo backend took to exit). They die with the process, so at exit they leave
    # the collector's generations (unregistered first: loaded twice, frozen once).
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    return model


def identity_of(settings: Settings) -> str:
    """The identity of the model the settings name (CLIP, weights, dense method); known before it has loaded."""
    from model.clip import clip_identity

    return model_identity(clip_identity(settings.clip_model, settings.clip_pretrained), settings.dense_method)


def vocabulary_tag(targets: tuple[ControlTag, ...]) -> str:
    """``vocab-<hash>`` of the targets' labels and prompts: a new vocabulary is a new model version."""
    return "vocab-" + hashlib.sha1("|".join(t.vocabulary.key for t in targets).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Serving:
    """What serves a project now: a fine-tuned ``version`` (None: zero-shot) and its predictor."""

    name: str  # ``<model>/<weights>+<dense method>@p<project>-v<n>`` or ``…@zero-shot``
    version: Version | None
    predictor: Predictor | None = None

    def model_version(self, targets: tuple[ControlTag, ...]) -> str:
        """The string Label Studio stores with each prediction: checkpoint and vocabulary."""
        return f"{self.name}:{vocabulary_tag(targets)}"

    def region_rules(self, settings: Settings, labels: tuple[str, ...] = ()) -> RegionRules:
        """The pruning of pre-labels whose control tag sets none: the settings', with the version's fitted rule,
        which spares the ``labels`` its annotations never showed (unless ``MIN_REGION_SCORE`` is set)."""
        if self.version is None:
            return settings.region_rules()
        rules = settings.region_rules(self.version.summary.get("min_region_score"), zero_shot=False)
        trained = set(self.version.summary.get("classes") or labels)
        unscored = () if settings.min_region_score is not None else tuple(
            index for index, label in enumerate(labels) if label not in trained)
        return dataclasses.replace(rules, unscored=unscored)


class ModelRuntime:
    """Loads the model once (in the background, or at once with :meth:`load`), keeps each
    fine-tuned version's predictor, and decides which one serves a project.

    A project is served its pinned version (``PINNED_VERSIONS``) if any, else its newest
    version whose checkpoint can be read; a checkpoint that fails to load is remembered as
    unreadable, reported, and skipped from then on.
    """

    def __init__(self, settings: Settings, store: Store,
                 loader: Callable[[Settings], SegmentationModel] = load_model):
        self.settings = settings
        self.store = store
        self._loader = loader
        self._model: SegmentationModel | None = None
        self._error: str | None = None
        self._loaded = threading.Event()
        self._lock = threading.Lock()
        self._tuned: dict[Path, Predictor] = {}  # checkpoint → predictor
        self._zero_shot: Predictor | None = None
        self.unreadable: dict[tuple[str, int], str] = {}  # (project, version) → why its checkpoint failed

    # ------------------------------------------------------------------ loading
    def start(self) -> None:
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def load(self) -> SegmentationModel:
        """Load now (if not yet) and return the model; raises :class:`ServiceError` if it can't load."""
        if not self._loaded.is_set():
            self._load()
        return self.model(wait=0)

    def _load(self) -> None:
        started = time.time()
        try:
            self._model = self._loader(self.settings)
            self._zero_shot = self._model.predictor()
            log.info("model %s ready in %.1fs", self._model.identity, time.time() - started)
        except Exception as error:
            self._error = str(error)
            log.error("model failed to load: %s", error)
        finally:
            self._loaded.set()

    def model(self, wait: float = 300.0) -> SegmentationModel:
        """The loaded :class:`model.build.SegmentationModel`, waiting up to ``wait`` seconds."""
        if not self._loaded.wait(wait):
            raise ServiceError("the model is still loading; try again shortly", 503)
        if self._model is None:
            raise ServiceError(f"the model could not be loaded: {self._error}", 500)
        return self._model

    @property
    def state(self) -> str:
        if not self._loaded.is_set():
            return "loading"
        return "ready" if self._model is not None else "error"

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def name(self) -> str:
        """The base model's identity, e.g. ``ViT-B-16/openai+clearclip``."""
        return self._model.identity if self._model is not None else identity_of(self.settings)

    # ------------------------------------------------------------------ versions
    def current_version(self, project: str) -> Version | None:
        """The version a project is served: the pinned one, else its newest readable one; None = zero-shot."""
        versions = self.store.versions(project) if project else []
        pin = self.settings.pinned_versions.get(project)
        if pin is None:
            readable = [v for v in versions if (project, v.version) not in self.unreadable]
            return readable[-1] if readable else None
        matching = [v for v in versions if v.version == pin]
        if pin and not matching:
            raise ServiceError(f"PINNED_VERSIONS asks for v{pin} of project {project}, which doesn't exist", 500)
        if matching and (project, pin) in self.unreadable:
            raise ServiceError(f"PINNED_VERSIONS asks for v{pin} of project {project}, whose checkpoint "
                               f"can't be read: {self.unreadable[project, pin]}", 500)
        return matching[0] if matching else None

    def served_name(self, project: str, version: Version | None) -> str:
        return f"{self.name}@{f'p{project}-{version.name}' if version else 'zero-shot'}"

    def naming(self, project: str) -> Serving:
        """What serves ``project``, without loading anything (``predictor`` is None)."""
        version = self.current_version(project)
        return Serving(self.served_name(project, version), version)

    def serving(self, project: str, wait: float = 300.0) -> Serving:
        """What serves ``project``, with its predictor; an unreadable checkpoint is reported and skipped."""
        model = self.model(wait)
        while True:
            version = self.current_version(project)
            try:
                predictor = self._predictor(model, version.path) if version else self._zero_shot
                return Serving(self.served_name(project, version), version, predictor)
            except CheckpointError as error:
                self.unreadable[project, version.version] = str(error)
                log.error("project %s: checkpoint %s can't be read (%s); serving the newest readable version "
                          "instead", project, version.path, error)

    def _predictor(self, model: SegmentationModel, checkpoint: Path) -> Predictor:
        with self._lock:
            if checkpoint not in self._tuned:
                self._tuned[checkpoint] = model.load_predictor(checkpoint)
                log.info("loaded checkpoint %s", checkpoint)
            return self._tuned[checkpoint]

    def version_model_version(self, version: Version) -> str:
        """The model version a fine-tuned version's predictions carry, under the project's current
        label config (without the vocabulary part when none is known or it can't be served)."""
        name = self.served_name(version.project, version)
        try:
            return f"{name}:{vocabulary_tag(parse_targets(self.store.label_config(version.project) or ''))}"
        except LabelConfigError:
            return name

    def status(self) -> dict:
        status = {"model_state": self.state, "model": self.name}
        if self._error:
            status["model_error"] = self._error
        if self.unreadable:
            status["unreadable_checkpoints"] = [{"project": p, "version": f"v{v}", "error": error}
                                                for (p, v), error in sorted(self.unreadable.items())]
        return status
