"""The fast open-vocabulary segmenter: one image-tower pass, a light decoder, text classification.

    CLIP image tower ──▶ dense zero-shot embeddings Z, feature maps
                          │
    DenseDecoder ────────▶ E = Z + Δ(features, Z)      (Δ starts at exactly 0)
                          │
    text embeddings T ──▶ logits = τ · cos(E, T)       (per pixel, per class)

Because the decoder's output layer is zero-initialised, an untrained segmenter
reproduces the zero-shot dense-CLIP predictions exactly (no regression on day one).
Fine-tuning moves E for the annotated classes while the distillation regulariser
(:mod:`model.losses`) keeps region embeddings close to the frozen CLIP's.
"""
from __future__ import annotations

import copy
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn


class DenseDecoder(nn.Module):
    """A light fusion head that predicts a residual Δ to the dense CLIP embeddings.

    Args:
        feature_dims: channels of each tower feature map.
        embed_dim: CLIP joint-space width D.
        hidden: decoder width.
    """

    def __init__(self, feature_dims: list[int], embed_dim: int, hidden: int = 128):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in feature_dims)
        self.from_dense = nn.Conv2d(embed_dim, hidden, 1)
        self.fuse = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(8, hidden), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(8, hidden), nn.GELU(),
        )
        self.out = nn.Conv2d(hidden, embed_dim, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: list[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """features: [(B, C_i, h_i, w_i)]; dense: (B, D, h, w) → Δ (B, D, h, w)."""
        size = dense.shape[-2:]
        x = self.from_dense(F.normalize(dense, dim=1))
        for lateral, feature in zip(self.lateral, features):
            x = x + F.interpolate(lateral(feature), size=size, mode="bilinear", align_corners=False)
        return self.out(self.fuse(x))


class Segmenter(nn.Module):
    """CLIP image tower → decoder → per-pixel class logits against given text embeddings.

    Args:
        image_tower: a dense tower from :func:`model.dense.build_dense_tower` (frozen by default).
        decoder: a :class:`DenseDecoder`.
        logit_scale: initial temperature τ (CLIP's own, e.g. 100).
    """

    def __init__(self, image_tower: nn.Module, decoder: DenseDecoder, logit_scale: float = 100.0):
        super().__init__()
        self.image_tower = image_tower
        self.decoder = decoder
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))
        self.stride = image_tower.stride

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) → (fine-tuned E, zero-shot Z), both (B, D, h, w) and L2-normalised."""
        tower_frozen = not any(p.requires_grad for p in self.image_tower.parameters())
        with torch.no_grad() if tower_frozen else nullcontext():
            out = self.image_tower(images)
        tuned = out.dense + self.decoder(out.features, out.dense)
        return F.normalize(tuned, dim=1), F.normalize(out.dense, dim=1)

    def classify(self, embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """embeddings (B, D, h, w), text (C, D) normalised → logits (B, C, h, w)."""
        return self.log_logit_scale.exp() * torch.einsum("bdhw,cd->bchw", embeddings, text.to(embeddings))

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), text (C, D) → logits (B, C, H/stride, W/stride)."""
        tuned, _ = self.embed(images)
        return self.classify(tuned, text)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters fine-tuning changes (the decoder, the temperature, any unfrozen tower part)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad} | {
            n for n in self.state_dict() if n.startswith("decoder.")}
        return {n: t.detach().cpu().clone() for n, t in self.state_dict().items() if n in names}


def build_segmenter(clip, hidden: int = 128, unfreeze_blocks: int = 0, seed: int = 0,
                    dense_method: str = "clearclip") -> Segmenter:
    """A segmenter on top of a loaded :class:`model.clip.Clip` (the tower is shared, frozen by default).

    The decoder's initialisation depends only on ``seed``.
    """
    from model.dense import build_dense_tower

    visual = clip.model.visual
    if unfreeze_blocks:
        if not hasattr(visual, "transformer"):
            raise NotImplementedError("unfreezing blocks is supported for ViT towers")
        visual = copy.deepcopy(visual)  # the frozen original stays CLIP's (the distillation teacher)
    tower = build_dense_tower(visual, dense_method)
    for p in tower.parameters():
        p.requires_grad_(False)
    for block in visual.transformer.resblocks[len(visual.transformer.resblocks) - unfreeze_blocks:] \
            if unfreeze_blocks else []:
        for p in block.parameters():
            p.requires_grad_(True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        decoder = DenseDecoder(tower.feature_dims, tower.embed_dim, hidden)
    scale = float(clip.model.logit_scale.detach().exp()) if hasattr(clip.model, "logit_scale") else 100.0
    return Segmenter(tower, decoder, logit_scale=scale).eval()
