"""Training losses: per-pixel classification with text diversification, and text-guided distillation.

Shapes: B images, C classes, D joint-space width, h×w feature grid, H×W label grid,
R regions (one per class present in an image).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.vocabulary import BACKGROUND


def diversified_logits(embeddings: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                       region_masks: list[torch.Tensor], region_classes: list[torch.Tensor],
                       region_text: list[torch.Tensor] | None, size: tuple[int, int]) -> torch.Tensor:
    """Per-pixel logits (B, C, H, W); inside each region the class's column uses the region's synonym.

    Args:
        embeddings: (B, D, h, w) normalised pixel embeddings.
        text: (C, D) normalised class embeddings (the label names).
        region_masks: per image (R_b, H, W) bool.
        region_classes: per image (R_b,) class indices.
        region_text: per image (R_b, D) embeddings of the synonym drawn for each region, or None
            for plain training.
        size: (H, W) of the label maps.
    """
    logits = logit_scale * torch.einsum("bdhw,cd->bchw", embeddings, text)
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    if region_text is None:
        return logits
    rows = []
    for b in range(embeddings.shape[0]):
        if len(region_classes[b]) == 0:
            rows.append(logits[b])
            continue
        synonym = logit_scale * torch.einsum("dhw,rd->rhw", embeddings[b], region_text[b])
        synonym = F.interpolate(synonym[None], size=size, mode="bilinear", align_corners=False)[0]
        row = logits[b].clone()
        for mask, cls, syn in zip(region_masks[b], region_classes[b], synonym, strict=True):
            row[cls] = torch.where(mask, syn, row[cls])
        rows.append(row)
    return torch.stack(rows)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, others: int = 0) -> torch.Tensor:
    """Cross-entropy over classes, averaged over the pixels it reads.

    Args:
        logits: (B, C, H, W); the last ``others`` classes are other things the images show.
        labels: (B, H, W) class indices; ``UNLABELED`` pixels are not read; ``BACKGROUND`` pixels (with
            ``others``) are one of the other things, whichever: their loss is ``-log Σ_o p_o``.
    """
    labels = labels.long()
    named = labels >= 0
    background = labels == BACKGROUND if others else torch.zeros_like(named)
    if not (named | background).any():
        return logits.sum() * 0
    log_p = logits.log_softmax(1)
    loss = -log_p.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    if others:
        loss = torch.where(background, -log_p[:, -others:].logsumexp(1), loss)
    return loss[named | background].mean()


def pool_regions(embeddings: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mask-average pooling: embeddings (D, h, w), masks (R, H, W) bool → normalised (R, D)."""
    weights = F.adaptive_avg_pool2d(masks[None].float(), embeddings.shape[-2:])[0]  # (R, h, w) coverage
    pooled = torch.einsum("dhw,rhw->rd", embeddings, weights) / weights.sum((1, 2)).clamp(min=1e-6)[:, None]
    return F.normalize(pooled, dim=-1)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Plain knowledge distillation: mean squared distance of normalised (R, D) embeddings."""
    return ((student - teacher) ** 2).sum(-1).mean()


def text_guided_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, text: torch.Tensor,
                                  scale: torch.Tensor) -> torch.Tensor:
    """Pull the student-teacher similarity matrix of one image's regions towards their text similarities.

    Args:
        student, teacher: (R, D) normalised region embeddings.
        text: (R, D) normalised embeddings of each region's (diversified) class name.
        scale: learned scalar τ relating text-text to image-image similarities.

    Returns:
        mean over (i, j) of (τ · w_i·w_j − s_i·t_j)².
    """
    return ((scale * text @ text.T - student @ teacher.T) ** 2).mean()
