"""Inference: images + vocabulary → semantic label maps with per-pixel confidences."""
from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from model import presence
from model.config import DEFAULTS, NO_PRUNING, PRECISIONS, RegionRules
from model.regions import regions
from model.segmenter import EnsembleWeights
from model.vocabulary import UNLABELED, TextEncoder, Vocabulary

log = logging.getLogger(__name__)


# bfloat16 also rounds the pass (about 0.5 % of the output's range): a CPU's must buy at least this much speed.
BF16_MIN_SPEEDUP = 1.2


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AMX or AVX512-BF16). Elsewhere PyTorch emulates bfloat16,
    slower than float32; where it has them, :func:`cpu_bf16_speedup` says whether they are faster."""
    return any(getattr(torch.cpu, check, lambda: False)()
               for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


@cache
def cpu_bf16_speedup() -> float:
    """How many times faster this CPU runs a ViT-B/16 MLP (197 tokens, 768 → 3072 → 768) under bfloat16 autocast
    than in float32, on torch's threads: the median of 5 runs after 2 warm-ups, about 0.2 s, once per process.

    The CPU's flags do not tell it. With AVX512-BF16 and no AMX, an AMD EPYC (Zen 4) ran ViT-B/16's tower 2.0×
    faster in OpenVINO bf16 than in f32, and an Intel Xeon 0.68× as fast (torch alike: 2.3× and 0.75×); with AMX,
    an Intel Xeon 1.8× (README, *Measured → Precision and runtime on the CPU*). A tower's cost is its matrix
    products: on that Xeon without AMX this MLP measured 0.56×, the whole tower 0.75× in torch.
    """
    generator = torch.Generator().manual_seed(0)  # the global generator, which seeds models, is left alone
    tokens, up, down = (torch.randn(shape, generator=generator) * 0.05 for shape in ((197, 768), (3072, 768), (768, 3072)))

    def mlp_time(bf16: bool) -> float:
        times = []
        for _ in range(7):  # the first two warm up
            start = time.perf_counter()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                F.linear(F.gelu(F.linear(tokens, up)), down)
            times.append(time.perf_counter() - start)
        return statistics.median(times[2:])

    speedup = mlp_time(False) / mlp_time(True)
    log.info("bfloat16 runs %.2f× as fast as float32 on this CPU: PRECISION=auto runs %s", speedup,
             "bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32")
    return speedup


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a forward pass on ``device`` runs under bfloat16 autocast at this ``precision``: ``"auto"``
    on a CUDA device that supports bfloat16, and on a CPU that has bfloat16 instructions and runs them at least
    :data:`BF16_MIN_SPEEDUP` times as fast as float32 (:func:`cpu_bf16_speedup`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"PRECISION must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return cpu_has_bf16() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP
    return precision == "bf16"


class ImageShapeError(ValueError):
    """An image the predictor refuses for its shape; the message says why."""


@dataclass
class SemanticPrediction:
    """One image's result at its original size.

    Attributes:
        label_map: (H, W) int16, the vocabulary index per pixel, or ``UNLABELED``.
        confidence: (H, W) float32, the winning class's probability per pixel.
        found: the score of every label the model found, by vocabulary index, including those then
            left unlabeled for scoring under the pruning's ``min_score`` (None: the region scores).
        missed: every label the pre-label leaves out, by vocabulary index, with its peak probability in the dense
            map without the presence prior (:func:`model.regions.peak_probabilities`): the task score counts each
            as a label scoring 0, weighed by how likely the image shows it.
        peaks: (C,) every label's peak probability (None: no dense map, as for a click's answer).
        checked_out: the labels whose regions :meth:`Predictor.check_regions` unlabeled, with their peak
            probability: the review score counts them as left out, the acquisition's stream score keeps their
            found score (:mod:`model.task_scores`).
        ordering: each found label's score by the confidences its pixels were decided by (None: ``found``): a
            refined pre-label's are the filtered lower bound of the probabilities (:func:`model.regions.regions`),
            which falls between cells of different labels, so it reads how unsure the boundaries are. The
            acquisition's stream score reads it: ordered by the calibrated scores instead, the stream's 20 tasks
            in one round led random by 0.4 to 1.3 less on 3 of 5 pools and CLIPs (by 0.1 and 0.6 more on the
            others), and in four rounds of 5 on one pool by 1.2 and 8.6 less (two seeds; README, *Measured →
            Active learning*).
        background: its vocabulary named other things (:meth:`served`): a pixel left unlabeled may be right, and a
            pre-label of no label at all is an answer the task score reads (:mod:`model.task_scores`).
    """

    label_map: np.ndarray
    confidence: np.ndarray
    found: dict[int, float] | None = None
    missed: dict[int, float] = field(default_factory=dict)
    peaks: np.ndarray | None = None
    checked_out: dict[int, float] = field(default_factory=dict)
    ordering: dict[int, float] | None = None
    background: bool = False

    @cached_property
    def region_scores(self) -> dict[int, float]:
        """The mean confidence of each predicted class's pixels, by vocabulary index (computed once:
        the task score and every control tag's results read it)."""
        bins = torch.from_numpy(self.label_map.ravel()) + 1  # UNLABELED (-1) → bin 0; int16: no wide copy of a photo
        counts = torch.bincount(bins)[1:]
        sums = torch.bincount(bins, torch.from_numpy(self.confidence.ravel()).double())[1:]
        return {int(c): float(sums[c] / counts[c]) for c in torch.nonzero(counts).flatten()}

    @property
    def found_scores(self) -> dict[int, float]:
        return self.region_scores if self.found is None else self.found

    def served(self, count: int) -> SemanticPrediction:
        """This prediction with the labels from index ``count`` on (a vocabulary's other things) left out: their
        pixels unlabeled, as a pruned region's are, and nothing of them in the scores."""
        def kept(scores):
            return None if scores is None else {c: v for c, v in scores.items() if c < count}

        return replace(self, label_map=np.where(self.label_map >= count, UNLABELED, self.label_map).astype(np.int16),
                       found=kept(self.found), missed=kept(self.missed), checked_out=kept(self.checked_out),
                       ordering=kept(self.ordering), peaks=None if self.peaks is None else self.peaks[:count],
                       background=True)


class Calibrated(NamedTuple):
    """One image's calibrated pass.

    Attributes:
        scores: (C, h, w) the scores whose softmax is served (:meth:`Predictor.logits`).
        prior: (C,) the frozen CLIP's image-level log-probabilities of the labels: what it sees in the whole image,
            in the project's words (the zero-shot presence cut reads it; :mod:`model.acquisition` clusters tasks
            on it).
        presence: (C,) the prior's share of ``scores`` (:func:`model.presence.offsets`).
    """

    scores: torch.Tensor
    prior: torch.Tensor
    presence: torch.Tensor


class Predictor:
    """Runs a :class:`model.segmenter.Segmenter` on RGB images.

    Each image is resized so its short side is ``inference_size`` (rounded to the tower's
    stride); images of the same resized shape are batched into one forward pass. Images
    whose long side exceeds ``max_aspect`` × the short side are covered by overlapping
    square windows instead. An image that would cost more than ``max_area`` × inference_size²
    pixels after resizing is scaled down further to fit; one so elongated that its short side
    would then fall under one patch is refused (:class:`ImageShapeError`). Text embeddings come
    from the :class:`TextEncoder`'s cache.
    Confidences are softmax probabilities of the logits divided by ``temperature`` (see
    :mod:`model.calibration`; None: fitted per vocabulary without labels), with the frozen
    CLIP's image-level presence prior at ``presence_weight`` (:mod:`model.presence`), one weight for every
    label: the prior's log-probabilities are all negative, so a label weighted more than the others loses to
    them (labels training never saw, served at the zero-shot weight beside a lower fitted one, lost 4 to 5 mIoU).
    A fine-tuned version's calibration refits ``presence_weight`` for each label within its group (trained on,
    or not); the split of the prior between the two groups keeps the weight it was built with
    (:func:`model.presence.offsets`).
    A fine-tuned version also maps its served confidences to how often they are right (``confidence_scale``,
    :func:`model.calibration.fit_confidence_scale`): refinement gets right more pixels than the temperature's
    probabilities say.
    ``precision``: ``"auto"`` runs the forward pass under bfloat16 autocast where the hardware runs
    bfloat16 faster (:func:`uses_bf16`) and in float32 elsewhere; ``"bf16"`` or ``"fp32"`` force one. ``refine_boundaries``: label boundaries follow the image's edges
    (:mod:`model.regions`).
    """

    def __init__(self, segmenter, text_encoder: TextEncoder, inference_size: int = DEFAULTS.inference_size,
                 batch_size: int = DEFAULTS.batch_size, max_aspect: float = 2.0,
                 device: str | torch.device = DEFAULTS.device, temperature: float | None = DEFAULTS.temperature,
                 max_area: float = DEFAULTS.max_area, precision: str = DEFAULTS.precision,
                 refine_boundaries: bool = DEFAULTS.refine_boundaries,
                 presence_weight: float = DEFAULTS.presence_weight):
        self.segmenter = segmenter.to(device).eval()
        self.text_encoder = text_encoder
        self.device = torch.device(device)
        self.stride = segmenter.stride
        self.inference_size = max(self.stride, int(round(inference_size / self.stride)) * self.stride)
        self.batch_size = batch_size
        self.max_aspect = max_aspect
        self.max_area = max_area
        self.temperature = temperature
        self.presence_weight = presence_weight
        self.group_presence_weight = presence_weight  # calibration refits the other alone
        self.label_free = presence.LabelFreeTemperature()
        self.confidence_scale: tuple[float, float] | None = None  # a fine-tuned version's, fitted as it is served
        self.refine_boundaries = refine_boundaries
        self.autocast_bf16 = uses_bf16(precision, self.device)
        self._lock = threading.Lock()  # one forward at a time per model (torch uses all cores anyway)

    def inference_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to, multiples of the stride.

        Raises:
            ImageShapeError: the image is too elongated to fit the pixel budget.
        """
        scale = self.inference_size / min(height, width)
        budget = self.max_area * self.inference_size ** 2
        if height * width * scale ** 2 > budget:
            scale = math.sqrt(budget / (height * width))
        if min(height, width) * scale < self.stride:
            raise ImageShapeError(f"the image is {width}x{height}: too elongated to segment (an aspect ratio over "
                                  f"{budget / self.stride ** 2:.0f}:1 leaves less than one {self.stride}-pixel patch "
                                  "across within MAX_INFERENCE_AREA)")
        snap = lambda v: max(self.stride, int(round(v * scale / self.stride)) * self.stride)  # noqa: E731
        return snap(height), snap(width)

    def _to_tensor(self, image: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
        """(H, W, 3) uint8 → (3, *shape), normalised by the segmenter. Normalising is linear, so it comes after
        resizing: a photo costs one full-resolution float copy, not the three that normalising it would make."""
        pixels = torch.tensor(image, device=self.device).permute(2, 0, 1)[None].float()  # (1, 3, H, W), 0-255
        small = F.interpolate(pixels, size=shape, mode="bilinear", align_corners=False, antialias=True)
        return self.segmenter.preprocess(small.permute(0, 2, 3, 1))[0]

    def _windows(self, shape: tuple[int, int]) -> list[tuple[int, int]]:
        """Top-left corners of square windows covering ``shape`` with about one third overlap."""
        size = self.inference_size
        def starts(length):
            if length <= size:
                return [0]
            count = math.ceil((length - size) / (size * 2 / 3)) + 1
            return [round(i * (length - size) / (count - 1)) for i in range(count)]
        return [(y, x) for y in starts(shape[0]) for x in starts(shape[1])]

    def logits(self, images: list[np.ndarray], vocabulary: Vocabulary) -> list[torch.Tensor]:
        """Per image (C, h, w) calibrated scores at the resized resolution / stride, whose softmax is what is
        served: a fine-tuned segmenter's ensemble of its tuned and frozen classifiers (see
        :class:`model.segmenter.Segmenter`) over the temperature, plus the presence prior (:mod:`model.presence`)."""
        return [calibrated.scores for calibrated in self.calibrated(images, vocabulary)]

    def calibrated(self, images: list[np.ndarray], vocabulary: Vocabulary) -> list[Calibrated]:
        """Per image, :meth:`logits` with the image-level prior and its share of them."""
        return self._calibrated(self.passes(images, vocabulary), vocabulary)

    def logits_and_embeddings(self, images: list[np.ndarray], vocabulary: Vocabulary
                              ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per image, :meth:`calibrated`'s scores, the pixel embeddings they classify, (D, h, w) L2-normalised, and
        its prior and presence: what interactive refinement (:mod:`model.refinement`) reuses, from the same one
        pass."""
        classes = len(vocabulary.labels)
        passes = self.passes(images, vocabulary, with_embeddings=True)
        calibrated = self._calibrated([(out[:classes], prior) for out, prior in passes], vocabulary)
        return [(scores, F.normalize(out[classes:], dim=0), prior, offsets)
                for (scores, prior, offsets), (out, _) in zip(calibrated, passes, strict=True)]

    def presence(self, priors: list[torch.Tensor], vocabulary: Vocabulary) -> list[torch.Tensor]:
        """Per image, (C,) what the presence prior adds to the scores of ``vocabulary``'s labels
        (:func:`model.presence.offsets`), given its (C,) image-level log-probabilities."""
        seen = self._seen(vocabulary)
        return [presence.offsets(prior, self.presence_weight, seen, self.group_presence_weight) for prior in priors]

    def _seen(self, vocabulary: Vocabulary) -> torch.Tensor | None:
        """(C,) bool: the labels of ``vocabulary`` the segmenter was fine-tuned on; None for a zero-shot one."""
        weights = self.segmenter.ensemble_weights(vocabulary.labels)
        return None if weights is None else weights.seen

    def temperature_for(self, vocabulary: Vocabulary, passes=()) -> float:
        """The temperature for ``vocabulary``: the set one, or the label-free one pooled with ``passes``."""
        if self.temperature is not None:
            return self.temperature
        classes = len(vocabulary.labels)
        return self.label_free.update(vocabulary.key, [(out[:classes], prior) for out, prior in passes])

    def _calibrated(self, passes, vocabulary: Vocabulary) -> list[Calibrated]:
        temperature = self.temperature_for(vocabulary, passes)
        shares = self.presence([prior for _, prior in passes], vocabulary)
        return [Calibrated(presence.shift(out, temperature, share), prior, share)
                for (out, prior), share in zip(passes, shares, strict=True)]

    @torch.no_grad()
    def passes(self, images: list[np.ndarray], vocabulary: Vocabulary, with_embeddings: bool = False,
               frozen_only: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, the segmenter's (C[+D], h, w) logits (and embeddings) before any calibration (``frozen_only``:
        the frozen CLIP's log-probabilities alone), and the frozen CLIP's (C,) image-level log-probabilities of
        the labels."""
        text = self.text_encoder.embed(vocabulary)
        weights = (EnsembleWeights.frozen_only(len(vocabulary.labels)) if frozen_only
                   else self.segmenter.ensemble_weights(vocabulary.labels))
        jobs = []  # (image index, window corner or None, tensor)
        for index, image in enumerate(images):
            shape = self.inference_shape(*image.shape[:2])
            tensor = self._to_tensor(image, shape)
            if max(shape) > self.max_aspect * min(shape):
                for y, x in self._windows(shape):
                    crop = tensor[:, y:y + self.inference_size, x:x + self.inference_size]
                    jobs.append((index, (y, x, shape), crop))
            else:
                jobs.append((index, None, tensor))
        outputs = self._forward(jobs, text, weights, with_embeddings)
        maps = self._merge_windows(jobs, [out for out, _ in outputs], len(images))
        priors: list[list[torch.Tensor]] = [[] for _ in images]
        for (index, _, _), (_, image_logits) in zip(jobs, outputs, strict=True):
            priors[index].append(presence.log_prior(image_logits))
        # A windowed image's prior: the windows' mean log-probability, renormalised.
        return [(out, presence.log_prior(torch.stack(p).mean(0))) for out, p in zip(maps, priors, strict=True)]

    def _forward(self, jobs: list, text: torch.Tensor, frozen_weights: EnsembleWeights | None,
                 with_embeddings: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The segmenter's (logits, image-level logits) for each job's tensor, batching tensors of one shape;
        kept on the device."""
        outputs: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for j, (_, _, tensor) in enumerate(jobs):
            groups.setdefault(tuple(tensor.shape), []).append(j)
        with self._lock, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            for members in groups.values():
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start:start + self.batch_size]
                    batch = torch.stack([jobs[j][2] for j in chunk])
                    maps, image_logits = self.segmenter(batch, text.to(self.device), frozen_weights, with_embeddings)
                    for j, out, image in zip(chunk, maps.float(), image_logits.float(), strict=True):
                        outputs[j] = (out, image)
        return outputs

    def _merge_windows(self, jobs: list, outputs: list[torch.Tensor], count: int) -> list[torch.Tensor]:
        """One (C, h, w) map per image: a window's logits averaged where windows overlap."""
        results: list = [None] * count
        for (index, window, _), out in zip(jobs, outputs, strict=True):
            if window is None:
                results[index] = out
                continue
            y, x, shape = window
            if results[index] is None:
                grid = (shape[0] // self.stride, shape[1] // self.stride)
                results[index] = [out.new_zeros(out.shape[0], *grid), out.new_zeros(1, *grid)]
            total, covered = results[index]
            ys, xs = y // self.stride, x // self.stride
            total[:, ys:ys + out.shape[1], xs:xs + out.shape[2]] += out
            covered[:, ys:ys + out.shape[1], xs:xs + out.shape[2]] += 1
        return [r if isinstance(r, torch.Tensor) else r[0] / r[1].clamp(min=1) for r in results]

    @staticmethod
    def to_semantic(logits: torch.Tensor, height: int, width: int, temperature: float = 1.0,
                    rules: RegionRules = NO_PRUNING, image: np.ndarray | None = None,
                    prior: torch.Tensor | None = None, presence: torch.Tensor | None = None,
                    confidence_scale: tuple[float, float] | None = None) -> SemanticPrediction:
        """(C, h, w) logits → the argmax and probability of ``softmax(upsampled logits / temperature)`` at
        (height, width), on the logits' device, in time and memory that do not grow with C; regions
        pruned by ``rules`` (given the image-level ``prior`` and its ``presence`` share of ``logits``, where they
        cut by it) and, given the RGB ``image``, boundaries refined, the confidences through ``confidence_scale``
        (:func:`model.regions.regions`)."""
        label_map, confidence, found, missed, peaks, ordering = regions(logits, height, width, temperature, rules, image,
                                                                        prior, presence, confidence_scale)
        return SemanticPrediction(label_map, confidence, found, missed, peaks, ordering=ordering)

    def predict(self, images: list[np.ndarray], vocabulary: Vocabulary,
                rules: RegionRules = NO_PRUNING) -> list[SemanticPrediction]:
        """images: RGB uint8 arrays (H, W, 3) of any sizes → one prediction per image."""
        return self.semantic(images, self.calibrated(images, vocabulary), rules, vocabulary)

    def semantic(self, images: list[np.ndarray], passes: list[Calibrated], rules: RegionRules = NO_PRUNING,
                 vocabulary: Vocabulary | None = None) -> list[SemanticPrediction]:
        """:meth:`calibrated`'s output for ``images`` of ``vocabulary`` → their predictions (refined if
        :attr:`refine_boundaries`; regions checked by their crops if ``rules.region_check``, which needs
        ``vocabulary``; its other things left out)."""
        predictions = [self.to_semantic(scores, *image.shape[:2], 1.0, rules,
                                        image if self.refine_boundaries else None, prior, offsets,
                                        self.confidence_scale)
                       for image, (scores, prior, offsets) in zip(images, passes, strict=True)]
        if rules.region_check:
            if vocabulary is None:
                raise ValueError("checking regions by their crops needs the vocabulary")
            predictions = self.check_regions(images, predictions, vocabulary)
        if vocabulary is not None and vocabulary.others:
            return [p.served(len(vocabulary.served)) for p in predictions]
        return predictions

    @torch.no_grad()
    def check_regions(self, images: list[np.ndarray], predictions: list[SemanticPrediction],
                      vocabulary: Vocabulary) -> list[SemanticPrediction]:
        """``predictions`` of ``images`` of ``vocabulary`` with each region that its own masked crop
        does not show to the frozen CLIP left unlabeled (:func:`model.presence.unshown_regions`); a fine-tuned
        version's region only if the version's own view of the crop does not show it either, since the version may
        know a label the frozen CLIP does not. One more batched tower pass, over every region's crop at the CLIP's
        own size, gives both views: a fraction of the image's pass, which runs at a larger size.

        A label it unlabels goes to :attr:`SemanticPrediction.checked_out` at its peak probability (1 without a
        dense map): the review score counts it as left out, as the presence cut's are, which ranks tasks by their
        mIoU better; the acquisition's order reads the stream score, which keeps its found score, since the tasks
        whose confusions the check removed are those that teach a version most (README, *Measured → Active
        learning*)."""
        # Cached: the task score and the tags read it too. Other things are never served: nothing to check.
        kept = [[c for c in p.region_scores if c < len(vocabulary.served)] for p in predictions]
        weights = self.segmenter.ensemble_weights(vocabulary.labels)
        size = self.segmenter.native_size
        crops, coverages = [], []  # the version's view reads the crop's cells its region covers
        for image, p, labels in zip(images, predictions, kept, strict=True):
            for label in labels:
                mask = p.label_map == label
                crops.append(presence.masked_crop(image, mask, size))
                if weights is not None:
                    coverages.append(presence.crop_coverage(mask, size // self.stride))
        if not crops:
            return predictions
        tensor = self.segmenter.preprocess(torch.from_numpy(np.stack(crops)).to(self.device))
        outputs = self._forward([(k, None, crop) for k, crop in enumerate(tensor)],
                                self.text_encoder.embed(vocabulary), weights, False)
        crop_priors = torch.stack([presence.log_prior(image_logits).cpu() for _, image_logits in outputs])
        views = None if weights is None else self._version_views(outputs, crop_priors, coverages, vocabulary)
        checked, start = [], 0
        for p, labels in zip(predictions, kept, strict=True):
            end = start + len(labels)
            cut = presence.unshown_regions(labels, crop_priors[start:end], None if views is None else views[start:end])
            start = end
            if cut:
                p = SemanticPrediction(np.where(np.isin(p.label_map, cut), UNLABELED, p.label_map).astype(np.int16),
                                       p.confidence, p.found_scores, p.missed, p.peaks,
                                       {c: 1.0 if p.peaks is None else float(p.peaks[c]) for c in cut}, p.ordering)
            checked.append(p)
        return checked

    def _version_views(self, outputs: list, crop_priors: torch.Tensor, coverages: list[np.ndarray],
                       vocabulary: Vocabulary) -> torch.Tensor:
        """(K, C): per crop, the log of a fine-tuned version's mean served probability of each label over the cells
        its region covers (``coverages``, (h, w) each: :func:`model.presence.crop_coverage`), calibrated as the
        version serves (temperature, the crop's own presence prior)."""
        temperature = self.temperature_for(vocabulary)
        shares = self.presence(list(crop_priors), vocabulary)
        views = []
        for (out, _), share, coverage in zip(outputs, shares, coverages, strict=True):
            probabilities = presence.shift(out.cpu(), temperature, share).softmax(0)  # (C, h, w)
            coverage = torch.from_numpy(coverage)
            if not coverage.any():  # a few pixels scattered over a wide box: the crop's cells as a whole
                coverage = torch.ones_like(coverage)
            views.append(((probabilities * coverage).sum((1, 2)) / coverage.sum()).clamp_min(1e-12).log())
        return torch.stack(views)
