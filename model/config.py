"""What a deployment chooses about the model, with every default in one place, and no torch.

The backend's settings read these at startup (and check the choices) before any model code is
imported: the container's health check and ``python -m backend --help`` import this, not torch.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path

# Ways to make a CLIP image tower's per-location features text-aligned (model.dense.DENSE_TOWERS builds them).
DENSE_METHODS = ("clearclip", "maskclip")
PRECISIONS = ("auto", "bf16", "fp32")
# What runs the frozen image tower (model.openvino_tower.resolve_runtime): auto is OpenVINO on a CPU where installed.
RUNTIMES = ("auto", "openvino", "torch")


def openvino_installed() -> bool:
    """Whether the optional OpenVINO runtime is installed (``pip install -r requirements-openvino.txt``)."""
    return importlib.util.find_spec("openvino") is not None


OPENVINO_MISSING = ("RUNTIME=openvino needs the openvino package: pip install -r requirements-openvino.txt "
                    "(or set RUNTIME=auto to use it only where installed)")


@dataclass(frozen=True)
class RegionRules:
    """What a predicted region must be to be kept (:mod:`model.regions`).

    Attributes:
        min_score: the least mean calibrated confidence of a label's pixels; below it they are unlabeled.
        min_area: the least fraction of the image a label covers; below it its pixels go to the
            best label that stays.
        reassign_unlikely: an unlikely label's pixels go to the best label that stays too, instead of
            being unlabeled (measured worse; kept for ``bench.prelabel_quality``'s comparison).
        unscored: the labels (vocabulary indices) ``min_score`` spares: those a fine-tuned version's
            annotations never showed, which the rule it fitted on them knows nothing of.
        presence_cut: a label the frozen CLIP's whole-image view does not count among the image's
            (:func:`model.presence.shown_labels`), and less sure than the labels it does count, is left
            unlabeled; zero-shot only (a fine-tuned version knows labels that view does not).
        region_check: a region whose label the frozen CLIP's view of the region itself (its masked crop) does not
            count among the crop's labels is left unlabeled (:meth:`model.predictor.Predictor.check_regions`); a
            fine-tuned version's, only if the version's own view of the crop does not count it either.
    """

    min_score: float = 0.0
    min_area: float = 0.0
    reassign_unlikely: bool = False
    unscored: tuple[int, ...] = ()
    presence_cut: bool = False
    region_check: bool = False


NO_PRUNING = RegionRules()


@dataclass(frozen=True)
class ModelConfig:
    """What a deployment chooses about the model (the backend fills it from its settings).

    Attributes:
        clip_model, clip_pretrained, device: see :func:`model.clip.load_clip`.
        dense_method, seen_weight, unseen_weight: see :func:`model.segmenter.build_segmenter`.
        inference_size, batch_size, max_area, precision, refine_boundaries: see
            :class:`model.predictor.Predictor`.
        runtime: what runs the frozen image tower (:func:`model.openvino_tower.resolve_runtime`).
        temperature: the zero-shot model's (None: fitted per vocabulary without labels,
            :mod:`model.presence`); a fine-tuned version carries the one its training fitted.
        presence_weight: the weight of the frozen CLIP's image-level presence prior (:mod:`model.presence`).
        cache_dir: where text embeddings are cached on disk (None: memory only), within
            ``text_cache_disk_bytes``; ``text_cache_vocabularies`` label sets stay in memory.
    """

    clip_model: str = "ViT-B-16"
    clip_pretrained: str = "openai"
    device: str = "cpu"
    dense_method: str = "clearclip"
    seen_weight: float = 0.35
    unseen_weight: float = 0.8
    inference_size: int = 448
    batch_size: int = 8
    max_area: float = 4.0
    temperature: float | None = None
    presence_weight: float = 0.5
    precision: str = "auto"
    runtime: str = "auto"
    refine_boundaries: bool = True
    cache_dir: Path | None = None
    text_cache_vocabularies: int = 64
    text_cache_disk_bytes: int = 256 * 2**20

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


DEFAULTS = ModelConfig()


def model_identity(clip_identity: str, dense_method: str) -> str:
    """What a trained decoder depends on: the CLIP (model and weights) and the dense method that shapes its
    features, e.g. ``ViT-B-16/openai+clearclip``. Checkpoints and model versions carry it."""
    return f"{clip_identity}+{dense_method}"
