"""Label Studio results (annotations or predictions) → per-pixel label maps, and their validation."""
from __future__ import annotations

import math

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle

from backend.label_config import Target

IGNORE = -1
REGION_TYPES = ("brushlabels", "polygonlabels")


class AnnotationError(ValueError):
    """An annotation this backend can't learn from; the message says which region and why."""


def _declared_size(result: dict, height: int, width: int) -> tuple[int, int]:
    return int(result.get("original_height") or height), int(result.get("original_width") or width)


def region_mask(result: dict, height: int, width: int) -> np.ndarray | None:
    """The (height, width) bool mask of one brush or polygon result, or None for other result types.

    Polygons are in percent, so they are drawn at (height, width) whatever size the result
    declares; a brush RLE is decoded at its declared size and resized if that differs.
    """
    value = result.get("value", {})
    if result.get("type") == "brushlabels" and value.get("format", "rle") == "rle" and "rle" in value:
        rle_height, rle_width = _declared_size(result, height, width)
        pixels = np.asarray(decode_rle(value["rle"]), np.uint8).reshape(rle_height, rle_width, 4)
        mask = pixels[..., 3] > 127
        if mask.shape != (height, width):
            mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
        return mask
    if result.get("type") == "polygonlabels" and value.get("points"):
        points = np.asarray(value["points"], float) / 100.0 * [width, height] - 0.5
        mask = np.zeros((height, width), np.uint8)
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
        return mask.astype(bool)
    return None


def results_to_label_map(results: list[dict], target: Target, height: int, width: int) -> np.ndarray:
    """Paint a target's regions into an (H, W) int16 map of vocabulary indices; ``IGNORE`` elsewhere.

    Regions are painted in order, so a later region wins where two overlap.
    """
    label_map = np.full((height, width), IGNORE, np.int16)
    index = {label: i for i, label in enumerate(target.vocabulary.labels)}
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

    Brush and polygon regions must be well formed: a label list, a declared image size within
    ``max_pixels``, an RLE that decodes to exactly that size, polygon points that are finite
    (x, y) pairs. Other result types (choices, rectangles, ...) pass: training ignores them.

    Raises:
        AnnotationError: naming the region (its position and id) and the cause.
    """
    if not isinstance(results, list):
        raise AnnotationError(f"'result' must be a list of regions, not {type(results).__name__}")
    for position, result in enumerate(results):
        if not isinstance(result, dict):
            raise AnnotationError(f"region {position} is a {type(result).__name__}, not an object")
        if result.get("type") not in REGION_TYPES:
            continue
        try:
            _validate_region(result, max_pixels)
        except AnnotationError as error:
            raise AnnotationError(f"region {position} (id {str(result.get('id'))[:20]!r}): {error}") from None


def _validate_region(result: dict, max_pixels: int) -> None:
    kind, value = result["type"], result.get("value")
    if not isinstance(value, dict):
        raise AnnotationError("'value' must be an object")
    labels = value.get(kind)
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
        raise AnnotationError(f"'value.{kind}' must be a non-empty list of label names")
    height, width = result.get("original_height"), result.get("original_width")
    for name, size in (("original_height", height), ("original_width", width)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise AnnotationError(f"'{name}' must be a positive integer, not {str(size)[:20]!r}")
    if height * width > max_pixels:
        raise AnnotationError(f"declares a {width}x{height} image, over the limit of {max_pixels} pixels "
                              "(MAX_IMAGE_PIXELS)")
    if kind == "brushlabels":
        _validate_rle(value, height, width)
    else:
        _validate_points(value.get("points"))


def _validate_rle(value: dict, height: int, width: int) -> None:
    if value.get("format", "rle") != "rle":
        raise AnnotationError(f"brush format {str(value.get('format'))[:20]!r} is not 'rle'")
    rle = value.get("rle")
    if not isinstance(rle, list) or not rle or not all(isinstance(b, int) and 0 <= b <= 255 for b in rle):
        raise AnnotationError("'value.rle' must be a non-empty list of bytes (0-255)")
    expected = height * width * 4
    # The header's first 32 bits say how many bytes the RLE decodes to: check before decoding.
    declared = int.from_bytes(bytes(rle[:4]), "big") if len(rle) >= 4 else -1
    if declared != expected:
        raise AnnotationError(f"'value.rle' declares {declared} bytes, not the {expected} of a "
                              f"{width}x{height} RGBA mask")
    try:
        decoded = len(decode_rle(rle))
    except Exception as error:
        raise AnnotationError(f"'value.rle' is not a valid brush RLE ({error.__class__.__name__})") from None
    if decoded != expected:
        raise AnnotationError(f"'value.rle' decodes to {decoded} bytes, not {expected}")


def _validate_points(points) -> None:
    if not isinstance(points, list) or len(points) < 3:
        raise AnnotationError("'value.points' must be a list of at least 3 [x, y] points")
    for point in points:
        if not (isinstance(point, list) and len(point) == 2
                and all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
                        for c in point)):
            raise AnnotationError(f"polygon point {str(point)[:40]} is not a pair of finite numbers")
