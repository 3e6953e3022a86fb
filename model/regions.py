"""Low-resolution logits → the regions an annotator sees: pruning and boundaries that follow the image.

Three steps, on the logits' device:

1. **Small regions go to their neighbours.** A label covering less than ``min_area`` of the
   image loses its pixels to the best of the labels that stay (until every label left is
   large enough): most specks are pixels of a large region that a wrong label won by a hair.
2. **Boundaries follow the image** (when the image is given). The tower sees one cell per
   patch, so an upsampled map draws blobs. The kept labels' probabilities are passed
   through a colour guided filter (He, Sun & Tang, ECCV 2010) steered by the image itself,
   at a working resolution of :data:`REFINE_CELL_PIXELS` pixels per cell, and the label map
   is their argmax. No training; measured against bilinear upsampling and PAMR by
   ``python -m bench.prelabel_quality``.
3. **Unlikely regions become unlabeled.** A label whose pixels' mean confidence is under
   ``min_score`` is removed, its pixels left unlabeled: an annotator would delete it anyway,
   and giving its pixels to another label measured worse (that label is often wrong too).
   Zero-shot, so is a label the image as a whole does not show (``presence_cut``,
   :func:`model.presence.shown_labels`) that is less sure than the labels it does show.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from model.calibration import scale_confidence
from model.config import NO_PRUNING, RegionRules
from model.presence import shown_labels
from model.upsample import label_map_and_confidence
from model.vocabulary import UNLABELED

# Working resolution of the refinement: one logit cell spans this many pixels (or the image's own size, if smaller).
REFINE_CELL_PIXELS = 16
GUIDED_FILTER_EPS = 1e-3  # on [0, 1] colours: edges of about 3% contrast are kept


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The mean of ``x`` (..., H, W) over (2·radius + 1)² windows clipped at the borders, in O(H·W): OpenCV's
    box filter on the CPU (10x the cumulative sums there, and most of the guided filter's time), torch's elsewhere."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return _box_mean_opencv(x, radius)
    return _box_mean_torch(x, radius)


def _box_mean_opencv(x: torch.Tensor, radius: int) -> torch.Tensor:
    planes = x.reshape(-1, *x.shape[-2:]).contiguous().numpy()
    window = (2 * radius + 1, 2 * radius + 1)
    box_sum = functools.partial(cv2.boxFilter, ddepth=-1, ksize=window, normalize=False, borderType=cv2.BORDER_CONSTANT)
    inverse_count = 1 / box_sum(np.ones(planes.shape[1:], planes.dtype))
    means = np.empty_like(planes)
    for plane, mean in zip(planes, means, strict=True):
        box_sum(plane, dst=mean)
        np.multiply(mean, inverse_count, out=mean)
    return torch.from_numpy(means).reshape(x.shape)


def _box_mean_torch(x: torch.Tensor, radius: int) -> torch.Tensor:
    for dim in (-1, -2):
        length = x.shape[dim]
        padded = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.cumsum(dim)], dim)
        index = torch.arange(length, device=x.device)
        high, low = (index + radius + 1).clamp(max=length), (index - radius).clamp(min=0)
        count = (high - low).to(x.dtype).view(-1, *([1] * (-dim - 1)))
        x = (padded.index_select(dim, high) - padded.index_select(dim, low)) / count
    return x


def guided_filter(guide: torch.Tensor, inputs: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """He et al.'s guided filter with a colour guide.

    Args:
        guide: (3, H, W) the image, in [0, 1].
        inputs: (K, H, W) maps to filter (here: label probabilities).

    Returns:
        (K, H, W): each input as a local affine function of the guide's colours, so its edges
        move to the image's.
    """
    mean_guide, mean_input = box_mean(guide, radius), box_mean(inputs, radius)
    covariance = box_mean(guide[:, None] * guide[None], radius) - mean_guide[:, None] * mean_guide[None]
    covariance = covariance + eps * torch.eye(3, device=guide.device)[:, :, None, None]  # (3, 3, H, W)
    cross = box_mean(guide[None] * inputs[:, None], radius) - mean_guide[None] * mean_input[:, None]  # (K, 3, H, W)
    a = torch.einsum("kjhw,jihw->kihw", cross, _symmetric_inverse(covariance))
    b = mean_input - (a * mean_guide[None]).sum(1)
    return (box_mean(a, radius) * guide[None]).sum(1) + box_mean(b, radius)


def _symmetric_inverse(matrices: torch.Tensor) -> torch.Tensor:
    """(3, 3, H, W) symmetric matrices → their inverses, by the adjugate over whole planes (about 5x a batched
    ``torch.linalg.inv`` of a photo's pixels on the CPU)."""
    (a, b, c), (_, d, e), (_, _, f) = matrices
    cofactors = [d * f - e * e, c * e - b * f, b * e - c * d, a * f - c * c, b * c - a * e, a * d - b * b]
    aa, ab, ac, bb, bc, cc = cofactors
    determinant = a * aa + b * ab + c * ac
    return torch.stack([torch.stack([aa, ab, ac]), torch.stack([ab, bb, bc]), torch.stack([ac, bc, cc])]) / determinant


def _label_probabilities(scores: torch.Tensor, labels: torch.Tensor, height: int, width: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, height, width) twice, the ``labels``' probabilities under bilinearly upsampled ``scores`` (C, h, w):

    * the lower bound ``exp(up(score) - up(log-sum-exp of all scores))``, which refinement decides labels by (its
      boundaries are the ones measured);
    * the softmax of the upsampled scores, the other labels' mass upsampled as one more score, as
      :func:`model.upsample.label_map_and_confidence` serves without refinement: the probability the temperature
      was fitted for. The bound falls far under it between cells whose labels differ, so served as confidence it
      made fine-tuned versions underconfident (README, *Measured → Calibration*).
    """
    total = scores.logsumexp(0, keepdim=True)
    chosen = scores[labels]
    rest = total + torch.log1p(-torch.exp(chosen.logsumexp(0, keepdim=True) - total).clamp(max=1 - 1e-7))
    up = F.interpolate(torch.cat([chosen, total, rest])[None], size=(height, width), mode="bilinear",
                       align_corners=False)[0]
    count = len(labels)
    return torch.exp(up[:count] - up[count:count + 1]), torch.cat([up[:count], up[count + 1:]]).softmax(0)[:count]


def _label_stats(label_map: torch.Tensor, confidence: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label's pixel count and mean confidence (C,), over the labeled pixels."""
    labels, confidence = label_map.flatten().long(), confidence.flatten()
    if label_map.min() < 0:
        labeled = labels >= 0
        labels, confidence = labels[labeled], confidence[labeled]
    counts = torch.bincount(labels, minlength=classes)
    sums = torch.bincount(labels, confidence, minlength=classes)
    return counts, (sums / counts.clamp(min=1)).float()


def _reassign(logits: torch.Tensor, height: int, width: int, temperature: float, rules: RegionRules,
              confidence_scale: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The label map and confidences once every label left covers at least ``min_area`` of the image
    (and, with ``reassign_unlikely``, scores at least ``min_score``, its confidences through ``confidence_scale`` as
    :func:`regions` scores them): the offenders' pixels go to the best labels that stay, all offenders at once (one
    at a time measured the same, at up to 4x the cost)."""
    label_map, confidence = label_map_and_confidence(logits, height, width, temperature)
    scale = confidence_scale if rules.reassign_unlikely else None  # the areas alone read no score
    while rules.min_area > 0 or rules.reassign_unlikely:
        counts, scores = _label_stats(label_map, scale_confidence(confidence, scale), logits.shape[0])
        present = counts > 0
        offending = present & (counts < rules.min_area * label_map.numel())
        if rules.reassign_unlikely:
            offending |= present & (scores < rules.min_score)
        if not offending.any() or present.sum() == 1:
            break
        allowed = present & ~offending
        if not allowed.any():
            allowed[counts.argmax()] = True  # the largest label stays, however small
        label_map, confidence = label_map_and_confidence(logits, height, width, temperature, allowed)
    return label_map, confidence


def _refine(logits: torch.Tensor, image: np.ndarray, label_map: torch.Tensor, temperature: float,
            min_area: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The label map's labels re-decided by their guided-filtered probabilities, at the label map's size, with
    the calibrated probability of each pixel's label, filtered alike, as its confidence, and the filtered bound
    the label was decided by; a label the filter leaves under ``min_area`` of the image gives its pixels to the
    best of the others."""
    labels = torch.unique(label_map).long()
    if len(labels) < 2:
        bound, calibrated = _label_probabilities(logits.float() / temperature, labels, *label_map.shape)
        return label_map, calibrated[0], bound[0]
    height, width = label_map.shape
    small = cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=cv2.INTER_AREA)
    guide = torch.from_numpy(small).to(logits.device).permute(2, 0, 1).float() / 255
    radius = max(1, round(height / logits.shape[1]))  # one cell
    # One filter over both: the guide's own statistics are shared.
    filtered, calibrated = guided_filter(guide, torch.cat(_label_probabilities(logits.float() / temperature, labels,
                                                                               height, width)),
                                         radius, GUIDED_FILTER_EPS).split(len(labels))
    _, index = filtered.max(0)
    while min_area > 0:  # refinement must not bring back the specks pruning removed
        counts = torch.bincount(index.flatten(), minlength=len(labels))
        small = (counts > 0) & (counts < min_area * index.numel())
        small[counts.argmax()] = False  # the largest label stays, however small
        if not small.any():
            break
        filtered[small] = -torch.inf
        _, index = filtered.max(0)
    return (labels[index].to(torch.int16), calibrated.gather(0, index[None])[0].clamp(0, 1),
            filtered.gather(0, index[None])[0].clamp(0, 1))


def _not_shown(present: torch.Tensor, scores: torch.Tensor, shown: torch.Tensor) -> torch.Tensor:
    """(C,) bool: the labels found that the image does not show and that are less sure than the mean of those
    found that it does (none when it shows none of them: the whole-image view then disagrees with every region)."""
    trusted = present & shown
    if not trusted.any():
        return torch.zeros_like(present)
    return present & ~shown & (scores < scores[trusted].mean())


def working_shape(logits: torch.Tensor, height: int, width: int) -> tuple[int, int]:
    """The refinement's resolution: :data:`REFINE_CELL_PIXELS` per logit cell, at most the image's size."""
    scale = min(1.0, REFINE_CELL_PIXELS * logits.shape[1] / height, REFINE_CELL_PIXELS * logits.shape[2] / width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def regions(logits: torch.Tensor, height: int, width: int, temperature: float = 1.0,
            rules: RegionRules = NO_PRUNING, image: np.ndarray | None = None,
            prior: torch.Tensor | None = None, presence: torch.Tensor | None = None,
            confidence_scale: tuple[float, float] | None = None
            ) -> tuple[np.ndarray, np.ndarray, dict[int, float], dict[int, float], np.ndarray, dict[int, float]]:
    """logits (C, h, w) → (label map (height, width) int16 with ``UNLABELED`` where pruned,
    confidence (height, width) float32, the score of every label found before unlikely ones were
    unlabeled, the labels the pre-label leaves out with their peak probabilities
    (:attr:`model.predictor.SemanticPrediction.missed`), every label's peak probability (C,), and each found
    label's score by the confidences its pixels were decided by (:attr:`~model.predictor.SemanticPrediction.
    ordering`)), after
    pruning by ``rules`` and, given the RGB ``image`` (height, width, 3), boundary refinement. ``prior``: the
    image's (C,) image-level log-probabilities, and ``presence`` (C,) their share of ``logits`` (none if None),
    which ``rules.presence_cut`` reads (without ``prior`` nothing is cut). ``confidence_scale``: a fine-tuned
    version's map of the confidences to how often they are right as served
    (:func:`model.calibration.fit_confidence_scale`), applied before the regions are scored."""
    shape = (height, width) if image is None else working_shape(logits, height, width)
    label_map, confidence = _reassign(logits, *shape, temperature, rules, confidence_scale)
    decided_by = confidence
    if image is not None:
        label_map, confidence, decided_by = _refine(logits, image, label_map, temperature, rules.min_area)
    confidence = scale_confidence(confidence, confidence_scale)
    counts, scores = _label_stats(label_map, confidence, logits.shape[0])
    found = {int(c): float(scores[c]) for c in torch.nonzero(counts).flatten()}
    ordering = dict(zip(found, _label_stats(label_map, decided_by, logits.shape[0])[1][list(found)].tolist(),
                        strict=True))
    unlikely = (counts > 0) & (scores < rules.min_score)
    unlikely[list(rules.unscored)] = False
    if rules.presence_cut and prior is not None:
        unlikely |= _not_shown(counts > 0, scores, shown_labels(prior).to(scores.device))
    left_out = ~((counts > 0) & ~unlikely)
    peaks = peak_probabilities(logits, presence, temperature).to(scores.device)
    missed = dict(zip(torch.nonzero(left_out).flatten().tolist(), peaks[left_out].tolist(), strict=True))
    if unlikely.any():
        label_map = torch.where(unlikely[label_map.long()], torch.full_like(label_map, UNLABELED), label_map)
    if shape != (height, width):  # nearest: the working resolution's boundaries, undisturbed
        label_map, confidence = nearest_upsample((label_map, confidence), height, width)
    return label_map.cpu().numpy(), confidence.cpu().numpy(), found, missed, peaks.cpu().numpy(), ordering


def peak_probabilities(logits: torch.Tensor, presence: torch.Tensor | None, temperature: float = 1.0) -> torch.Tensor:
    """(C,) each label's probability at its likeliest cell of the dense map without the presence prior, by the
    dense view alone: a lower bound on the chance that the image shows the label anywhere. No threshold: a label
    the pre-label leaves out counts as much as the image may show it.

    Args:
        logits: (C, h, w) scores, ``presence`` included; their softmax over ``temperature`` is served.
        presence: (C,) the presence prior's share of them (:func:`model.presence.offsets`); None: none.
    """
    dense = logits.float() if presence is None else logits.float() - presence.to(logits.device)[:, None, None]
    return (dense / temperature).log_softmax(0).amax((1, 2)).exp()


def nearest_upsample(maps: tuple[torch.Tensor, ...], height: int, width: int) -> tuple[torch.Tensor, ...]:
    """(h, w) maps of the working resolution at (height, width), each pixel taking its source pixel's value."""
    rows = (torch.arange(height, device=maps[0].device) * maps[0].shape[0] // height)[:, None]
    cols = (torch.arange(width, device=maps[0].device) * maps[0].shape[1] // width)[None]
    return tuple(m[rows, cols] for m in maps)
