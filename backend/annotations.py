"""Label Studio results (annotations or predictions) → per-pixel label maps, and their validation.

Each result is read by the control tag whose ``type`` it has (:mod:`backend.control_tags`).
"""
from __future__ import annotations

import numpy as np

from backend.control_tags import AnnotationError, ControlTag, for_result_type
from model.vocabulary import UNLABELED


def region_mask(result: dict, height: int, width: int) -> np.ndarray | None:
    """The (height, width) bool mask of one segmentation result, or None for other result types."""
    tag = for_result_type(result.get("type"))
    return tag.mask(result, height, width) if tag is not None else None


def results_to_label_map(results: list[dict], target: ControlTag, height: int, width: int,
                         label_map: np.ndarray | None = None) -> np.ndarray:
    """Paint a target's regions into an (H, W) int16 map of vocabulary indices; ``UNLABELED`` elsewhere.

    Regions are painted in order, so a later region wins where two overlap. ``label_map``:
    paint into this map instead of a new one (several targets of one image).
    """
    if label_map is None:
        label_map = np.full((height, width), UNLABELED, np.int16)
    index = {label: i for i, label in enumerate(target.vocabulary.served)}
    for result in results:
        if result.get("from_name") != target.control:
            continue
        labels = result.get("value", {}).get(result.get("type"), [])
        if not labels or labels[0] not in index:
            continue
        mask = region_mask(result, height, width)
        if mask is not None:
            label_map[mask] = index[labels[0]]
    return label_map


def validate_results(results, max_pixels: int) -> None:
    """Check an annotation's ``result`` list before it is stored or learnt from.

    Segmentation regions must be well formed: a label list, a declared image size within
    ``max_pixels``, and a value its control tag can turn into a mask (e.g. an RLE that decodes
    to exactly that size, finite polygon points). Other result types (choices, rectangles, ...)
    pass: training ignores them.

    Raises:
        AnnotationError: naming the region (its position and id) and the cause.
    """
    if not isinstance(results, list):
        raise AnnotationError(f"'result' must be a list of regions, not {type(results).__name__}")
    for position, result in enumerate(results):
        if not isinstance(result, dict):
            raise AnnotationError(f"region {position} is a {type(result).__name__}, not an object")
        tag = for_result_type(result.get("type"))
        if tag is None:
            continue
        try:
            _validate_region(tag, result, max_pixels)
        except AnnotationError as error:
            raise AnnotationError(f"region {position} (id {str(result.get('id'))[:20]!r}): {error}") from None


def _validate_region(tag: type[ControlTag], result: dict, max_pixels: int) -> None:
    value = result.get("value")
    if not isinstance(value, dict):
        raise AnnotationError("'value' must be an object")
    labels = value.get(tag.result_type)
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
        raise AnnotationError(f"'value.{tag.result_type}' must be a non-empty list of label names")
    height, width = result.get("original_height"), result.get("original_width")
    for name, size in (("original_height", height), ("original_width", width)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise AnnotationError(f"'{name}' must be a positive integer, not {str(size)[:20]!r}")
    if height * width > max_pixels:
        raise AnnotationError(f"declares a {width}x{height} image, over the limit of {max_pixels} pixels "
                              "(MAX_IMAGE_PIXELS)")
    tag.check(value, height, width)
