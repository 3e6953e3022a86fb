"""Settings from the environment (same names as Label Studio's official ML backends where they exist).

Importing this loads no torch (the container's health check imports it every 30 s); the model's
defaults come from :data:`model.config.DEFAULTS`, and every setting with a fixed set of values is
checked when the settings are made, before any model loads.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from model.config import (
    DEFAULTS,
    DENSE_METHODS,
    OPENVINO_MISSING,
    PRECISIONS,
    RUNTIMES,
    ModelConfig,
    RegionRules,
    openvino_installed,
)
from model.task_scores import TASK_SCORES


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?|mps")


def _optional_float(name: str) -> float | None:
    """A number, or None when unset (the model then derives it)."""
    raw = _env(name)
    return float(raw) if raw else None


def _flag(name: str, default: bool) -> bool:
    """A yes/no setting; anything but these words is refused (a typo must not silently mean "no")."""
    raw = _env(name, "true" if default else "false").lower()
    if raw not in _TRUE + _FALSE:
        raise ValueError(f"{name} must be one of {', '.join(_TRUE + _FALSE)}, not {raw!r}")
    return raw in _TRUE


def _pins(raw: str) -> dict[str, int]:
    """``PINNED_VERSIONS="12:3,15:0"`` → project 12 serves v3, project 15 the zero-shot model."""
    pins = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        project, _, version = item.partition(":")
        pins[project.strip()] = int(version.strip().lstrip("v"))
    return pins


@dataclass(frozen=True)
class Settings:
    label_studio_url: str = field(default_factory=lambda: _env("LABEL_STUDIO_URL") or _env("LABEL_STUDIO_HOST"))
    label_studio_api_key: str = field(default_factory=lambda: _env("LABEL_STUDIO_API_KEY"))
    model_dir: Path = field(default_factory=lambda: Path(_env("MODEL_DIR", "./model_dir")))
    basic_auth_user: str = field(default_factory=lambda: _env("BASIC_AUTH_USER"))
    basic_auth_pass: str = field(default_factory=lambda: _env("BASIC_AUTH_PASS"))
    log_level: str = field(default_factory=lambda: _env("LOG_LEVEL", "INFO").upper())
    host: str = field(default_factory=lambda: _env("HOST", "0.0.0.0"))
    port: int = field(default_factory=lambda: int(_env("PORT", "9090")))
    threads: int = field(default_factory=lambda: int(_env("THREADS", "8")))
    # The HTTP server (see README: "Security")
    graceful_timeout: float = field(default_factory=lambda: float(_env("GRACEFUL_TIMEOUT", "30")))
    idle_connection_timeout: float = field(default_factory=lambda: float(_env("IDLE_CONNECTION_TIMEOUT", "30")))
    max_connections: int = field(default_factory=lambda: int(_env("MAX_CONNECTIONS", "200")))
    max_request_bytes: int = field(default_factory=lambda: int(_env("MAX_REQUEST_BYTES", str(32 * 2**20))))
    clip_model: str = field(default_factory=lambda: _env("CLIP_MODEL", DEFAULTS.clip_model))
    clip_pretrained: str = field(default_factory=lambda: _env("CLIP_PRETRAINED", DEFAULTS.clip_pretrained))
    dense_method: str = field(default_factory=lambda: _env("DENSE_METHOD", DEFAULTS.dense_method).lower())
    device: str = field(default_factory=lambda: _env("DEVICE", DEFAULTS.device).lower())
    inference_size: int = field(default_factory=lambda: int(_env("INFERENCE_SIZE", str(DEFAULTS.inference_size))))
    predict_batch_size: int = field(default_factory=lambda: int(_env("PREDICT_BATCH_SIZE",
                                                                     str(DEFAULTS.batch_size))))
    precision: str = field(default_factory=lambda: _env("PRECISION", DEFAULTS.precision).lower())
    runtime: str = field(default_factory=lambda: _env("RUNTIME", DEFAULTS.runtime).lower())
    allowed_image_hosts: tuple[str, ...] = field(
        default_factory=lambda: tuple(h for h in _env("ALLOWED_IMAGE_HOSTS").split(",") if h.strip()))
    max_image_bytes: int = field(default_factory=lambda: int(_env("MAX_IMAGE_BYTES", str(50 * 2**20))))
    max_image_pixels: int = field(default_factory=lambda: int(_env("MAX_IMAGE_PIXELS", str(64 * 2**20))))
    fetch_timeout: float = field(default_factory=lambda: float(_env("FETCH_TIMEOUT", "10")))
    fetch_deadline: float = field(default_factory=lambda: float(_env("FETCH_DEADLINE", "60")))
    fetch_threads: int = field(default_factory=lambda: int(_env("FETCH_THREADS", "4")))
    # Pixels one image may cost the model after resizing, in units of INFERENCE_SIZE² (see Predictor).
    max_inference_area: float = field(default_factory=lambda: float(_env("MAX_INFERENCE_AREA",
                                                                         str(DEFAULTS.max_area))))
    text_cache_vocabularies: int = field(default_factory=lambda: int(_env("TEXT_CACHE_VOCABULARIES",
                                                                          str(DEFAULTS.text_cache_vocabularies))))
    text_cache_disk_bytes: int = field(default_factory=lambda: int(_env("TEXT_CACHE_DISK_BYTES",
                                                                        str(DEFAULTS.text_cache_disk_bytes))))

    # Scores (see README: "Scores, review and active learning")
    # Unset: the zero-shot model's is fitted per vocabulary without labels (model.presence).
    temperature: float | None = field(default_factory=lambda: _optional_float("TEMPERATURE"))
    presence_weight: float = field(default_factory=lambda: float(_env("PRESENCE_WEIGHT",
                                                                      str(DEFAULTS.presence_weight))))
    task_score: str = field(default_factory=lambda: _env("TASK_SCORE", "mean"))
    unsure_below: float = field(default_factory=lambda: float(_env("UNSURE_BELOW", "0")))

    # Pre-labels (see README: "Pre-labels"); a label config's control tag may override the first two
    # Unset: 0 zero-shot (the presence prior decides), and what each version's training fitted on its annotations.
    min_region_score: float | None = field(default_factory=lambda: _optional_float("MIN_REGION_SCORE"))
    min_region_area: float = field(default_factory=lambda: float(_env("MIN_REGION_AREA", "0.01")))
    # The beta of the F-beta each training job's min_region_score maximises: under 1, fewer wrong regions kept.
    region_recall_weight: float = field(default_factory=lambda: float(_env("REGION_RECALL_WEIGHT", "1")))
    # Zero-shot, regions the frozen CLIP's whole-image view does not show are left unlabeled (model.presence).
    presence_cut: bool = field(default_factory=lambda: _flag("PRESENCE_CUT", True))
    # A region its own masked crop does not show to the frozen CLIP (nor, fine-tuned, to the version) is left
    # unlabeled (model.predictor).
    region_check: bool = field(default_factory=lambda: _flag("REGION_CHECK", True))
    refine_boundaries: bool = field(default_factory=lambda: _flag("REFINE_BOUNDARIES", DEFAULTS.refine_boundaries))
    # Interactive refinement (see README: "Clicks and boxes"): memory for the images annotators click on
    interactive_cache_bytes: int = field(default_factory=lambda: int(_env("INTERACTIVE_CACHE_BYTES",
                                                                          str(512 * 2**20))))

    # Learning from annotations (see README: "The learning loop")
    train_steps: int = field(default_factory=lambda: int(_env("TRAIN_STEPS", "300")))
    train_batch_size: int = field(default_factory=lambda: int(_env("TRAIN_BATCH_SIZE", "8")))
    train_lr: float = field(default_factory=lambda: float(_env("TRAIN_LR", "1e-3")))
    train_seed: int = field(default_factory=lambda: int(_env("TRAIN_SEED", "0")))
    train_paste: float = field(default_factory=lambda: float(_env("TRAIN_PASTE", "0.5")))
    text_diversification: bool = field(default_factory=lambda: _flag("TEXT_DIVERSIFICATION", True))
    distillation: bool = field(default_factory=lambda: _flag("DISTILLATION", True))
    synonym_threshold: float = field(default_factory=lambda: float(_env("SYNONYM_THRESHOLD", "0.1")))
    distill_weight: float = field(default_factory=lambda: float(_env("DISTILL_WEIGHT", "1.0")))
    # The frozen CLIP's share in a fine-tuned version's predictions (FC-CLIP's geometric ensemble):
    # for labels its training annotations showed, and for labels they never showed.
    ensemble_seen_weight: float = field(default_factory=lambda: float(_env("ENSEMBLE_SEEN_WEIGHT",
                                                                           str(DEFAULTS.seen_weight))))
    ensemble_unseen_weight: float = field(default_factory=lambda: float(_env("ENSEMBLE_UNSEEN_WEIGHT",
                                                                             str(DEFAULTS.unseen_weight))))
    train_after_annotations: int = field(default_factory=lambda: int(_env("TRAIN_AFTER_ANNOTATIONS", "0")))
    pinned_versions: dict = field(default_factory=lambda: _pins(_env("PINNED_VERSIONS")))
    max_training_jobs: int = field(default_factory=lambda: int(_env("MAX_TRAINING_JOBS", "1")))

    # The job queue (see README: "Past one machine"); without REDIS_URL everything runs in this process
    redis_url: str = field(default_factory=lambda: _env("REDIS_URL"))
    # The longest the service waits on Redis for one call (it never retries); workers wait longer themselves.
    redis_timeout_seconds: float = field(default_factory=lambda: float(_env("REDIS_TIMEOUT_SECONDS", "2")))
    predict_budget_seconds: float = field(default_factory=lambda: float(_env("PREDICT_BUDGET_SECONDS", "60")))
    queue_chunk_size: int = field(default_factory=lambda: int(_env("QUEUE_CHUNK_SIZE", "16")))
    queue_chunk_timeout: int = field(default_factory=lambda: int(_env("QUEUE_CHUNK_TIMEOUT", "1800")))
    queue_retries: int = field(default_factory=lambda: int(_env("QUEUE_RETRIES", "3")))
    worker_heartbeat_seconds: int = field(default_factory=lambda: int(_env("WORKER_HEARTBEAT_SECONDS", "30")))

    def __post_init__(self):
        self._check_choices()
        if not 0 <= self.unsure_below < 1:
            raise ValueError(f"UNSURE_BELOW must be a probability in [0, 1), not {self.unsure_below}")
        for name in ("min_region_score", "min_region_area"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name.upper()} must be in [0, 1), not {getattr(self, name)}")
        if self.region_recall_weight <= 0:
            raise ValueError(f"REGION_RECALL_WEIGHT must be positive, not {self.region_recall_weight}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"TEMPERATURE must be positive, not {self.temperature}")
        if self.presence_weight < 0:
            raise ValueError(f"PRESENCE_WEIGHT must be 0 or more, not {self.presence_weight}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            # Half a credential pair must not silently leave every endpoint open.
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        for name in ("ensemble_seen_weight", "ensemble_unseen_weight", "train_paste"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name.upper()} must be between 0 and 1, not {getattr(self, name)}")
        if self.max_training_jobs < 1:
            raise ValueError(f"MAX_TRAINING_JOBS must be at least 1, not {self.max_training_jobs}")
        self._check_queue()
        if self.max_inference_area < 1:
            raise ValueError(f"MAX_INFERENCE_AREA must be at least 1, not {self.max_inference_area}")

    def _check_choices(self) -> None:
        """Settings with a fixed set of values: a typo fails here, not as ``model_state: error`` later."""
        for name, choices in (("task_score", TASK_SCORES), ("precision", PRECISIONS), ("dense_method", DENSE_METHODS),
                              ("runtime", RUNTIMES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name.upper()} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")
        if self.runtime == "openvino" and not openvino_installed():
            raise ValueError(OPENVINO_MISSING)
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"DEVICE must be cpu, cuda, cuda:<n> or mps, not {self.device!r}")

    def _check_queue(self) -> None:
        for name in ("redis_timeout_seconds", "predict_budget_seconds", "queue_chunk_size", "queue_chunk_timeout",
                     "worker_heartbeat_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.upper()} must be positive, not {getattr(self, name)}")
        if self.queue_retries < 0:
            raise ValueError(f"QUEUE_RETRIES must be 0 or more, not {self.queue_retries}")

    def to_env(self) -> dict[str, str]:
        """These settings as the environment variables that reproduce them (for child processes)."""
        env = {}
        for name, value in self.__dict__.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, dict):
                value = ",".join(f"{k}:{v}" for k, v in value.items())
            elif value is None:
                value = ""
            env[name.upper()] = str(value)
        return env

    def model_config(self) -> ModelConfig:
        """The model these settings choose (:func:`model.build.load_model`)."""
        return ModelConfig(clip_model=self.clip_model, clip_pretrained=self.clip_pretrained, device=self.device,
                           dense_method=self.dense_method, seen_weight=self.ensemble_seen_weight,
                           unseen_weight=self.ensemble_unseen_weight, inference_size=self.inference_size,
                           batch_size=self.predict_batch_size, max_area=self.max_inference_area,
                           temperature=self.temperature, presence_weight=self.presence_weight,
                           precision=self.precision, runtime=self.runtime,
                           refine_boundaries=self.refine_boundaries, cache_dir=self.cache_dir,
                           text_cache_vocabularies=self.text_cache_vocabularies,
                           text_cache_disk_bytes=self.text_cache_disk_bytes)

    def region_rules(self, fitted_min_score: float | None = None, zero_shot: bool = True) -> RegionRules:
        """The pruning of pre-labels whose control tag sets none of its own: ``MIN_REGION_SCORE`` if set, else
        the ``fitted_min_score`` of the version serving (None: 0); ``REGION_CHECK``, and zero-shot ``PRESENCE_CUT``
        too."""
        min_score = self.min_region_score if self.min_region_score is not None else fitted_min_score
        return RegionRules(min_score or 0.0, self.min_region_area, presence_cut=zero_shot and self.presence_cut,
                           region_check=self.region_check)

    @property
    def cache_dir(self) -> Path:
        return self.model_dir / "cache"
