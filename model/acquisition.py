"""What to annotate next: a diverse order over a project's tasks (numpy only).

What the backend serves (``backend.prelabel --annotate-next``): the tasks are clustered on what the frozen CLIP
sees in each image (:func:`cluster_tasks`: k-means, with as many clusters as annotated tasks plus the next batch,
as TypiClust does), and :func:`label_stream` orders them as Label Studio's uncertainty sampling does over those
clusters: from the cluster annotated least, the lowest stream score, so any prefix of the order is spread over
the pool. Tasks that failed come last.

:func:`acquire` is the budget-aware design it was measured against (``bench.active_learning --arms
acquire,typical,uncertain``; README, *Active learning*). It visits the clusters in turn, least-annotated and
largest first, and inside a cluster takes:

* **typical first** while the project has few annotations (TypiClust, Hacohen et al. 2022): the task
  densest among its cluster's, since the hardest images are rare kinds that teach a cold model little;
* **then the expected error × the rarity of the labels it shows**: one minus the calibrated mean
  confidence, weighted by ``1 / sqrt(1 + annotated examples)`` of each predicted label (class-balanced
  acquisition, Cai et al. 2021), so labels the project has few examples of come next.

On the benchmark's pools it was, on the whole, level with the stream or behind it, so it is not served.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.task_scores import pixel_accuracy, stream_score

NEIGHBOURS = 20  # typicality: the inverse mean distance to this many nearest tasks of the cluster


@dataclass(frozen=True)
class TaskView:
    """What one task's pre-label tells the acquisition.

    Attributes:
        features: (C,) the frozen CLIP's image-level probabilities of the vocabulary's labels (and other things).
        expected_error: one minus the calibrated mean confidence (pixels left unlabeled count 0).
        presence: (C,) the pre-label's pixels of each label.
        stream_score: what the label stream orders a cluster's tasks by (:func:`model.task_scores.stream_score`).
    """

    features: np.ndarray
    expected_error: float
    presence: np.ndarray
    stream_score: float

    @classmethod
    def of(cls, prediction, log_prior: np.ndarray) -> TaskView:
        """From a :class:`model.predictor.SemanticPrediction` and the pass's (C,) image-level log-probabilities."""
        labels = prediction.label_map[prediction.label_map >= 0].ravel().astype(np.int64)
        return cls(np.exp(log_prior), 1 - pixel_accuracy(prediction), np.bincount(labels, minlength=len(log_prior)),
                   stream_score(prediction))


@dataclass(frozen=True)
class Pool:
    """What the acquisition knows of a project's tasks.

    Attributes:
        features: (N, D) what the frozen CLIP sees in each image (rows are L2-normalised before clustering).
        expected_error: (N,) one minus the calibrated mean confidence of the task's pre-label.
        presence: (N, C) how much of each label the pre-label shows (area shares or probabilities).
        stream_scores: (N,) what the label stream orders a cluster's tasks by.
        annotated: (N,) bool, the tasks annotated already.
        failed: (N,) bool, the tasks whose image or prediction failed (their features are ignored).
    """

    features: np.ndarray
    expected_error: np.ndarray
    presence: np.ndarray
    stream_scores: np.ndarray
    annotated: np.ndarray
    failed: np.ndarray

    @classmethod
    def of(cls, views: list[TaskView | None], annotated: np.ndarray) -> Pool:
        """A pool of every task's view; None for a task that failed."""
        usable = next((v for v in views if v is not None), None)
        labels = len(usable.features) if usable is not None else 0
        blank = TaskView(np.zeros(labels), 0.0, np.zeros(labels), 0.0)
        views_ = [v if v is not None else blank for v in views]
        return cls(np.stack([v.features for v in views_]).reshape(len(views), labels),
                   np.array([v.expected_error for v in views_], float),
                   np.stack([v.presence for v in views_]).reshape(len(views), labels).astype(float),
                   np.array([v.stream_score for v in views_], float), np.asarray(annotated, bool),
                   np.array([v is None for v in views]))


@dataclass(frozen=True)
class Acquisition:
    """order: every task not annotated, the first to annotate first (failed tasks last);
    clusters: (N,) each task's cluster (-1 for a failed task); typical: whether the order was typical-first."""

    order: list[int]
    clusters: np.ndarray
    typical: bool


def kmeans(points: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """(N, D) points → (N,) cluster of each, k-means++ seeded then Lloyd's iterations."""
    rng = np.random.default_rng(seed)
    k = max(1, min(k, len(points)))
    centers = [points[rng.integers(len(points))]]
    distance = ((points - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = distance.sum()
        pick = rng.choice(len(points), p=distance / total) if total > 0 else rng.integers(len(points))
        centers.append(points[pick])
        distance = np.minimum(distance, ((points - points[pick]) ** 2).sum(1))
    centers = np.stack(centers)
    assignment = np.full(len(points), -1)
    for _ in range(iterations):
        new = (-2 * points @ centers.T + (centers ** 2).sum(1)).argmin(1)
        if (new == assignment).all():
            break
        assignment = new
        for c in range(k):
            if (assignment == c).any():
                centers[c] = points[assignment == c].mean(0)
    return assignment


def typicality(points: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """(N,) the inverse mean distance of each point to its :data:`NEIGHBOURS` nearest in its cluster."""
    out = np.zeros(len(points))
    for c in np.unique(clusters):
        members = np.flatnonzero(clusters == c)
        if len(members) == 1:
            continue
        inside = points[members]
        distances = pairwise_distances(inside)
        nearest = np.sort(distances, 1)[:, 1:1 + NEIGHBOURS]
        out[members] = 1 / (nearest.mean(1) + 1e-6)
    return out


def label_rarity(label_counts: np.ndarray) -> np.ndarray:
    """(C,) annotated examples of each label → its weight, ``1 / sqrt(1 + count)``."""
    return 1 / np.sqrt(1 + np.asarray(label_counts, float))


def pairwise_distances(points: np.ndarray) -> np.ndarray:
    """(N, D) points → (N, N) Euclidean distances between them."""
    return np.sqrt(np.maximum(((points[:, None] - points[None]) ** 2).sum(-1), 0))


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """(N, D) rows, each L2-normalised (a zero row stays zero)."""
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def cluster_tasks(pool: Pool, batch: int, seed: int = 0) -> np.ndarray:
    """(N,) each task's cluster, -1 for a failed one: k-means on the tasks' features, with as many clusters as
    annotated tasks plus the next ``batch``, so the next batch can take one task from each cluster nobody has
    annotated."""
    clusters = np.full(len(pool.failed), -1)
    usable = np.flatnonzero(~pool.failed)
    if len(usable):
        clusters[usable] = kmeans(unit_rows(pool.features[usable]), int(pool.annotated[usable].sum()) + batch, seed)
    return clusters


def acquire(pool: Pool, batch: int, label_counts: np.ndarray, typical_below: int, seed: int = 0) -> Acquisition:
    """The order to annotate ``pool``'s tasks in, for a next batch of ``batch``.

    Args:
        label_counts: (C,) annotated tasks showing each label.
        typical_below: typical-first while fewer tasks than this are annotated.
    """
    usable = np.flatnonzero(~pool.failed)
    clusters = cluster_tasks(pool, batch, seed)
    typical = int(pool.annotated.sum()) < typical_below
    if typical:
        value = np.zeros(len(clusters))
        if len(usable):
            value[usable] = typicality(unit_rows(pool.features[usable]), clusters[usable])
    else:
        presence = pool.presence / np.maximum(pool.presence.sum(1, keepdims=True), 1e-12)
        value = pool.expected_error * (presence @ label_rarity(label_counts))
    ranked: dict[int, list[int]] = {}  # cluster → its tasks not annotated, best first
    for index in sorted(np.flatnonzero(~pool.annotated & ~pool.failed), key=lambda i: -value[i]):
        ranked.setdefault(int(clusters[index]), []).append(int(index))
    visits = sorted(ranked, key=lambda c: (int((pool.annotated & (clusters == c)).sum()), -int((clusters == c).sum())))
    order = [members[depth] for depth in range(max(map(len, ranked.values()), default=0))
             for c in visits for members in [ranked[c]] if depth < len(members)]
    failed = [int(i) for i in np.flatnonzero(pool.failed & ~pool.annotated)]
    return Acquisition(order + failed, clusters, typical)


def label_stream(clusters: np.ndarray, scores: np.ndarray, annotated: np.ndarray, count: int) -> list[int]:
    """The next ``count`` tasks for one annotator by Label Studio's uncertainty-sampling rule, given each task's
    cluster (-1: failed, no prediction) and score (the backend serves the stream score): from the cluster they have
    annotated least, the lowest score (Label Studio 1.23's ``projects/functions/next_task.py``). The backend writes
    this order as each task's place (``backend.prelabel --annotate-next``)."""
    solved = np.bincount(clusters[annotated & (clusters >= 0)], minlength=clusters.max() + 2)
    left, picked = set(np.flatnonzero(~annotated).tolist()), []
    for _ in range(min(count, len(left))):
        # A failed task has no prediction of the project's version: the stream serves it after every other.
        task = min(left, key=lambda i: (clusters[i] < 0, solved[clusters[i]], scores[i], i))
        picked.append(task)
        left.discard(task)
        if clusters[task] >= 0:
            solved[clusters[task]] += 1
    return picked
