"""Confidence calibration: temperature scaling and expected calibration error (task scores:
:mod:`model.task_scores`).

A pixel's confidence is its winning class's softmax probability. Temperature scaling divides
the logits by one scalar T fitted to minimise the negative log-likelihood of annotated pixels,
with the presence prior (:mod:`model.presence`) added after it as served. Without a prior it
never changes which class wins, only how sure the model says it is.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _flatten(logits: list[torch.Tensor], labels: list[np.ndarray], max_pixels: int, seed: int,
             max_side: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Annotated pixels of every image as (N, C) logits, (N,) classes and (N,) the index of their image,
    subsampled to ``max_pixels``.

    ``logits[i]`` is (C, h, w); ``labels[i]`` is (H, W) with negative values where unannotated.
    The logits are upsampled bilinearly as for prediction, to the labels' size scaled down to
    at most ``max_side`` on the short side (the labels nearest-resampled to match), so the fit
    sees the same boundary pixels the served predictions have.
    """
    rows, targets, owners = [], [], []
    for index, (out, label) in enumerate(zip(logits, labels, strict=True)):
        scale = min(1.0, max_side / min(label.shape))
        size = (max(1, round(label.shape[0] * scale)), max(1, round(label.shape[1] * scale)))
        grid = F.interpolate(torch.from_numpy(np.asarray(label, np.float32))[None, None], size=size,
                             mode="nearest")[0, 0].long()
        up = F.interpolate(out[None].float().cpu(), size=size, mode="bilinear", align_corners=False)[0]
        keep = grid >= 0
        rows.append(up.permute(1, 2, 0)[keep])
        targets.append(grid[keep])
        owners.append(torch.full((int(keep.sum()),), index))
    x, y, owner = torch.cat(rows), torch.cat(targets), torch.cat(owners)
    if len(y) > max_pixels:
        pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:max_pixels]
        x, y, owner = x[pick], y[pick], owner[pick]
    return x, y, owner


def _per_pixel(per_image: list[torch.Tensor], owner: torch.Tensor) -> torch.Tensor:
    """(N, C): each pixel's image's (C,) row of ``per_image``."""
    return torch.stack([row.float().cpu() for row in per_image])[owner]


def fit_temperature(logits: list[torch.Tensor], labels: list[np.ndarray], max_pixels: int = 200_000,
                    seed: int = 0) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` on the annotated pixels.

    Args:
        logits: per image (C, h, w) class logits.
        labels: per image (H, W) class indices into the same C classes; negative = unannotated.

    Returns:
        T > 0 (1.0 when no pixel is annotated).
    """
    return fit_scores(logits, labels, None, max_pixels, seed)[0]


def fit_scores(logits: list[torch.Tensor], labels: list[np.ndarray], priors: list[torch.Tensor] | None,
               max_pixels: int = 200_000, seed: int = 0) -> tuple[float, float]:
    """The temperature T and presence weight w ≥ 0 minimising the NLL of ``softmax(logits / T + w × prior)``
    on the annotated pixels (w is 0 without ``priors``, per image (C,) log-probabilities).

    Returns:
        (T, w); (1.0, 0.0) when no pixel is annotated.
    """
    x, y, owner = _flatten(logits, labels, max_pixels, seed)
    if len(y) == 0:
        return 1.0, 0.0
    o = _per_pixel(priors, owner) if priors is not None else torch.zeros_like(x)
    log_t = torch.zeros((), requires_grad=True)
    raw_w = torch.zeros((), requires_grad=priors is not None)  # w = softplus(raw_w): 0.69 to start
    parameters = [log_t, raw_w] if priors is not None else [log_t]
    optimizer = torch.optim.LBFGS(parameters, lr=0.5, max_iter=100, line_search_fn="strong_wolfe")
    weight = (lambda: F.softplus(raw_w)) if priors is not None else (lambda: torch.zeros(()))

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x / log_t.exp() + weight() * o, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().clamp(-5, 5).exp()), float(weight().detach())


def fit_confidence_scale(confidence: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """(a, b) of the map ``sigmoid(a × logit(c) + b)``, a > 0, from a served pixel confidence c to the chance that
    the pixel's label is right: Platt scaling (least binary cross-entropy, with Platt's targets
    ``(right + 1) / (right + 2)`` and ``1 / (wrong + 2)``, so pixels all right or all wrong give a finite map).

    Args:
        confidence: (N,) served confidences in [0, 1].
        correct: (N,) bool, whether each pixel's label is the annotation's.
    """
    confidence, correct = np.asarray(confidence, np.float64).ravel(), np.asarray(correct, bool).ravel()
    right = int(correct.sum())
    target = torch.from_numpy(np.where(correct, (right + 1) / (right + 2), 1 / (len(correct) - right + 2)))
    x = _logit(torch.from_numpy(confidence))
    log_a, b = torch.zeros((), dtype=torch.float64, requires_grad=True), torch.zeros((), dtype=torch.float64,
                                                                                     requires_grad=True)
    optimizer = torch.optim.LBFGS([log_a, b], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(log_a.exp() * x + b, target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_a.detach().exp()), float(b.detach())


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return p.log() - (-p).log1p()


def scale_confidence(confidence: torch.Tensor, scale: tuple[float, float] | None) -> torch.Tensor:
    """``confidence`` through :func:`fit_confidence_scale`'s map (unchanged for None)."""
    if scale is None:
        return confidence
    a, b = scale
    return torch.sigmoid(a * _logit(confidence) + b).to(confidence.dtype)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE in percent: the pixel-weighted gap between confidence and accuracy over equal-width bins."""
    confidence, correct = np.asarray(confidence, np.float64).ravel(), np.asarray(correct, np.float64).ravel()
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, confidence, bins) - np.bincount(which, correct, bins))
    return float(gap.sum() / max(1, count.sum()) * 100)


def _chunked_passes(predictor, images: list[np.ndarray], vocabulary, chunk: int, **options) -> list:
    """``predictor.passes`` over ``images``, ``chunk`` at a time (bounded memory)."""
    return [out for start in range(0, len(images), chunk)
            for out in predictor.passes(images[start:start + chunk], vocabulary, **options)]


def fit_frozen_trust(predictor, images: list[np.ndarray], labels: list[np.ndarray], vocabulary,
                     chunk: int = 32) -> dict[str, float]:
    """Per label the annotations show: the share of its annotated pixels the frozen CLIP alone names right
    (its dense scores plus the image-level prior at ``predictor``'s presence weight), which scales its share
    in a fine-tuned segmenter's ensemble (:meth:`model.segmenter.Segmenter.ensemble_weights`). The frozen CLIP
    never trained on these images, so its share is what it would get right on others; a label it never names
    would only have its annotations vetoed.
    """
    passes = _chunked_passes(predictor, images, vocabulary, chunk, frozen_only=True)
    x, y, owner = _flatten([out for out, _ in passes], labels, 200_000, seed=2)
    named = (x + predictor.presence_weight * _per_pixel([prior for _, prior in passes], owner)).argmax(1)
    return {vocabulary.labels[c]: round(float((named[y == c] == c).float().mean()), 3) for c in y.unique().tolist()}


def calibrate(predictor, images: list[np.ndarray], labels: list[np.ndarray], vocabulary,
              min_images: int = 5, chunk: int = 32) -> dict:
    """Fit a fine-tuned ``predictor``'s trust in the frozen CLIP per label (:func:`fit_frozen_trust`), then its
    temperature and presence weight, on annotated images, and set them: how much the frozen CLIP's image-level
    prior should still count is what the annotations say (a model fine-tuned on them often knows better). The
    weight is served within the labels the annotations show and within the others; between the two groups the
    prior keeps the weight the predictor was built with (:func:`model.presence.offsets`), as annotations of one
    group cannot judge it. The fit reads the plain ``weight × prior``: fitted with the split held at the zero-shot
    weight instead, it weighed the prior near 0 within the groups and kept fewer of the labels no annotation shows.

    Args:
        predictor: a :class:`model.predictor.Predictor`.
        images: RGB (H, W, 3) uint8 arrays.
        labels: (H, W) indices into ``vocabulary``, negative where unannotated.
        min_images: below this many images the temperature stays 1 (and the weight as it is).

    Returns:
        ``temperature``, ``presence_weight``, ``frozen_trust`` (fine-tuned only) and the pixel ECE (%) on these
        annotations before (T = 1, the weight as it was) and after.
    """
    if len(images) < min_images:
        predictor.temperature = 1.0
        return {"temperature": 1.0, "presence_weight": predictor.presence_weight, "calibration_images": len(images)}
    trust = {}
    if predictor.segmenter.trained_labels is not None:
        trust = predictor.segmenter.frozen_trust = fit_frozen_trust(predictor, images, labels, vocabulary, chunk)
    passes = _chunked_passes(predictor, images, vocabulary, chunk)
    logits, priors = [out for out, _ in passes], [prior for _, prior in passes]
    temperature, weight = fit_scores(logits, labels, priors)

    x, y, owner = _flatten(logits, labels, 200_000, seed=1)

    def ece(t: float) -> float:  # as served, at the predictor's presence weights
        confidence, winner = (x / t + _per_pixel(predictor.presence(priors, vocabulary), owner)).softmax(1).max(1)
        return round(expected_calibration_error(confidence.numpy(), (winner == y).numpy()), 2)

    before = ece(1.0)
    predictor.temperature, predictor.presence_weight = temperature, weight
    return {"temperature": round(temperature, 4), "presence_weight": round(weight, 4),
            **({"frozen_trust": trust} if trust else {}),
            "calibration_images": len(images), "ece_before": before, "ece_after": ece(temperature)}


def fit_min_score(found: list[dict[int, float]], present: list[set[int]], recall_weight: float = 1.0) -> float:
    """The least region score (``RegionRules.min_score``) that best separates the labels a prediction found
    from those the annotations show: the threshold of the highest F-β of "kept and present" over every
    label found, β = ``recall_weight``, chosen among the scores themselves (0 when nothing is found). β = 1 is
    F1; under 1, a wrong region kept costs more than a right one dropped (fewer, surer regions).

    Args:
        found: per image, each found label's score (:attr:`~model.predictor.SemanticPrediction.found_scores`).
        present: per image, the labels its annotation shows.
    """
    scored = sorted(((score, label in truth) for scores, truth in zip(found, present, strict=True)
                     for label, score in scores.items()), reverse=True)
    relevant = sum(right for _, right in scored)
    weight = recall_weight ** 2
    best, threshold, kept_right = 0.0, 0.0, 0
    for kept, (score, right) in enumerate(scored, start=1):
        kept_right += right
        f_beta = (1 + weight) * kept_right / (kept + weight * relevant)
        if f_beta > best:
            best, threshold = f_beta, score
    # Halfway to the next score down, so a score equal to the threshold's own region stays.
    lower = [score for score, _ in scored if score < threshold]
    return round((threshold + max(lower)) / 2, 4) if lower else 0.0
