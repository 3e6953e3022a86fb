"""What the frozen CLIP says of the whole image, used where no annotation can say anything.

Label-free rules for whatever CLIP a user brings, with no constant tied to one of them:

* **A presence prior.** CLIP was trained to match one global image embedding with text; its
  image-level softmax over the project's labels (at its own learned logit scale) is its
  best-calibrated signal of which labels an image shows. Each pixel's class log-probabilities
  get ``weight × log p_image(label)`` added (a product of experts, like FC-CLIP's ensemble),
  so pixels go to labels the image as a whole supports, and a label the image does not show
  loses its scattered pixels to one it does. A fine-tuned version weighs it as its training fitted
  within the labels its annotations showed and within the others, and at the zero-shot weight between
  the two groups, which no annotation of one group can judge (:func:`offsets`).
* **A cut of what the image does not show** (zero-shot, ``PRESENCE_CUT``): a region whose label is
  outside the image's perplexity-many likeliest labels by that same view, and less sure than the
  regions inside them, is left unlabeled (:func:`shown_labels`).
* **A check of each region by its own crop** (``REGION_CHECK``): the same view of the region
  alone (its :func:`masked_crop`, grey outside it, as GKC's distillation shows the frozen CLIP a region)
  must count the region's label among its perplexity-many likeliest, or the region is left unlabeled
  (:func:`unshown_regions`). The whole image's view cannot tell a ball from the brick wall it was
  drawn over, since the image shows both; the wall's own crop shows a wall. A fine-tuned version is a
  second judge, which knows the project's labels as the frozen CLIP may not: its region goes only when
  the version's own pass over the crop does not count the label either.
* **A temperature fitted without labels.** Per vocabulary, the temperature T whose pixel
  probabilities ``softmax(logits / T)``, averaged over each image, best match the image-level
  probabilities (the least summed KL divergence), pooled over the first
  :data:`LABEL_FREE_IMAGES` images the model sees, then fixed. A fine-tuned version carries
  the temperature its training fitted on annotations instead.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import torch
from PIL import Image

LABEL_FREE_IMAGES = 256  # images pooled before the label-free temperature stops moving
# Labels × pixels of one image the fit reads: a 20-label vocabulary on a 1920×1080 photo (28×50 cells) is read
# whole; a 1000-label one every third cell, so the first images cost no more than a fraction of their pass.
MAX_FIT_CELLS = 500_000
MAX_VOCABULARIES = 4096  # vocabularies remembered (151 numbers each); the oldest is forgotten first
# Candidate temperatures, log-spaced 8% apart, far wider than any CLIP's logit scale moves them (about 10-100).
TEMPERATURES = torch.exp(torch.linspace(math.log(0.01), math.log(1000.0), 151))


def log_prior(image_logits: torch.Tensor) -> torch.Tensor:
    """(..., C) image-level logits → (..., C) log-probabilities of each label over the vocabulary."""
    return image_logits.float().log_softmax(-1)


def shown_labels(prior: torch.Tensor) -> torch.Tensor:
    """(C,) image-level log-probabilities → (C,) bool: the labels the image shows to CLIP's whole-image view, as
    many of the likeliest as the distribution's perplexity (its effective number of labels), rounded up: a
    confident view counts its label and the runner-up, one spread evenly over four counts four. No threshold on
    one CLIP's probabilities."""
    prior = prior.float()
    perplexity = float(torch.exp(-(prior.exp() * prior).sum()))
    shown = torch.zeros(prior.shape, dtype=torch.bool, device=prior.device)
    shown[prior.argsort(descending=True)[:max(1, math.ceil(perplexity - 1e-4))]] = True  # 4.00001 is 4 spread
    return shown


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    return slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)


def _square(patch: np.ndarray, fill: int, size: int, resample) -> np.ndarray:
    """``patch`` (h, w[, 3]) uint8 centred on a square of ``fill``, resized to (size, size[, 3])."""
    side = max(patch.shape[:2])
    canvas = np.full((side, side, *patch.shape[2:]), fill, np.uint8)
    y0, x0 = (side - patch.shape[0]) // 2, (side - patch.shape[1]) // 2
    canvas[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]] = patch
    return np.asarray(Image.fromarray(canvas).resize((size, size), resample))


def masked_crop(image: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the (H, W) ``mask``'s bounding box in the RGB ``image``, everything outside the mask
    grey, padded square, resized."""
    rows, cols = _bounding_box(mask)
    return _square(np.where(mask[rows, cols, None], image[rows, cols], 128).astype(np.uint8), 128, size, Image.BICUBIC)


def crop_coverage(mask: np.ndarray, size: int) -> np.ndarray:
    """(size, size) float32 in [0, 1]: how much of each cell of :func:`masked_crop`'s square the (H, W) ``mask``
    covers, on a grid of ``size`` cells a side (the crop's logit cells)."""
    rows, cols = _bounding_box(mask)
    return _square(mask[rows, cols].astype(np.uint8) * 255, 0, size, Image.BOX).astype(np.float32) / 255


def unshown_regions(labels: list[int], crop_priors: torch.Tensor, version_views: torch.Tensor | None = None
                    ) -> list[int]:
    """The ``labels`` (each one region's) that their region's own crop does not show: outside the
    :func:`shown_labels` of the crop's image-level log-probabilities ``crop_priors`` (K, C), row k of label k, and,
    given a fine-tuned version's ``version_views`` (K, C) of the same crops (log of its mean served probability
    over the region's cells), outside those too. No threshold: a crop that shows one thing clearly counts it and
    the runner-up."""
    views = [None] * len(labels) if version_views is None else version_views
    return [label for label, prior, view in zip(labels, crop_priors, views, strict=True)
            if not shown_labels(prior)[label] and (view is None or not shown_labels(view)[label])]


def offsets(prior: torch.Tensor, weight: float, seen: torch.Tensor | None = None,
            group_weight: float | None = None) -> torch.Tensor:
    """(C,) what the presence prior adds to each label's scores: ``weight × prior``.

    For a fine-tuned version (``seen``: (C,) bool, the labels its annotations showed), ``weight`` is what its
    training fitted on those annotations, which cannot tell how the image splits between the labels they show
    and the others. That split, each group's log-mass of the prior, keeps ``group_weight`` (the zero-shot
    weight); ``weight`` weighs each label within its group. With every label or none seen, it is
    ``weight × prior``.
    """
    prior = prior.float()
    if seen is None or group_weight is None:
        return weight * prior
    seen = seen.to(prior.device)
    group = torch.where(seen, prior[seen].logsumexp(0), prior[~seen].logsumexp(0))
    return weight * (prior - group) + group_weight * group


def shift(logits: torch.Tensor, temperature: float, presence: torch.Tensor) -> torch.Tensor:
    """Calibrated scores (C, h, w): ``logits / temperature`` plus the (C,) ``presence`` :func:`offsets`; their
    softmax is what is served."""
    return logits.float() / temperature + presence.to(logits.device)[:, None, None]


def apply(logits: torch.Tensor, prior: torch.Tensor, temperature: float, weight: float,
          seen: torch.Tensor | None = None, group_weight: float | None = None) -> torch.Tensor:
    """:func:`shift` by the prior's :func:`offsets`."""
    return shift(logits, temperature, offsets(prior, weight, seen, group_weight))


def divergences(logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(p_image ‖ mean pixel softmax(logits / T)) for every T of :data:`TEMPERATURES`: (len(TEMPERATURES),).

    Args:
        logits: (C, h, w) one image's dense logits.
        prior: (C,) its image-level log-probabilities.
    """
    flat = logits.float().flatten(1).cpu()  # (C, N)
    flat = flat[:, ::max(1, math.ceil(flat.numel() / MAX_FIT_CELLS))]
    target = prior.float().cpu()
    out = []
    for chunk in TEMPERATURES.split(16):
        mean = (flat[None] / chunk[:, None, None]).softmax(1).mean(2)  # (T, C)
        out.append((target.exp() * (target - mean.clamp_min(1e-12).log())).sum(1))
    return torch.cat(out)


class LabelFreeTemperature:
    """The label-free temperature of each vocabulary, from the images seen so far (thread-safe)."""

    def __init__(self, max_images: int = LABEL_FREE_IMAGES):
        self.max_images = max_images
        self._lock = threading.Lock()
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}  # vocabulary key → (summed divergences, images)

    def update(self, key: str, passes: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Pool ``passes`` ((C, h, w) logits, (C,) log prior) of images of vocabulary ``key``; the temperature now."""
        with self._lock:
            total, count = self._sums.get(key, (torch.zeros(len(TEMPERATURES)), 0))
            for logits, prior in passes[:max(0, self.max_images - count)]:
                total, count = total + divergences(logits, prior), count + 1
            self._sums.pop(key, None)
            self._sums[key] = (total, count)
            while len(self._sums) > MAX_VOCABULARIES:
                del self._sums[next(iter(self._sums))]
            return float(TEMPERATURES[int(total.argmin())]) if count else 1.0

    def get(self, key: str) -> float | None:
        """The temperature of ``key`` so far, or None before any image."""
        with self._lock:
            total, count = self._sums.get(key, (None, 0))
            return float(TEMPERATURES[int(total.argmin())]) if count else None
