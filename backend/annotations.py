"""Label Studio results (annotations or predictions) → per-pixel label maps."""
from __future__ import annotations

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle

from backend.label_config import Target

IGNORE = -1


def region_mask(result: dict, height: int, width: int) -> np.ndarray | None:
    """The (H, W) bool mask of one brush or polygon result, or None for other result types."""
    value = result.get("value", {})
    if result.get("type") == "brushlabels" and value.get("format", "rle") == "rle" and "rle" in value:
        pixels = np.asarray(decode_rle(value["rle"]), np.uint8).reshape(height, width, 4)
        return pixels[..., 3] > 127
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
