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

At inference a fine-tuned segmenter combines both classifiers of the same pass, as
FC-CLIP's geometric ensemble does (Yu et al., NeurIPS 2023): a class it was trained on
scores ``(1-α_c)·log p_tuned + α_c·log p_frozen``, a class it never saw ``(1-β)·log p_tuned +
β·log p_frozen``. Training never tells the decoder anything about the unseen classes, so
their scores come (mostly) from the frozen CLIP, and no correction of other labels can
erase them. Among the classes it was trained on, ``α_c = α · trust_c``, where ``trust_c`` is how
much of class c's annotated pixels the frozen CLIP names right on its own
(:func:`model.calibration.fit_frozen_trust`): a frozen CLIP that never sees a class would only veto
what its annotations taught. The trust decides *which* trained class a pixel is, not *whether* it is
one: how much of a pixel goes to the trained classes as a group, and how it splits among the others,
stays the α/β ensemble's, since no annotation shows what the frozen CLIP's veto keeps of the classes
nobody annotated (:class:`EnsembleWeights`).

The same pass also classifies the CLIP's own global image embedding (the frozen CLIP's
image-level probability of each label), which the predictor uses as a presence prior
(:mod:`model.presence`).
"""
from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.clip import normalize_pixels
from model.config import DEFAULTS


@dataclass(frozen=True)
class EnsembleWeights:
    """The frozen CLIP's share in a fine-tuned segmenter's scores, (C,) each.

    Attributes:
        label: in each trained class's score among the trained classes (α · trust_c).
        group: in every class's score for the split between trained and untrained classes, and among the
            untrained ones (α trained, β untrained).
        seen: the classes fine-tuning saw.
    """

    label: torch.Tensor
    group: torch.Tensor
    seen: torch.Tensor

    @classmethod
    def frozen_only(cls, count: int) -> EnsembleWeights:
        """The frozen CLIP's scores alone."""
        return cls(torch.ones(count), torch.ones(count), torch.zeros(count, dtype=torch.bool))

    def combine(self, tuned: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) log-probabilities of both classifiers → the ensemble's, normalised over C."""
        group, label = (w.to(tuned).view(1, -1, 1, 1) for w in (self.group, self.label))
        flat = ((1 - group) * tuned + group * frozen).log_softmax(1)
        if not self.seen.any():
            return flat
        seen = self.seen.to(tuned.device).view(1, -1, 1, 1)
        mass = flat.masked_fill(~seen, -math.inf).logsumexp(1, keepdim=True)  # the trained classes' share
        own = ((1 - label) * tuned + label * frozen).masked_fill(~seen, -math.inf).log_softmax(1)
        return torch.where(seen, mass + own, flat)


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
        for lateral, feature in zip(self.lateral, features, strict=True):
            x = x + F.interpolate(lateral(feature), size=size, mode="bilinear", align_corners=False)
        return self.out(self.fuse(x))


class Segmenter(nn.Module):
    """CLIP image tower → decoder → per-pixel class logits against given text embeddings.

    Args:
        image_tower: a dense tower from :func:`model.dense.build_dense_tower` (frozen by default).
        decoder: a :class:`DenseDecoder`.
        logit_scale: initial temperature τ (CLIP's own, e.g. 100).
        seen_weight, unseen_weight: the frozen CLIP's share in the ensemble (see the module docstring).
        pixel_mean, pixel_std: the RGB normalisation (0-1 scale) the CLIP tower was trained with.
        native_size: the CLIP's own input side (pixels), at which it sees one region's crop.
    """

    def __init__(self, image_tower: nn.Module, decoder: DenseDecoder, logit_scale: float = 100.0,
                 seen_weight: float = 0.35, unseen_weight: float = 0.8,
                 pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
                 pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5), native_size: int = 224):
        super().__init__()
        # Not persistent: they come from the CLIP, which a checkpoint names rather than stores.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std), persistent=False)
        self.image_tower = image_tower
        self.decoder = decoder
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))
        self.frozen_logit_scale = logit_scale  # the frozen CLIP's own temperature, never trained
        self.stride = image_tower.stride
        self.native_size = native_size
        # The labels fine-tuning saw (None: not fine-tuned), the ensemble's weights of the frozen CLIP for
        # seen (α) and unseen (β) classes, and its trust in each seen one; see the module docstring.
        self.trained_labels: tuple[str, ...] | None = None
        self.frozen_trust: dict[str, float] = {}
        self.seen_weight = seen_weight
        self.unseen_weight = unseen_weight
        # The frozen tower compiled for another runtime (model.openvino_tower), in training too.
        self.compiled_tower = None

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) RGB values 0-255 (uint8 or float) → (B, 3, H, W) float, normalised for the tower (on its device)."""
        return normalize_pixels(images.to(self.pixel_mean.device), self.pixel_mean, self.pixel_std)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) → (fine-tuned E, zero-shot Z), both (B, D, h, w) and L2-normalised."""
        tuned, frozen, _ = self._embed(images)
        return tuned, frozen

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`embed`, and the CLIP's global image embedding (B, D), L2-normalised."""
        tower_frozen = not any(p.requires_grad for p in self.image_tower.parameters())
        compiled = self.compiled_tower is not None and tower_frozen  # no gradient goes through it
        with torch.no_grad() if tower_frozen else nullcontext():
            out = (self.compiled_tower if compiled else self.image_tower)(images)
        tuned = out.dense + self.decoder(out.features, out.dense)
        return F.normalize(tuned, dim=1), F.normalize(out.dense, dim=1), F.normalize(out.image, dim=-1)

    def classify(self, embeddings: torch.Tensor, text: torch.Tensor, scale=None) -> torch.Tensor:
        """embeddings (B, D, h, w), text (C, D) normalised → logits (B, C, h, w), at ``scale``
        (default: the learned temperature)."""
        scale = self.log_logit_scale.exp() if scale is None else scale
        return scale * torch.einsum("bdhw,cd->bchw", embeddings, text.to(embeddings))

    def forward(self, images: torch.Tensor, text: torch.Tensor, frozen_weights: EnsembleWeights | None = None,
                with_embeddings: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), text (C, D) → (logits (B, C, H/stride, W/stride), the frozen CLIP's
        image-level logits (B, C) at its own logit scale).

        With ``frozen_weights`` (:meth:`ensemble_weights`, or :meth:`EnsembleWeights.frozen_only`), the
        geometric ensemble of the fine-tuned and frozen classifiers, as log-probabilities.
        ``with_embeddings``: the fine-tuned embeddings E follow as D more channels, (B, C + D, H/stride, W/stride).
        """
        tuned, frozen, image = self._embed(images)
        logits = self.classify(tuned, text)
        if frozen_weights is not None:
            frozen_logits = self.classify(frozen, text, self.frozen_logit_scale)
            logits = frozen_weights.combine(logits.log_softmax(1), frozen_logits.log_softmax(1))
        image_logits = self.frozen_logit_scale * image @ text.to(image).T
        return (torch.cat([logits, tuned], 1) if with_embeddings else logits), image_logits

    def ensemble_weights(self, labels: tuple[str, ...]) -> EnsembleWeights | None:
        """The frozen CLIP's share in the ensemble of each of ``labels``: α times its trust in a label
        fine-tuning saw (1 where none was fitted) among those, α and β between the two groups; None for a
        segmenter that was not fine-tuned."""
        if self.trained_labels is None:
            return None
        seen = torch.tensor([label in set(self.trained_labels) for label in labels])
        group = torch.where(seen, self.seen_weight, self.unseen_weight).float()
        trust = torch.tensor([self.frozen_trust.get(label, 1.0) for label in labels])
        return EnsembleWeights(torch.where(seen, group * trust, group), group, seen)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters fine-tuning changes (the decoder, the temperature, any unfrozen tower part)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad} | {
            n for n in self.state_dict() if n.startswith("decoder.")}
        return {n: t.detach().cpu().clone() for n, t in self.state_dict().items() if n in names}


def build_segmenter(clip, hidden: int = 128, unfreeze_blocks: int = 0, seed: int = 0,
                    dense_method: str = DEFAULTS.dense_method, seen_weight: float = DEFAULTS.seen_weight,
                    unseen_weight: float = DEFAULTS.unseen_weight) -> Segmenter:
    """A segmenter on top of a loaded :class:`model.clip.Clip` (the tower is shared, frozen by default).

    The decoder's initialisation depends only on ``seed``. ``seen_weight`` / ``unseen_weight``:
    the frozen CLIP's share in the inference ensemble for classes fine-tuning saw / never saw.
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
    return Segmenter(tower, decoder, logit_scale=scale, seen_weight=seen_weight, unseen_weight=unseen_weight,
                     pixel_mean=clip.mean, pixel_std=clip.std, native_size=clip.image_size).eval()
