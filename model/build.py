"""Building the model in one call: CLIP → segmenter → predictor.

    model = load_model(ModelConfig(clip_model="ViT-B-16", clip_pretrained="openai"))
    zero_shot = model.predictor()                           # the untrained segmenter
    tuned = model.load_predictor("projects/12/v3.pt")       # a fine-tuned version
    segmenter = model.segmenter(seed=0)                     # to fine-tune

Every segmenter and predictor built from one :class:`SegmentationModel` shares its CLIP
(the frozen tower) and its text-embedding cache; only the small decoders differ.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from model.clip import Clip, load_clip
from model.config import ModelConfig, model_identity
from model.openvino_tower import OpenVinoTower, resolve_runtime
from model.predictor import Predictor, uses_bf16
from model.segmenter import Segmenter, build_segmenter
from model.vocabulary import TextEncoder


class SegmentationModel:
    """A loaded CLIP with its text encoder; builds the segmenters and predictors that share them."""

    def __init__(self, clip: Clip, config: ModelConfig | None = None, encoder: TextEncoder | None = None):
        self.clip = clip
        self.config = config or ModelConfig()
        self.encoder = encoder or TextEncoder(clip, cache_dir=self.config.cache_dir,
                                              max_vocabularies=self.config.text_cache_vocabularies,
                                              max_disk_bytes=self.config.text_cache_disk_bytes)
        self._compiled_towers: dict[str | None, OpenVinoTower] = {}

    @property
    def identity(self) -> str:
        """What its features depend on, e.g. ``ViT-B-16/openai+clearclip``: checkpoints and model versions
        carry it (:func:`model.config.model_identity`)."""
        return model_identity(self.clip.identity, self.config.dense_method)

    def segmenter(self, seed: int = 0, **options) -> Segmenter:
        """A new, untrained segmenter (``options``: :func:`build_segmenter`'s, over the config's), its frozen tower
        run by the configured runtime, in training as in inference."""
        config = self.config
        options = {"dense_method": config.dense_method, "seen_weight": config.seen_weight,
                   "unseen_weight": config.unseen_weight, **options}
        segmenter = build_segmenter(self.clip, seed=seed, **options)
        self._compile_tower(segmenter)
        return segmenter

    def predictor(self, segmenter: Segmenter | None = None, temperature: float | None = None) -> Predictor:
        """A predictor for ``segmenter`` (default: a new untrained one, i.e. zero-shot), its frozen tower run by
        the configured runtime (:func:`model.openvino_tower.resolve_runtime`)."""
        config = self.config
        segmenter = segmenter if segmenter is not None else self.segmenter()
        self._compile_tower(segmenter)
        return Predictor(segmenter, self.encoder,
                         inference_size=config.inference_size, batch_size=config.batch_size, device=config.device,
                         temperature=config.temperature if temperature is None else temperature,
                         max_area=config.max_area, precision=config.precision,
                         refine_boundaries=config.refine_boundaries,
                         presence_weight=config.presence_weight)

    def _compile_tower(self, segmenter: Segmenter) -> None:
        """Give ``segmenter`` the CLIP's tower compiled for the runtime, where it runs the CLIP's own frozen tower
        (a version that fine-tuned tower blocks runs them in torch). Compiled once per dense method."""
        device = torch.device(self.config.device)
        tower = segmenter.image_tower
        if (resolve_runtime(self.config.runtime, device) != "openvino" or tower.visual is not self.clip.model.visual
                or any(p.requires_grad for p in tower.parameters())):
            return
        method = getattr(tower, "method", None)  # a ResNet tower has one
        if method not in self._compiled_towers:
            self._compiled_towers[method] = OpenVinoTower(tower, uses_bf16(self.config.precision, device))
        segmenter.compiled_tower = self._compiled_towers[method]

    def load_predictor(self, checkpoint: str | Path) -> Predictor:
        """The predictor of a fine-tuned version, at the temperature, presence weight, trust in the frozen CLIP and
        confidence scale its training fitted.

        Raises:
            model.checkpoint.CheckpointError: the file can't serve this model (another CLIP or dense method).
        """
        segmenter = self.segmenter()
        metadata = load_checkpoint(checkpoint, segmenter, self.identity)
        predictor = self.predictor(segmenter, temperature=metadata.get("temperature", 1.0))
        predictor.presence_weight = metadata.get("presence_weight", predictor.presence_weight)
        segmenter.frozen_trust = metadata.get("frozen_trust", {})  # versions from before it: α for every label
        scale = metadata.get("confidence_scale")  # versions from before it serve the confidences as they come
        predictor.confidence_scale = tuple(scale) if scale else None
        return predictor


def load_model(config: ModelConfig) -> SegmentationModel:
    """Load the CLIP the config names (see :func:`model.clip.load_clip` for its errors)."""
    return SegmentationModel(load_clip(config.clip_model, config.clip_pretrained, config.device), config)
