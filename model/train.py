"""Fine-tuning the segmenter on annotated images with GKC's two regularisers.

    samples (image, label map) ──▶ regions (one per class present in an image)
        regions ──frozen CLIP on masked crops──▶ teacher embeddings  (computed once, cached)
        teacher + WordNet candidates ──▶ kept synonyms per region  (text diversification)
    each step: augmented batch ──▶ segmenter ──▶ CE with drawn synonyms + text-guided distillation

The image tower stays frozen by default, so a step costs one no-grad tower pass plus the
decoder's forward and backward: practical on a CPU.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.losses import (
    classification_loss,
    distillation_loss,
    diversified_logits,
    pool_regions,
    text_guided_distillation_loss,
)
from model.predictor import uses_bf16
from model.presence import masked_crop
from model.synonyms import candidate_names, filter_synonyms
from model.vocabulary import BACKGROUND, UNLABELED, TextEncoder, Vocabulary

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One annotated image: ``labels`` (H, W) holds vocabulary indices, ``UNLABELED`` where unannotated.
    ``background``: its tag names other things the images show (:attr:`Vocabulary.others`), so a pixel left
    unannotated is one of them (the annotator painted every label the image shows); else it says nothing."""

    image: np.ndarray
    labels: np.ndarray
    background: bool = False


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    tower_lr_factor: float = 0.1  # unfrozen image-tower blocks learn this much slower than the decoder
    size: int = 448  # training crops are size×size after resizing the short side to about this
    seed: int = 0
    diversify: bool = True  # name regions by random kept synonyms
    distill: bool = True  # text-guided knowledge distillation towards the frozen CLIP
    classification_weight: float = 1.0
    distill_weight: float = 1.0
    synonym_threshold: float = 0.1
    synonym_temperature: float | None = 100.0  # CLIP's logit scale for the filter (None: the model's own)
    distill_unlabeled: bool = True  # also distil the unannotated parts of each image
    max_regions: int = 200  # per step, as in the paper's code
    paste: float = 0.5  # the share of crops that get one annotated label of another image pasted in (copy_paste)
    precision: str = "auto"  # the forward pass under bfloat16 autocast where the hardware runs it faster (PRECISION)
    log_every: int = 25


@dataclass
class Region:
    sample: int
    cls: int
    teacher: torch.Tensor  # (D,) frozen CLIP embedding of the masked crop
    names: list[str]  # kept names (the class name first)


@torch.no_grad()
def teacher_embeddings(clip, crops: list[np.ndarray], batch_size: int = 64) -> torch.Tensor:
    """(N, D) normalised global embeddings of the frozen CLIP image tower."""
    device = next(clip.model.parameters()).device
    out = []
    for start in range(0, len(crops), batch_size):
        batch = clip.preprocess(torch.from_numpy(np.stack(crops[start:start + batch_size])).to(device))
        out.append(F.normalize(clip.model.encode_image(batch).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, clip.model.visual.output_dim)


UNLABELED_BASE = 1000  # region ids ≥ this are parts of the unannotated area


def region_map(sample: Sample, min_fraction: float = 0.01) -> np.ndarray:
    """(H, W) int32 region ids: the class index on annotated pixels; ``UNLABELED_BASE + k`` on the
    k-th connected part of the unannotated area (parts under ``min_fraction`` of the image: UNLABELED)."""
    regions = sample.labels.astype(np.int32).copy()
    count, parts = cv2.connectedComponents((sample.labels == UNLABELED).astype(np.uint8), connectivity=4)
    sizes = np.bincount(parts.ravel(), minlength=count)
    for part in range(1, count):
        if sizes[part] >= min_fraction * parts.size:
            regions[parts == part] = UNLABELED_BASE + part
    return regions


def prepare_regions(clip, encoder: TextEncoder, samples: list[Sample], vocabulary: Vocabulary,
                    config: TrainConfig) -> tuple[dict[tuple[int, int], Region], list[np.ndarray]]:
    """Region maps of the samples; teacher embeddings and kept synonyms for every region.

    Unannotated parts get a teacher embedding too (``config.distill_unlabeled``): distilling
    them keeps what CLIP knows about the classes nobody annotated.
    """
    maps = [region_map(sample) if config.distill_unlabeled else sample.labels.astype(np.int32) for sample in samples]
    keys, crops = [], []
    for index, (sample, regions) in enumerate(zip(samples, maps, strict=True)):
        for value in np.unique(regions):
            if value >= UNLABELED_BASE or 0 <= value < len(vocabulary):
                keys.append((index, int(value)))
                crops.append(masked_crop(sample.image, regions == value, clip.image_size))
    teachers = teacher_embeddings(clip, crops)
    candidates = candidate_names(vocabulary)
    flat = encoder.embed_texts([name for names in candidates for name in names])
    candidate_text = list(torch.split(flat, [len(names) for names in candidates]))
    scale = config.synonym_temperature or float(clip.model.logit_scale.detach().exp())
    out = {}
    for (index, value), teacher in zip(keys, teachers, strict=True):
        if value >= UNLABELED_BASE:
            out[(index, value)] = Region(index, -1, teacher, [])
        else:
            kept = filter_synonyms(teacher, candidate_text[value], scale, config.synonym_threshold)
            out[(index, value)] = Region(index, value, teacher, [candidates[value][k] for k in kept])
    return out, maps


def _augment(rng: np.random.Generator, image: np.ndarray, regions: np.ndarray, size: int):
    """Random scale (short side 1.0-1.3 × size), random size×size crop, random horizontal flip."""
    height, width = regions.shape
    scale = size * rng.uniform(1.0, 1.3) / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    labels = np.asarray(Image.fromarray(regions.astype(np.int32)).resize((new_w, new_h), Image.NEAREST))
    top, left = rng.integers(0, new_h - size + 1), rng.integers(0, new_w - size + 1)
    image, labels = image[top:top + size, left:left + size], labels[top:top + size, left:left + size]
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    # The image is copied, crop only: PIL's buffer is read-only, and a crop as wide as it would stay a view of it.
    return np.array(image, order="C"), np.ascontiguousarray(labels)


@dataclass(frozen=True)
class Cutout:
    """One annotated label of one sample, to be pasted into other crops: its bounding box in the sample."""

    sample: int
    cls: int
    box: tuple[int, int, int, int]  # top, bottom, left, right (exclusive)


def cutouts(samples: list[Sample], classes: int) -> tuple[list[Cutout], np.ndarray]:
    """Every annotated label of every sample, and the chance of drawing each: in proportion to one over the
    samples that show its label, so each label is drawn alike however few images show it."""
    found, showing = [], np.zeros(classes)
    for index, sample in enumerate(samples):
        for cls in np.unique(sample.labels):
            if 0 <= cls < classes:
                mask = sample.labels == cls
                rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                found.append(Cutout(index, int(cls), (int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1)))
                showing[cls] += 1
    weights = np.array([1 / showing[c.cls] for c in found])
    return found, weights / weights.sum() if len(found) else weights


def copy_paste(rng: np.random.Generator, image: np.ndarray, ids: np.ndarray, sample: Sample, cutout: Cutout):
    """Paste ``cutout``'s pixels of its label into a size×size crop (image (size, size, 3), region ids (size, size)) at
    a random place, at the scale :func:`_augment` gives its own image, shrunk to at most a quarter to 0.6 of the
    crop's side: a label one image shows is then learnt on other backgrounds, beside other labels, at other
    places (Ghiasi et al., "Simple Copy-Paste", CVPR 2021). The pasted pixels take the label's class id: in a crop
    whose own image does not show the label they count for classification alone (no teacher embedding of theirs
    is distilled)."""
    size = ids.shape[0]
    top, bottom, left, right = cutout.box
    scale = size * rng.uniform(1.0, 1.3) / min(sample.labels.shape)
    scale = min(scale, size * rng.uniform(0.25, 0.6) / max(bottom - top, right - left))
    height, width = (min(size, max(1, round(extent * scale))) for extent in (bottom - top, right - left))
    patch = np.asarray(Image.fromarray(sample.image[top:bottom, left:right]).resize((width, height), Image.BILINEAR))
    mask = np.asarray(Image.fromarray((sample.labels[top:bottom, left:right] == cutout.cls).astype(np.uint8))
                      .resize((width, height), Image.NEAREST)).astype(bool)
    y, x = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
    image, ids = image.copy(), ids.copy()
    image[y:y + height, x:x + width][mask] = patch[mask]
    ids[y:y + height, x:x + width][mask] = cutout.cls
    return image, ids


@dataclass
class Batch:
    """One training step's augmented crops and, per image, its regions (annotated ones first)."""

    images: torch.Tensor  # (B, H, W, 3) uint8
    labels: torch.Tensor  # (B, H, W) class indices, BACKGROUND or UNLABELED elsewhere
    masks: list[torch.Tensor]  # per image (R_b, H, W): its annotated regions
    classes: list[torch.Tensor]  # per image (R_b,): their classes
    drawn_text: list[torch.Tensor]  # per image (R_b, D): the embedding of each region's drawn name
    kd_masks: list[torch.Tensor]  # per image (K_b, H, W): distillation regions (annotated, then unannotated)
    teachers: list[torch.Tensor]  # per image (K_b, D): their frozen-CLIP embeddings


class _Trainer:
    """The state one fine-tuning run steps through; see :func:`finetune`."""

    def __init__(self, segmenter, clip, encoder: TextEncoder, samples: list[Sample], vocabulary: Vocabulary,
                 config: TrainConfig):
        self.segmenter, self.samples, self.config = segmenter, samples, config
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.text = encoder.embed(vocabulary)
        self.others = vocabulary.others
        self.regions, self.maps = prepare_regions(clip, encoder, samples, vocabulary, config)
        names = list(dict.fromkeys(n for r in self.regions.values() for n in r.names))
        self.name_embedding = dict(zip(names, encoder.embed_texts(names), strict=True)) if names else {}
        self.size = max(segmenter.stride, round(config.size / segmenter.stride) * segmenter.stride)
        self.text_scale = torch.nn.Parameter(torch.tensor(1.0))
        tower = [p for p in segmenter.image_tower.parameters() if p.requires_grad]
        head = [p for n, p in segmenter.named_parameters() if p.requires_grad and not n.startswith("image_tower.")]
        self.optimizer = torch.optim.AdamW([{"params": head + [self.text_scale]},
                                            {"params": tower, "lr": config.lr * config.tower_lr_factor}],
                                           lr=config.lr, weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
        self.device = next(segmenter.parameters()).device
        self.bf16 = uses_bf16(config.precision, self.device)
        self.cutouts, self.cutout_chances = cutouts(samples, len(vocabulary.labels))

    def draw_batch(self) -> Batch:
        """Augmented crops of random samples, with their regions and drawn synonyms."""
        size, empty = self.size, torch.zeros(0, self.size, self.size, dtype=torch.bool)
        images, labels, masks, classes, drawn_text, kd_masks, teachers = [], [], [], [], [], [], []
        for index in self.rng.integers(0, len(self.samples), self.config.batch_size):
            image, ids = _augment(self.rng, self.samples[index].image, self.maps[index], size)
            if self.config.paste and self.cutouts and self.rng.random() < self.config.paste:
                cutout = self.cutouts[self.rng.choice(len(self.cutouts), p=self.cutout_chances)]
                image, ids = copy_paste(self.rng, image, ids, self.samples[cutout.sample], cutout)
            present = [self.regions[(int(index), int(v))] for v in np.unique(ids)
                       if (int(index), int(v)) in self.regions]
            annotated = [r for r in present if r.cls >= 0]
            unlabeled = [(int(v), self.regions[(int(index), int(v))]) for v in np.unique(ids)
                         if v >= UNLABELED_BASE and (int(index), int(v)) in self.regions]
            images.append(torch.from_numpy(image))
            unannotated = BACKGROUND if self.samples[index].background else UNLABELED
            labels.append(torch.from_numpy(np.where((ids >= 0) & (ids < UNLABELED_BASE), ids, unannotated)
                                           .astype(np.int64)))
            masks.append(torch.from_numpy(np.stack([ids == r.cls for r in annotated])) if annotated else empty)
            classes.append(torch.tensor([r.cls for r in annotated], dtype=torch.long))
            names = [r.names[self.rng.integers(len(r.names))] if self.config.diversify else r.names[0]
                     for r in annotated]
            drawn_text.append(torch.stack([self.name_embedding[n] for n in names]) if names else self.text[:0])
            kd_masks.append(torch.from_numpy(np.stack([ids == r.cls for r in annotated] + [ids == v for v, _ in unlabeled]))
                            if present else empty)
            teachers.append(torch.stack([r.teacher for r in annotated] + [r.teacher for _, r in unlabeled])
                            if present else self.text[:0])
        return Batch(torch.stack(images), torch.stack(labels), masks, classes, drawn_text, kd_masks, teachers)

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The step's total loss and its two terms."""
        device, config = self.device, self.config
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            embeddings, _ = self.segmenter.embed(self.segmenter.preprocess(batch.images))
        embeddings = embeddings.float()  # the losses and their gradients stay in float32
        logits = diversified_logits(embeddings, self.text.to(device), self.segmenter.log_logit_scale.exp(),
                                    [m.to(device) for m in batch.masks], batch.classes,
                                    [t.to(device) for t in batch.drawn_text] if config.diversify else None,
                                    (self.size, self.size))
        loss_ce = classification_loss(logits, batch.labels.to(device), self.others)
        loss_kd = self.distillation(embeddings, batch) if config.distill else None
        loss = config.classification_weight * loss_ce
        if loss_kd is not None:
            loss = loss + config.distill_weight * loss_kd
        return {"loss": loss, "loss_classification": loss_ce,
                "loss_distillation": torch.zeros((), device=device) if loss_kd is None else loss_kd}

    def distillation(self, embeddings: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        """Plain distillation of every region, averaged with the text-guided term where a region
        has a class name; at most ``config.max_regions`` regions a step. None: no region."""
        budget, terms = self.config.max_regions, []
        for b, teachers in enumerate(batch.teachers):
            count = min(len(teachers), budget)
            if count == 0:
                continue
            budget -= count
            student = pool_regions(embeddings[b], batch.kd_masks[b][:count].to(self.device))
            teacher = teachers[:count].to(self.device)
            plain = distillation_loss(student, teacher)
            named = min(count, len(batch.classes[b]))  # regions with a class name come first
            if named:
                guided = text_guided_distillation_loss(student[:named], teacher[:named],
                                                       batch.drawn_text[b][:named].to(self.device), self.text_scale)
                terms.append((plain + guided) / 2)
            else:
                terms.append(plain)
        return torch.stack(terms).mean() if terms else None

    def step(self, batch: Batch) -> dict[str, float]:
        losses = self.losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.schedule.step()
        return {name: value.item() for name, value in losses.items()}


def finetune(segmenter, clip, encoder: TextEncoder, samples: list[Sample], vocabulary: Vocabulary,
             config: TrainConfig | None = None, progress: Callable[[int, dict], None] | None = None) -> dict:
    """Fine-tune ``segmenter`` in place. Deterministic for a given ``config.seed``.

    Returns:
        A summary: final losses, seconds, steps, number of regions and kept synonyms.
    """
    config = config or TrainConfig()
    if not samples:
        raise ValueError("no annotated samples to train on")
    started = time.time()
    trainer = _Trainer(segmenter, clip, encoder, samples, vocabulary, config)
    segmenter.train()
    summary: dict = {}
    # The next batch is decoded and augmented in a thread while this one trains (PIL and numpy release the
    # GIL); one thread draws them all, in order, so a seed gives the same batches.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="augment") as augmenter:
        upcoming = augmenter.submit(trainer.draw_batch)
        for step in range(config.steps):
            batch = upcoming.result()
            if step + 1 < config.steps:
                upcoming = augmenter.submit(trainer.draw_batch)
            summary = {"step": step + 1, **trainer.step(batch)}
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                log.info("step %d/%d loss %.4f (classification %.4f, distillation %.4f)", step + 1, config.steps,
                         summary["loss"], summary["loss_classification"], summary["loss_distillation"])
            if progress:
                progress(step + 1, summary)
    segmenter.eval()
    segmenter.trained_labels = vocabulary.labels  # inference ensembles these with the frozen CLIP
    named = [len(r.names) for r in trainer.regions.values() if r.cls >= 0]
    summary.update(seconds=round(time.time() - started, 1), regions=len(trainer.regions),
                   mean_kept_names=round(float(np.mean(named)), 2) if named else 0.0,
                   config=asdict(config))
    return summary
