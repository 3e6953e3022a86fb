"""Label Studio's smart tools: the clicks and boxes an annotator draws, answered with one label's mask.

With the backend connected as interactive ("Use for interactive preannotations"), a region drawn
with a ``smart="true"`` ``KeyPointLabels`` or ``RectangleLabels`` tag makes Label Studio call
/predict for that one task with ``params.context = {"result": [...]}``: the annotation's smart
regions of the same tool and label, in percent of the image, a keypoint's ``is_positive`` false
when drawn with Alt. The answer's first entry becomes the annotator's suggestion. The label's mask
comes from :func:`model.refinement.refine`, as each ``BrushLabels`` / ``PolygonLabels`` tag of the
same image with that label shapes it.

Each image's forward pass is kept in a bounded LRU (:class:`ImageStates`), keyed by model version,
vocabulary and image, so a click costs no tower pass; a /predict of one task (an annotator opening
it) fills it too.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

from backend.control_tags import ControlTag
from model.refinement import ImageState, Prompt

SMART_TYPES = {"keypointlabels": "KeyPointLabels", "rectanglelabels": "RectangleLabels"}


class ContextError(ValueError):
    """A /predict context this backend can't use; the message says which region and why."""


@dataclass(frozen=True)
class SmartRegion:
    """One smart region of the context, in percent of the image.

    Attributes:
        image: the Image tag's name (``to_name``).
        label: the label it was drawn with.
        click: (x, y, positive) for a keypoint, else None.
        box: (x, y, width, height) for a rectangle, else None.
    """

    image: str
    label: str
    click: tuple[float, float, bool] | None = None
    box: tuple[float, float, float, float] | None = None


# Bounds before work: an annotator's context holds one label's few regions (Label Studio sends the
# regions of the tool and label just used); past these a request costs seconds of CPU for nothing.
MAX_SMART_REGIONS = 100
MAX_SMART_LABELS = 4


def parse_context(context) -> tuple[SmartRegion, ...] | None:
    """The smart regions of a /predict's ``params.context``: None for a plain /predict (no context), and
    none for a context without regions (Label Studio sends one after Submit: it asks for no suggestion).

    Raises:
        ContextError: not Label Studio's shape, an unknown region type, a click outside the image, a box
            without area, a number that is not finite, or more regions or labels than one request may hold.
    """
    if context is None:
        return None
    if not isinstance(context, dict):
        raise ContextError(f"the context must be an object, not {type(context).__name__}")
    results = context.get("result") or []
    if not isinstance(results, list):
        raise ContextError("the context's 'result' must be a list of regions")
    if len(results) > MAX_SMART_REGIONS:
        raise ContextError(f"the context holds {len(results)} regions; at most {MAX_SMART_REGIONS} are answered")
    regions = tuple(_region(index, item) for index, item in enumerate(results))
    labels = {(r.image, r.label) for r in regions}
    if len(labels) > MAX_SMART_LABELS:
        raise ContextError(f"the context's regions carry {len(labels)} labels; at most {MAX_SMART_LABELS} are "
                           "refined in one request")
    return regions


def _region(index: int, item) -> SmartRegion:
    where = f"context region {index}"
    if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
        raise ContextError(f"{where} is not a region with a 'value' object")
    kind, value = item.get("type"), item["value"]
    if kind not in SMART_TYPES:
        raise ContextError(f"{where} has type {str(kind)[:30]!r}; smart regions are "
                           f"{' or '.join(SMART_TYPES.values())}")
    labels = value.get(kind)
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        raise ContextError(f"{where} must carry one label in 'value.{kind}'")
    if not isinstance(item.get("to_name"), str):
        raise ContextError(f"{where} has no 'to_name' (the Image tag it was drawn on)")
    numbers = ("x", "y") if kind == "keypointlabels" else ("x", "y", "width", "height")
    try:
        x, y, *size = (_percent(value[name]) for name in numbers)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise ContextError(f"{where}: 'value' needs finite numbers {', '.join(numbers)} (percent of the image)"
                           ) from None
    if not (0 <= x <= 100 and 0 <= y <= 100):
        raise ContextError(f"{where} ({labels[0]!r}) at ({x:g}%, {y:g}%) is outside the image")
    if kind == "keypointlabels":
        return SmartRegion(item["to_name"], labels[0], click=(x, y, item.get("is_positive", True) is not False))
    if not (0 < size[0] <= 100 and 0 < size[1] <= 100) or value.get("rotation", 0) not in (0, None):
        raise ContextError(f"{where} ({labels[0]!r}): the box has zero area or is rotated "
                           f"({size[0]:g}% x {size[1]:g}%, rotation {value.get('rotation', 0)})")
    return SmartRegion(item["to_name"], labels[0], box=(x, y, *size))


def _percent(raw) -> float:
    """A coordinate in percent: a JSON number or its text, finite ("nan", "inf" and 1e308 are not)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise TypeError(raw)
    number = float(raw)
    if not math.isfinite(number) or abs(number) > 1e6:
        raise ValueError(raw)
    return number


def label_groups(regions: tuple[SmartRegion, ...],
                 targets: tuple[ControlTag, ...]) -> list[tuple[list[ControlTag], int, list[SmartRegion]]]:
    """For each label of the regions, each group of its image's targets that share a vocabulary holding
    the label: (the group, the label's index in that vocabulary, the label's regions).

    Raises:
        ContextError: a label no segmentation tag of its image has.
    """
    answer = []
    for image, label in dict.fromkeys((r.image, r.label) for r in regions):
        groups: dict[str, list[ControlTag]] = {}
        for target in targets:
            if target.image == image and label in target.vocabulary.served:
                groups.setdefault(target.vocabulary.key, []).append(target)
        if not groups:
            raise ContextError(f"the label {label[:60]!r} is not a label of any segmentation tag "
                               f"(BrushLabels, PolygonLabels) on the image {image[:40]!r}")
        mine = [r for r in regions if (r.image, r.label) == (image, label)]
        answer += [(group, group[0].vocabulary.labels.index(label), mine) for group in groups.values()]
    return answer


def as_prompt(label: int, regions: list[SmartRegion], height: int, width: int) -> Prompt:
    """One label's regions as a :class:`model.refinement.Prompt` in a ``width`` × ``height`` image's pixels."""
    clicks = tuple((x * width / 100, y * height / 100, positive)
                   for x, y, positive in (r.click for r in regions if r.click))
    boxes = tuple((x * width / 100, y * height / 100, (x + w) * width / 100, (y + h) * height / 100)
                  for x, y, w, h in (r.box for r in regions if r.box))
    return Prompt(label, clicks, boxes)


class ImageStates:
    """A least-recently-used store of :class:`model.refinement.ImageState`, within ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._states: OrderedDict[tuple, ImageState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> ImageState | None:
        with self._lock:
            if key in self._states:
                self._states.move_to_end(key)
            return self._states.get(key)

    def put(self, key: tuple, state: ImageState) -> None:
        """Keep ``state`` (again, after a click made it grow) within ``max_bytes``, the oldest evicted first;
        a state larger than the whole bound is not kept at all."""
        with self._lock:
            if state.nbytes > self.max_bytes:  # it would evict everything else, and still not fit
                self._states.pop(key, None)
                return
            self._states[key] = state
            self._states.move_to_end(key)
            # Sizes are read now: a state grows (superpixels, pre-labels) as clicks use it.
            while sum(s.nbytes for s in self._states.values()) > self.max_bytes:
                self._states.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()

    def __len__(self) -> int:
        return len(self._states)
