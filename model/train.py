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
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.losses import (IGNORE, classification_loss, distillation_loss, diversified_logits, pool_regions,
                          text_guided_distillation_loss)
from model.synonyms import candidate_names, filter_synonyms
from model.vocabulary import TextEncoder, Vocabulary

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One annotated image: ``labels`` (H, W) holds vocabulary indices, ``IGNORE`` where unannotated."""

    image: np.ndarray
    labels: np.ndarray


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    size: int = 448  # training crops are size×size after resizing the short side to about this
    seed: int = 0
    diversify: bool = True  # name regions by random kept synonyms
    distill: bool = True  # text-guided knowledge distillation towards the frozen CLIP
    classification_weight: float = 1.0
    distill_weight: float = 1.0
    synonym_threshold: float = 0.1
    max_regions: int = 200  # per step, as in the paper's code
    log_every: int = 25


@dataclass
class Region:
    sample: int
    cls: int
    teacher: torch.Tensor  # (D,) frozen CLIP embedding of the masked crop
    names: list[str]  # kept names (the class name first)


def masked_crop(image: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """The region's bounding box with everything outside the mask grey, padded square, resized."""
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.where(mask[top:bottom, left:right, None], image[top:bottom, left:right], 128).astype(np.uint8)
    side = max(crop.shape[:2])
    canvas = np.full((side, side, 3), 128, np.uint8)
    y0, x0 = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    canvas[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC))


@torch.no_grad()
def teacher_embeddings(clip, crops: list[np.ndarray], batch_size: int = 64) -> torch.Tensor:
    """(N, D) normalised global embeddings of the frozen CLIP image tower."""
    mean, std = torch.tensor(clip.mean).view(1, 3, 1, 1), torch.tensor(clip.std).view(1, 3, 1, 1)
    device = next(clip.model.parameters()).device
    out = []
    for start in range(0, len(crops), batch_size):
        batch = torch.from_numpy(np.stack(crops[start:start + batch_size])).permute(0, 3, 1, 2).float() / 255
        out.append(F.normalize(clip.model.encode_image(((batch - mean) / std).to(device)).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, clip.model.visual.output_dim)


def prepare_regions(clip, encoder: TextEncoder, samples: list[Sample], vocabulary: Vocabulary,
                    threshold: float) -> dict[tuple[int, int], Region]:
    """Teacher embeddings and kept synonyms for every (sample, class) region."""
    keys, crops = [], []
    for index, sample in enumerate(samples):
        for cls in np.unique(sample.labels):
            if cls != IGNORE and 0 <= cls < len(vocabulary):
                keys.append((index, int(cls)))
                crops.append(masked_crop(sample.image, sample.labels == cls, clip.image_size))
    teachers = teacher_embeddings(clip, crops)
    candidates = candidate_names(vocabulary)
    flat = encoder.embed_texts([name for names in candidates for name in names])
    candidate_text = list(torch.split(flat, [len(names) for names in candidates]))
    scale = float(clip.model.logit_scale.detach().exp())
    regions = {}
    for (index, cls), teacher in zip(keys, teachers):
        kept = filter_synonyms(teacher, candidate_text[cls], scale, threshold)
        regions[(index, cls)] = Region(index, cls, teacher, [candidates[cls][k] for k in kept])
    return regions


def _augment(rng: np.random.Generator, sample: Sample, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Random scale (short side 1.0-1.3 × size), random size×size crop, random horizontal flip."""
    height, width = sample.labels.shape
    scale = size * rng.uniform(1.0, 1.3) / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    image = np.asarray(Image.fromarray(sample.image).resize((new_w, new_h), Image.BILINEAR))
    labels = np.asarray(Image.fromarray(sample.labels.astype(np.int32)).resize((new_w, new_h), Image.NEAREST))
    top, left = rng.integers(0, new_h - size + 1), rng.integers(0, new_w - size + 1)
    image, labels = image[top:top + size, left:left + size], labels[top:top + size, left:left + size]
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


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
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    text = encoder.embed(vocabulary)
    regions = prepare_regions(clip, encoder, samples, vocabulary, config.synonym_threshold)
    name_embedding = {name: e for r in regions.values() for name, e in zip(r.names, encoder.embed_texts(r.names))}
    mean, std = torch.tensor(clip.mean).view(3, 1, 1), torch.tensor(clip.std).view(3, 1, 1)
    size = max(segmenter.stride, round(config.size / segmenter.stride) * segmenter.stride)
    text_scale = torch.nn.Parameter(torch.tensor(1.0))
    parameters = [p for p in segmenter.parameters() if p.requires_grad] + [text_scale]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
    device = next(segmenter.parameters()).device
    segmenter.train()
    summary: dict = {}
    for step in range(config.steps):
        chosen = rng.integers(0, len(samples), config.batch_size)
        images, labels, masks, classes, drawn_text, teachers = [], [], [], [], [], []
        for index in chosen:
            image, label_map = _augment(rng, samples[index], size)
            present = [int(c) for c in np.unique(label_map) if (int(index), int(c)) in regions]
            region_list = [regions[(int(index), c)] for c in present]
            images.append((torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std)
            labels.append(torch.from_numpy(label_map.astype(np.int64)))
            masks.append(torch.from_numpy(np.stack([label_map == c for c in present])) if present
                         else torch.zeros(0, size, size, dtype=torch.bool))
            classes.append(torch.tensor(present, dtype=torch.long))
            names = [r.names[rng.integers(len(r.names))] if config.diversify else r.names[0] for r in region_list]
            drawn_text.append(torch.stack([name_embedding[n] for n in names]) if names else text[:0])
            teachers.append(torch.stack([r.teacher for r in region_list]) if region_list else text[:0])
        embeddings, _ = segmenter.embed(torch.stack(images).to(device))
        logits = diversified_logits(embeddings, text.to(device), segmenter.log_logit_scale.exp(),
                                    [m.to(device) for m in masks], classes,
                                    [t.to(device) for t in drawn_text] if config.diversify else None, (size, size))
        loss_ce = classification_loss(logits, torch.stack(labels).to(device))
        loss = config.classification_weight * loss_ce
        loss_kd = torch.zeros((), device=device)
        if config.distill:
            budget = config.max_regions
            terms = []
            for b in range(len(images)):
                count = min(len(classes[b]), budget)
                if count == 0:
                    continue
                budget -= count
                student = pool_regions(embeddings[b], masks[b][:count].to(device))
                teacher = teachers[b][:count].to(device)
                plain = distillation_loss(student, teacher)
                guided = text_guided_distillation_loss(student, teacher, drawn_text[b][:count].to(device), text_scale)
                terms.append((plain + guided) / 2)
            if terms:
                loss_kd = torch.stack(terms).mean()
                loss = loss + config.distill_weight * loss_kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        summary = {"step": step + 1, "loss": loss.item(), "loss_classification": loss_ce.item(),
                   "loss_distillation": loss_kd.item()}
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            log.info("step %d/%d loss %.4f (classification %.4f, distillation %.4f)", step + 1, config.steps,
                     summary["loss"], summary["loss_classification"], summary["loss_distillation"])
        if progress:
            progress(step + 1, summary)
    segmenter.eval()
    summary.update(seconds=round(time.time() - started, 1), regions=len(regions),
                   mean_kept_names=round(float(np.mean([len(r.names) for r in regions.values()])), 2),
                   config=asdict(config))
    return summary
