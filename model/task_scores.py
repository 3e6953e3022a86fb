"""Task scores: one number per predicted task, lower = more in need of review (no torch).

Each is a function of a :class:`model.predictor.SemanticPrediction` with calibrated confidences, named
in :data:`TASK_SCORES` (the backend's ``TASK_SCORE``). Measured by ``python -m bench.prelabel_quality``
(Spearman against the task's own mIoU, on two worlds) and ``python -m bench.active_learning`` (README).
An empty prediction scores 0, but one whose vocabulary named other things under :func:`mean_score` and
:func:`stream_score`.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def mean_score(prediction, sure_at: float = 0.5) -> float:
    """The mean score of every label the model found, those then left unlabeled as unlikely included, each
    counting once: a task whose image the model hesitates over scores low however clean its pruned pre-label
    looks. Each label the pre-label leaves out (:attr:`~model.predictor.SemanticPrediction.missed`, and the
    regions the region check unlabeled, :attr:`~model.predictor.SemanticPrediction.checked_out`) counts 0,
    weighed by its peak probability in the dense map: what a pre-label gets wrong is mostly the labels it leaves
    out, which no score of its regions reads, and a label the dense view nowhere names counts next to nothing.
    Where the control tag names what else its images show (:attr:`~model.predictor.SemanticPrediction.background`),
    a pre-label that leaves every label out says the image shows none of them, and scores how sure that is: one minus
    the largest of those peaks. Elsewhere every pixel is some label, and such a pre-label scores 0."""
    return _mean_with_left_out(prediction, {**prediction.missed, **prediction.checked_out})


def stream_score(prediction) -> float:
    """:func:`mean_score` over the scores the labels were decided by (:attr:`~model.predictor.SemanticPrediction.
    ordering`), with the regions the region check unlabeled kept at their found score: what the
    acquisition's order reads inside a cluster (:func:`model.acquisition.label_stream`). The tasks whose confusions
    the check removed look sure to the review score once their wrong regions are gone, but they are the ones
    that teach a version most: ordered by the review score, the stream's picks led random by less on 4 of 6 pools
    and CLIPs (README, *Measured → Active learning*)."""
    return _mean_with_left_out(prediction, prediction.missed, prediction.ordering)


def _mean_with_left_out(prediction, left_out: dict[int, float], found: dict[int, float] | None = None) -> float:
    """The mean of ``found`` (the prediction's found scores if None) over the labels not ``left_out``, each of
    those counting 0 weighed by its value."""
    found = prediction.found_scores if found is None else found
    scores = [score for label, score in found.items() if label not in left_out]
    if not scores:  # nothing kept: with other things named, no label is there, as sure as its likeliest is absent
        return float(1 - max(left_out.values())) if prediction.background and left_out else 0.0
    return float(sum(scores) / (len(scores) + sum(left_out.values())))


def product_score(prediction, sure_at: float = 0.5) -> float:
    """The product of those scores: the probability that every label found is right if they err independently."""
    scores = list(prediction.found_scores.values())
    return float(np.prod(scores)) if scores else 0.0


def sure_pixels(prediction, sure_at: float = 0.5) -> float:
    """The fraction of pixels whose confidence is at least ``sure_at``."""
    return 1 - unsure_fraction(prediction.confidence, sure_at)


def pixel_accuracy(prediction, sure_at: float = 0.5) -> float:
    """The expected share of the image labeled right: the mean confidence, unlabeled pixels counting 0."""
    return float(np.where(prediction.label_map >= 0, prediction.confidence, 0).mean())


TASK_SCORES: dict[str, Callable[..., float]] = {"product": product_score, "mean": mean_score,
                                                "sure_pixels": sure_pixels, "pixel_accuracy": pixel_accuracy}


def task_score(prediction, kind: str = "mean", sure_at: float = 0.5) -> float:
    """The task score named ``kind`` (:data:`TASK_SCORES`) of ``prediction``, in [0, 1]."""
    if kind not in TASK_SCORES:
        raise ValueError(f"unknown task score {kind!r}: expected one of {', '.join(TASK_SCORES)}")
    return TASK_SCORES[kind](prediction, sure_at)


def unsure_fraction(confidence: np.ndarray, below: float) -> float:
    """The fraction of pixels whose calibrated confidence is under ``below``."""
    return float(np.mean(confidence < below))
