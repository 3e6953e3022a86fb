"""Interactive refinement: an annotator's clicks and boxes → one label's mask, from per-image work kept
between clicks (no tower pass after the first).

The working-resolution image (:func:`model.regions.working_shape`) is cut into SLIC superpixels
(Achanta et al., TPAMI 2012; :mod:`model.superpixels`) about half a logit cell wide. Each has the pixel embedding of the one
forward pass at its centroid, a point in CLIP's joint space, and its mean Lab colour. A click is the
prototype of its superpixel: similarity to it is the embedding cosine less :data:`COLOUR_WEIGHT` ×
the colour distance, the embedding saying what a region is, the colour where it ends. A superpixel
is *the label's* when its most similar prototype is one of the label's (positive clicks; a box's
centre and the spot inside it where the label's text is likeliest) and at least :data:`MIN_SIMILARITY`;
the others (negative clicks, a box's surrounding ring) speak against it.

The mask starts as the label's region in the served pre-label, or as the parts of it that the positive
clicks confirm: a part a positive click lands in, or one that looks like the clicks (more alike than
:data:`CONFIRM_LIKENESS` of the image). Where the pre-label put the label on something else, the
click, not the pre-label, decides. Then each click, in order:

* a positive click adds the connected part of the label's superpixels around it. When the pre-label
  had none of the label, it also adds the label's superpixels everywhere that the label's text
  probability supports (:data:`TEXT_SUPPORT`): one example → all of this class. That probability
  leaves out the image-level presence prior (:mod:`model.presence`): the click has said the label is there.
  Only the first positive click adds them, so a later one does not bring back what a negative click took;
* a negative click removes the connected part of the mask around it that is not the label's.

A box replaces the start by the label's superpixels inside it. The pre-label's regions as prototypes
(their mean embeddings) measured worse than the clicks alone, so the pre-label gives the start and
the text gives the "all of this class" search. Clicks and boxes are in the image's pixels. Nothing is
trained; ``python -m bench.interactive`` measures it with the interactive-segmentation literature's
click simulator.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np
import torch

from model.config import NO_PRUNING, RegionRules
from model.regions import GUIDED_FILTER_EPS, guided_filter, nearest_upsample, regions, working_shape
from model.superpixels import SUPERPIXEL_CELL_SHARE, Superpixels, sample_at

COLOUR_WEIGHT = 4.0  # cosine given up per unit of Lab distance (channels in [0, 1])
MIN_SIMILARITY = 0.2  # the least similarity to a positive prototype of a superpixel that joins the label
TEXT_SUPPORT = 0.1  # "all of this class": the least text probability of the label far from the click
MAX_KEPT_PRELABELS = 4  # pre-labels kept per image, one per pruning rules (tags rarely differ)
CONFIRM_LIKENESS = 0.8  # a pre-label part more like the clicks than this share of the image's superpixels stays
MARGIN_SHARPNESS = 20.0  # similarity margin → probability: a margin of 0.1 is 0.88


class PromptError(ValueError):
    """A click or box that can't be used; the message says which and why."""


@dataclass(frozen=True)
class Prompt:
    """What the annotator gave for one label, in the image's pixels.

    Attributes:
        label: the label's vocabulary index.
        clicks: (x, y, positive) of each click, in the order they were made (a later one wins).
        boxes: (left, top, right, bottom) of each box around the label.
    """

    label: int
    clicks: tuple[tuple[float, float, bool], ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()

    def check(self, height: int, width: int) -> None:
        """Raise :class:`PromptError` unless every click lies in a ``width`` × ``height`` image and every box
        has an area inside it."""
        for x, y, positive in self.clicks:
            if not (0 <= x <= width and 0 <= y <= height):
                raise PromptError(f"the {'positive' if positive else 'negative'} click at ({x:.1f}, {y:.1f}) px "
                                  f"is outside the {width}x{height} image")
        for left, top, right, bottom in self.boxes:
            if min(right, width) - max(left, 0) < 1 or min(bottom, height) - max(top, 0) < 1:
                raise PromptError(f"the box ({left:.1f}, {top:.1f})-({right:.1f}, {bottom:.1f}) px has no area "
                                  f"inside the {width}x{height} image")
        if not (self.clicks or self.boxes):
            raise PromptError("no click or box")


@dataclass
class ImageState:
    """One image's work that every click reuses.

    Attributes:
        logits: (C, h, w) the predictor's calibrated scores for the vocabulary (their softmax is served).
        embeddings: (D, h, w) the L2-normalised pixel embeddings they classify.
        prior: (C,) the frozen CLIP's image-level log-probabilities (zero-shot pre-labels are cut by them).
        presence: (C,) their share of ``logits`` (:meth:`model.predictor.Predictor.presence`).
        image: (H', W', 3) uint8 RGB, the image at the working resolution.
        height, width: the image's own size.
        refined: whether the predictor's pre-labels follow the image's edges (``refine_boundaries``).
    """

    logits: torch.Tensor
    embeddings: torch.Tensor
    prior: torch.Tensor
    presence: torch.Tensor
    image: np.ndarray
    height: int
    width: int
    refined: bool = True
    _prelabels: dict[RegionRules, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_image(cls, logits: torch.Tensor, embeddings: torch.Tensor, prior: torch.Tensor, presence: torch.Tensor,
                   image: np.ndarray, predictor) -> "ImageState":
        """From ``predictor``'s :meth:`~model.predictor.Predictor.logits_and_embeddings` for the RGB ``image``."""
        height, width = image.shape[:2]
        shape = working_shape(logits, height, width)
        small = cv2.resize(np.ascontiguousarray(image), shape[::-1], interpolation=cv2.INTER_AREA)
        return cls(logits, embeddings, prior, presence, small, height, width, predictor.refine_boundaries)

    @property
    def nbytes(self) -> int:
        """What it holds in memory, superpixels and pre-labels included once made."""
        tensors = [self.logits, self.embeddings, self.prior, self.presence, *self._prelabels.values()]
        if "superpixels" in self.__dict__:
            tensors += list(vars(self.superpixels).values())
        return self.image.nbytes + sum(t.numel() * t.element_size() for t in tensors)

    def prelabel(self, rules: RegionRules) -> torch.Tensor:
        """The served pre-label's label map at the working resolution (computed once per rules). Kept as served
        when the pass was made for a pre-label; made here on a click's miss, it is without ``rules.region_check``
        (that takes a tower pass over crops): a click on a label the check cut then starts from the model's own
        region of it."""
        if rules not in self._prelabels:
            label_map, *_ = regions(self.logits, *self.image.shape[:2], 1.0, rules,
                                    self.image if self.refined else None, self.prior, self.presence)
            self._keep(rules, torch.from_numpy(label_map).to(self.logits.device))
        return self._prelabels[rules]

    def _keep(self, rules: RegionRules, label_map: torch.Tensor) -> None:
        """Keep a pre-label, forgetting the oldest past :data:`MAX_KEPT_PRELABELS` (each tag's own
        pruning rules make one; a request must not grow a state without bound)."""
        self._prelabels.pop(rules, None)
        self._prelabels[rules] = label_map
        while len(self._prelabels) > MAX_KEPT_PRELABELS:
            del self._prelabels[next(iter(self._prelabels))]

    def keep_prelabel(self, rules: RegionRules, label_map: np.ndarray) -> None:
        """Keep the pre-label just served under ``rules`` ((height, width), the working resolution's map
        upsampled by nearest neighbour) instead of making it again on the first click."""
        rows = -(-np.arange(self.image.shape[0]) * self.height // self.image.shape[0])  # ceil: back to the source
        cols = -(-np.arange(self.image.shape[1]) * self.width // self.image.shape[1])
        self._keep(rules, torch.from_numpy(label_map[rows[:, None], cols[None]]).to(self.logits.device))

    def with_prelabel(self, rules: RegionRules, label_map: torch.Tensor) -> "ImageState":
        """A copy sharing this state's pass and superpixels whose pre-label under ``rules`` is the (H', W')
        ``label_map`` instead (a simulator's wrong pre-label)."""
        other = copy.copy(self)
        other._prelabels = {}
        other._keep(rules, label_map.to(self.logits.device))
        return other

    @cached_property
    def superpixels(self) -> Superpixels:
        """The image's superpixels at the working resolution (made beside an opened task's answer, or on the first click)."""
        return Superpixels.of(self)

    def working_pixel(self, x: float, y: float) -> tuple[int, int]:
        """The working-resolution (row, column) of the image pixel (x, y)."""
        height, width = self.image.shape[:2]
        return min(height - 1, int(y * height / self.height)), min(width - 1, int(x * width / self.width))


def _prototypes(state: ImageState, prompt: Prompt) -> tuple[list, list]:
    """The (embedding, colour) prototypes for the label and against it: the clicked superpixels; for each box,
    its centre (its middle third) and the superpixel inside it where the label's text is likeliest (the centre
    may lie on something else: a dog behind a candle), against its surrounding ring (one superpixel wide)."""
    pixels = state.superpixels
    own = lambda index: (pixels.embedding[index], pixels.colour[index])  # noqa: E731
    positive = [own(pixels.at(state.working_pixel(x, y))) for x, y, sign in prompt.clicks if sign]
    negative = [own(pixels.at(state.working_pixel(x, y))) for x, y, sign in prompt.clicks if not sign]
    row, col = pixels.centre[:, 0], pixels.centre[:, 1]
    band = max(2.0, float(pixels.size.mean().sqrt()))
    text = _text_chance(state, prompt.label) if prompt.boxes else None
    for box in prompt.boxes:
        (top, left), (bottom, right) = state.working_pixel(box[0], box[1]), state.working_pixel(box[2], box[3])
        middle_row, middle_col = (top + bottom) / 2, (left + right) / 2
        core = ((row - middle_row).abs() <= max(1.0, (bottom - top) / 6)) & \
               ((col - middle_col).abs() <= max(1.0, (right - left) / 6))
        core[pixels.at((int(middle_row), int(middle_col)))] = True
        positive.append(pixels.mean(core))
        inside = (row >= top) & (row <= bottom) & (col >= left) & (col <= right)
        if inside.any():
            positive.append(own(int(torch.where(inside, text, -1.0).argmax())))
        near = (row > top - band) & (row < bottom + band) & (col > left - band) & (col < right + band)
        ring = near & ~inside
        if ring.any():
            negative.append(pixels.mean(ring))
    return positive, negative


def _nearest(pixels: Superpixels, prototypes: list) -> torch.Tensor:
    """(N,): each superpixel's highest similarity to ``prototypes``: embedding cosine less
    :data:`COLOUR_WEIGHT` × colour distance."""
    embeddings = torch.stack([e for e, _ in prototypes])
    colours = torch.stack([c for _, c in prototypes])
    similarity = pixels.embedding @ embeddings.T - COLOUR_WEIGHT * torch.cdist(pixels.colour, colours)
    return similarity.amax(1)


def refine(state: ImageState, prompt: Prompt, rules: RegionRules = NO_PRUNING,
           from_prelabel: bool = True, find_all: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One label's mask after the annotator's clicks and boxes (see the module docstring).

    Args:
        state: the image's kept work.
        prompt: the label and the clicks and boxes (checked with :meth:`Prompt.check`).
        rules: the pruning the pre-label was served with (its label's region is the start).
        from_prelabel: False starts from nothing and uses no text (``bench.interactive``'s "clicks alone").
        find_all: a positive click on a label the pre-label missed finds the label's other regions too.

    Returns:
        mask: (height, width) bool, the label's pixels.
        probability: (height, width) float32, how sure each pixel is of being the label.

    Raises:
        PromptError: a click outside the image, a box without area in it, or neither.
    """
    prompt.check(state.height, state.width)
    superpixels = state.superpixels.labels
    start = state.prelabel(rules) == prompt.label if from_prelabel else torch.zeros_like(superpixels, dtype=torch.bool)
    chance = _superpixel_chance(state, prompt, start)
    ours = (chance > 0.5)[superpixels]
    # A label the pre-label missed: the label's superpixels elsewhere that its text supports join with the example.
    elsewhere = (ours & (_text_chance(state, prompt.label) >= TEXT_SUPPORT)[superpixels]
                 if find_all and from_prelabel and not prompt.boxes and not bool(start.any()) else None)
    inside = _inside(state, prompt.boxes) if prompt.boxes else None
    mask = ours & inside if inside is not None else _confirmed(start, state, prompt)
    for x, y, positive in prompt.clicks:
        where = state.working_pixel(x, y)
        if positive:
            mask |= _part(ours, where)
            if elsewhere is not None:  # with the first positive click only: later negative clicks may take from it
                mask |= elsewhere
                elsewhere = None
        else:
            mask &= ~_part(mask & ~ours, where)
    mask = _follow_edges(state, mask, prompt)
    if inside is not None:
        mask &= inside
    probability = torch.where(mask, chance[superpixels].clamp(min=0.5), chance[superpixels].clamp(max=0.5))
    mask, probability = nearest_upsample((mask, probability), state.height, state.width)
    return mask.cpu().numpy(), probability.cpu().numpy().astype(np.float32)


def _superpixel_chance(state: ImageState, prompt: Prompt, start: torch.Tensor) -> torch.Tensor:
    """(N,) how likely each superpixel is the label, from its most similar prototypes; a clicked
    superpixel is what its (last) click says. Without a positive click or a box, the ``start`` mask's
    mean is the label's prototype (else a negative click would take the whole region it lands in)."""
    positive, negative = _prototypes(state, prompt)
    pixels = state.superpixels
    if not positive and start.any():
        inside = torch.bincount(pixels.labels.flatten(), start.flatten().float(), len(pixels.size)) / pixels.size
        positive.append(pixels.mean(inside > 0.5))
    nothing = torch.full((len(pixels.size),), -2.0, device=pixels.size.device)
    for_label = _nearest(pixels, positive) if positive else nothing
    against = (_nearest(pixels, negative) if negative else nothing).clamp(min=MIN_SIMILARITY)
    chance = torch.sigmoid(MARGIN_SHARPNESS * (for_label - against))
    for x, y, positive in prompt.clicks:
        chance[pixels.at(state.working_pixel(x, y))] = 1.0 if positive else 0.0
    return chance


def _confirmed(start: torch.Tensor, state: ImageState, prompt: Prompt) -> torch.Tensor:
    """The connected parts of the (H', W') bool ``start`` that the positive clicks confirm: one a positive
    click lands in, or one that looks like them (its superpixels' mean :func:`_likeness` at least
    :data:`CONFIRM_LIKENESS`). A part that looks like something else is a wrong pre-label: the click, not the
    pre-label, says where the label is. Without a positive click the start stands."""
    if not any(positive for *_, positive in prompt.clicks) or not bool(start.any()):
        return start
    _, parts = cv2.connectedComponents(start.cpu().numpy().astype(np.uint8), connectivity=8)
    parts = torch.from_numpy(parts).to(start.device).long().flatten()
    likeness = _likeness(state, prompt)[state.superpixels.labels.flatten()]
    count = int(parts.max()) + 1
    keep = torch.bincount(parts, likeness, count) / torch.bincount(parts, minlength=count) >= CONFIRM_LIKENESS
    for x, y, positive in prompt.clicks:
        if positive:
            keep[parts.view(start.shape)[state.working_pixel(x, y)]] = True
    keep[0] = False  # outside the start
    return keep[parts].view(start.shape)


def _likeness(state: ImageState, prompt: Prompt) -> torch.Tensor:
    """(N,) each superpixel's rank in [0, 1] by its similarity to the nearest positive prototype: a
    share of the image, so no similarity scale of one CLIP is built in."""
    positive, _ = _prototypes(state, prompt)
    similarity = _nearest(state.superpixels, positive)
    return similarity.argsort().argsort().float() / max(1, len(similarity) - 1)


def _text_chance(state: ImageState, label: int) -> torch.Tensor:
    """(N,) the label's calibrated text probability at each superpixel's centroid."""
    probability = (state.logits.float() - state.presence.to(state.logits.device)[:, None, None]).softmax(0)[label]
    pixels = state.superpixels
    return sample_at(probability[None], pixels.centre, pixels.labels.shape)[:, 0]


def _part(region: torch.Tensor, where: tuple[int, int]) -> torch.Tensor:
    """The 8-connected part of the (H', W') bool ``region`` holding the pixel ``where`` (none if it is outside)."""
    if not region[where]:
        return torch.zeros_like(region)
    _, components = cv2.connectedComponents(region.cpu().numpy().astype(np.uint8), connectivity=8)
    return torch.from_numpy(components == components[where]).to(region.device)


def _follow_edges(state: ImageState, mask: torch.Tensor, prompt: Prompt) -> torch.Tensor:
    """The (H', W') bool mask's edges moved from the superpixels' to the image's: the mask guided-filtered by the
    working-resolution image over a superpixel's width, as pre-labels are (:func:`model.regions.guided_filter`);
    clicked pixels keep their sign. A superpixel straddling a small object's edge otherwise flips whole at each
    click, and the object never reaches a tight mask."""
    radius = max(1, round(SUPERPIXEL_CELL_SHARE * mask.shape[0] / state.logits.shape[1]))
    # Only pixels within two radii of the mask's edge can change: the filter runs on their bounding box.
    edge = mask ^ (torch.nn.functional.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0] > 0)
    if not bool(edge.any()):
        return mask
    rows, cols = torch.nonzero(edge, as_tuple=True)
    top, left = max(0, int(rows.min()) - 2 * radius - 1), max(0, int(cols.min()) - 2 * radius - 1)
    bottom, right = int(rows.max()) + 2 * radius + 2, int(cols.max()) + 2 * radius + 2
    guide = torch.from_numpy(state.image[top:bottom, left:right]).to(mask.device).permute(2, 0, 1).float() / 255
    followed = mask.clone()
    followed[top:bottom, left:right] = guided_filter(guide, mask[None, top:bottom, left:right].float(), radius,
                                                     GUIDED_FILTER_EPS)[0] > 0.5
    for x, y, positive in prompt.clicks:
        followed[state.working_pixel(x, y)] = positive
    return followed


def _inside(state: ImageState, boxes) -> torch.Tensor:
    """(H', W') bool: the working-resolution pixels inside any of the boxes."""
    height, width = state.image.shape[:2]
    inside = torch.zeros(height, width, dtype=torch.bool, device=state.logits.device)
    for left, top, right, bottom in boxes:
        inside[int(top * height / state.height):int(np.ceil(bottom * height / state.height)),
               int(left * width / state.width):int(np.ceil(right * width / state.width))] = True
    return inside
