"""Confidence calibration: temperature scaling and expected calibration error (task scores:
:mod:`model.task_scores`).

A pixel's confidence is its winning class's softmax probability. Temperature scaling divides
the logits by one scalar T fitted to minimise the negative log-likelihood of annotated pixels;
it never changes which class wins, only how sure the model says it is.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _flatten(logits: list[torch.Tensor], labels: list[np.ndarray], max_pixels: int, seed: int,
             max_side: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Annotated pixels of every image as (N, C) logits and (N,) classes, subsampled to ``max_pixels``.

    ``logits[i]`` is (C, h, w); ``labels[i]`` is (H, W) with negative values where unannotated.
    The logits are upsampled bilinearly as for prediction, to the labels' size scaled down to
    at most ``max_side`` on the short side (the labels nearest-resampled to match), so the fit
    sees the same boundary pixels the served predictions have.
    """
    rows, targets = [], []
    for out, label in zip(logits, labels, strict=True):
        scale = min(1.0, max_side / min(label.shape))
        size = (max(1, round(label.shape[0] * scale)), max(1, round(label.shape[1] * scale)))
        grid = F.interpolate(torch.from_numpy(np.asarray(label, np.float32))[None, None], size=size,
                             mode="nearest")[0, 0].long()
        up = F.interpolate(out[None].float().cpu(), size=size, mode="bilinear", align_corners=False)[0]
        keep = grid >= 0
        rows.append(up.permute(1, 2, 0)[keep])
        targets.append(grid[keep])
    x, y = torch.cat(rows), torch.cat(targets)
    if len(y) > max_pixels:
        pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:max_pixels]
        x, y = x[pick], y[pick]
    return x, y


def fit_temperature(logits: list[torch.Tensor], labels: list[np.ndarray], max_pixels: int = 200_000,
                    seed: int = 0) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` on the annotated pixels.

    Args:
        logits: per image (C, h, w) class logits.
        labels: per image (H, W) class indices into the same C classes; negative = unannotated.

    Returns:
        T > 0 (1.0 when no pixel is annotated).
    """
    x, y = _flatten(logits, labels, max_pixels, seed)
    if len(y) == 0:
        return 1.0
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().clamp(-5, 5).exp())


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE in percent: the pixel-weighted gap between confidence and accuracy over equal-width bins."""
    confidence, correct = np.asarray(confidence, np.float64).ravel(), np.asarray(correct, np.float64).ravel()
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, confidence, bins) - np.bincount(which, correct, bins))
    return float(gap.sum() / max(1, count.sum()) * 100)


def calibrate(predictor, images: list[np.ndarray], labels: list[np.ndarray], vocabulary,
              min_images: int = 5, chunk: int = 32) -> dict:
    """Fit ``predictor``'s temperature on annotated images and set it.

    Args:
        predictor: a :class:`model.predictor.Predictor`.
        images: RGB (H, W, 3) uint8 arrays.
        labels: (H, W) indices into ``vocabulary``, negative where unannotated.
        min_images: below this many images the temperature stays 1.

    Returns:
        ``temperature`` and the pixel ECE (%) on these annotations before and after.
    """
    if len(images) < min_images:
        predictor.temperature = 1.0
        return {"temperature": 1.0, "calibration_images": len(images)}
    logits = [out for start in range(0, len(images), chunk)
              for out in predictor.logits(images[start:start + chunk], vocabulary)]
    temperature = fit_temperature(logits, labels)
    x, y = _flatten(logits, labels, 200_000, seed=1)

    def ece(t: float) -> float:
        confidence, winner = (x / t).softmax(1).max(1)
        return round(expected_calibration_error(confidence.numpy(), (winner == y).numpy()), 2)

    predictor.temperature = temperature
    return {"temperature": round(temperature, 4), "calibration_images": len(images),
            "ece_before": ece(1.0), "ece_after": ece(temperature)}
