"""Loading open_clip models by name or config file, with weights by pretrained tag or checkpoint file."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"  # explicit opt-in to untrained weights (timing benchmarks only)


class ClipWeightsMissing(RuntimeError):
    """The requested CLIP weights are not available on this machine."""


@dataclass
class Clip:
    """A loaded open_clip model with what inference needs around it.

    Attributes:
        model: the ``open_clip.CLIP`` module, in eval mode.
        tokenizer: callable ``list[str] -> LongTensor (N, context_length)``.
        mean, std: the image normalisation the weights were trained with (RGB, 0-1 scale).
        image_size: the tower's native input size (pixels, square).
        identity: a short string naming model and weights, used in cache keys and model versions.
    """

    model: torch.nn.Module
    tokenizer: object
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    identity: str

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB → (B, 3, H, W) float, normalised as the weights were trained."""
        return normalize_pixels(images, torch.tensor(self.mean), torch.tensor(self.std))


def normalize_pixels(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) RGB values 0-255 (uint8 or float) → (B, 3, H, W) float: scaled to 0-1, then ``(x - mean) / std``
    per channel."""
    pixels = images.permute(0, 3, 1, 2).to(torch.float32, copy=True).div_(255)  # never the caller's tensor
    return (pixels - mean.to(pixels.device).view(1, 3, 1, 1)) / std.to(pixels.device).view(1, 3, 1, 1)


def open_clip_name(model: str) -> str:
    """Accept an open_clip model name, or the path of a model-config JSON (registered under its stem)."""
    import open_clip

    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise ClipWeightsMissing(f"CLIP_MODEL config file not found: {path}")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise ClipWeightsMissing(
            f"unknown open_clip model {model!r}: set CLIP_MODEL to one of open_clip.list_models() "
            "or to the path of a model-config JSON file"
        )
    return model


def _weights_identity(pretrained: str) -> str:
    path = Path(pretrained)
    if path.is_file():
        stat = path.stat()
        digest = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:8]
        return f"{path.stem}-{digest}"
    return pretrained


def clip_identity(model: str, pretrained: str) -> str:
    """The short name of a (model, weights) pair, known without loading anything."""
    name = Path(model).stem if model.endswith(".json") else model
    return f"{name}/{_weights_identity(pretrained)}"


def _weights(name: str, pretrained: str) -> str | None:
    """What open_clip's ``pretrained`` argument gets: a tag, a file, or None for random weights."""
    import open_clip

    if pretrained == RANDOM_WEIGHTS:
        return None
    looks_like_file = any(s in pretrained for s in ("/", "\\")) or Path(pretrained).suffix in (".pt", ".bin", ".safetensors", ".pth")
    if looks_like_file:
        if not Path(pretrained).is_file():
            raise ClipWeightsMissing(
                f"CLIP_PRETRAINED checkpoint file not found: {pretrained}. Point CLIP_PRETRAINED at an "
                f"open_clip checkpoint for {name} (a .pt/.bin/.safetensors state dict)."
            )
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ClipWeightsMissing(
            f"{name} has no pretrained tag {pretrained!r}; known tags: {', '.join(tags) or 'none'}. "
            "Set CLIP_PRETRAINED to one of them or to a local checkpoint file."
        )
    return pretrained


def load_clip(model: str = "ViT-B-16", pretrained: str = "openai", device: str | torch.device = "cpu") -> Clip:
    """Create an open_clip model and load its weights.

    Args:
        model: an open_clip model name (``ViT-B-16``) or a model-config JSON path.
        pretrained: a pretrained tag (``openai``, ``laion2b_s34b_b88k``), a checkpoint file,
            or ``"random"`` for untrained weights.
        device: where to put the model.

    Raises:
        ClipWeightsMissing: with what to set when the model or its weights can't be had.
    """
    import open_clip

    name = open_clip_name(model)
    weights = _weights(name, pretrained)
    try:
        with torch.random.fork_rng(devices=[]):
            if weights is None:  # random weights, the same in every run: what a benchmark times depends on them
                torch.manual_seed(0)  # (how many labels survive pruning, so the post-processing's cost)
            clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
    except Exception as error:  # open_clip raises several kinds when a download is impossible
        raise ClipWeightsMissing(
            f"could not load CLIP weights {pretrained!r} for {name}: {error}. Without internet, download the "
            f"checkpoint elsewhere (e.g. open_clip.create_model('{name}', pretrained='{pretrained}') fills "
            "~/.cache/huggingface), copy it here and set CLIP_PRETRAINED=/path/to/checkpoint; or set "
            "CLIP_MODEL/CLIP_PRETRAINED to the demo model (see README)."
        ) from error
    clip.eval()
    normalize = [t for t in preprocess.transforms if t.__class__.__name__ == "Normalize"][0]
    image_size = clip.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    identity = clip_identity(model, pretrained)
    log.info("loaded CLIP %s (image size %d)", identity, image_size)
    return Clip(
        model=clip,
        tokenizer=open_clip.get_tokenizer(name),
        mean=tuple(normalize.mean),
        std=tuple(normalize.std),
        image_size=int(image_size),
        identity=identity,
    )
