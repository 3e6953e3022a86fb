"""Building the model in one call: CLIP → segmenter → predictor.

    model = load_model(ModelConfig(clip_model="ViT-B-16", clip_pretrained="openai"))
    zero_shot = model.predictor()                           # the untrained segmenter
    tuned = model.load_predictor("projects/12/v3.pt")       # a fine-tuned version
    segmenter = model.segmenter(seed=0)                     # to fine-tune

Every segmenter and predictor built from one :class:`SegmentationModel` shares its CLIP
(the frozen tower) and its text-embedding cache; only the small decoders differ.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import load_checkpoint
from model.clip import Clip, load_clip
from model.predictor import Predictor
from model.segmenter import Segmenter, build_segmenter
from model.vocabulary import TextEncoder


@dataclass(frozen=True)
class ModelConfig:
    """What a deployment chooses about the model (the backend fills it from its settings).

    Attributes:
        clip_model, clip_pretrained, device: see :func:`model.clip.load_clip`.
        dense_method, seen_weight, unseen_weight: see :func:`model.segmenter.build_segmenter`.
        inference_size, batch_size, max_area, precision, refine_boundaries: see
            :class:`model.predictor.Predictor`.
        temperature: the zero-shot model's; a fine-tuned version carries the one its training fitted.
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
    temperature: float = 1.0
    precision: str = "auto"
    refine_boundaries: bool = False
    cache_dir: Path | None = None
    text_cache_vocabularies: int = 64
    text_cache_disk_bytes: int = 256 * 2**20

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


class SegmentationModel:
    """A loaded CLIP with its text encoder; builds the segmenters and predictors that share them."""

    def __init__(self, clip: Clip, config: ModelConfig | None = None, encoder: TextEncoder | None = None):
        self.clip = clip
        self.config = config or ModelConfig()
        self.encoder = encoder or TextEncoder(clip, cache_dir=self.config.cache_dir,
                                              max_vocabularies=self.config.text_cache_vocabularies,
                                              max_disk_bytes=self.config.text_cache_disk_bytes)

    @property
    def name(self) -> str:
        """The CLIP's identity, e.g. ``ViT-B-16/openai``: checkpoints and model versions carry it."""
        return self.clip.identity

    def segmenter(self, seed: int = 0, **options) -> Segmenter:
        """A new, untrained segmenter (``options``: :func:`build_segmenter`'s, over the config's)."""
        config = self.config
        options = {"dense_method": config.dense_method, "seen_weight": config.seen_weight,
                   "unseen_weight": config.unseen_weight, **options}
        return build_segmenter(self.clip, seed=seed, **options)

    def predictor(self, segmenter: Segmenter | None = None, temperature: float | None = None) -> Predictor:
        """A predictor for ``segmenter`` (default: a new untrained one, i.e. zero-shot)."""
        config = self.config
        return Predictor(segmenter if segmenter is not None else self.segmenter(), self.encoder,
                         inference_size=config.inference_size, batch_size=config.batch_size, device=config.device,
                         temperature=config.temperature if temperature is None else temperature,
                         max_area=config.max_area, precision=config.precision,
                         refine_boundaries=config.refine_boundaries)

    def load_predictor(self, checkpoint: str | Path) -> Predictor:
        """The predictor of a fine-tuned version, at the temperature its training fitted.

        Raises:
            model.checkpoint.CheckpointError: the file can't serve this CLIP.
        """
        segmenter = self.segmenter()
        metadata = load_checkpoint(checkpoint, segmenter, self.clip.identity)
        return self.predictor(segmenter, temperature=metadata.get("temperature", 1.0))


def load_model(config: ModelConfig) -> SegmentationModel:
    """Load the CLIP the config names (see :func:`model.clip.load_clip` for its errors)."""
    return SegmentationModel(load_clip(config.clip_model, config.clip_pretrained, config.device), config)
