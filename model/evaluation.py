"""Segmentation metrics: confusion matrices and mean IoU."""
from __future__ import annotations

import numpy as np


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix; rows are ground truth, columns predictions.

    Ground-truth pixels outside ``[0, C)`` are ignored; predictions outside it (unlabeled)
    count as misses of the true class.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes + 1), np.int64)

    def update(self, truth: np.ndarray, predicted: np.ndarray) -> "ConfusionMatrix":
        truth = truth.astype(np.int64).ravel()
        predicted = predicted.astype(np.int64).ravel()
        valid = (truth >= 0) & (truth < self.num_classes)
        predicted = np.where((predicted >= 0) & (predicted < self.num_classes), predicted, self.num_classes)
        index = truth[valid] * (self.num_classes + 1) + predicted[valid]
        self.matrix += np.bincount(index, minlength=self.matrix.size).reshape(self.matrix.shape)
        return self

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for classes absent from both truth and predictions."""
        square = self.matrix[:, : self.num_classes]
        tp = np.diag(square).astype(float)
        union = self.matrix.sum(1) + square.sum(0) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self, classes=None) -> float:
        """Mean IoU in percent over ``classes`` (indices) that occur, all by default."""
        iou = self.iou()
        if classes is not None:
            iou = iou[list(classes)]
        return float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan")
