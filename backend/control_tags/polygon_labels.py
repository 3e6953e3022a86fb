"""``PolygonLabels``: one polygon region per connected part of each predicted label."""
from __future__ import annotations

import math

import cv2
import numpy as np

from backend.control_tags.base import AnnotationError, ControlTag
from model.predictor import SemanticPrediction

MAX_POINTS = 200  # vertices per ring; a bridged part with holes may have a few rings' worth


class PolygonLabels(ControlTag):
    tag = "PolygonLabels"
    result_type = "polygonlabels"

    def build(self, prediction: SemanticPrediction) -> list[dict]:
        """Points in percent of the image size, as Label Studio stores them."""
        height, width = prediction.label_map.shape
        results = []
        for index, label, score in self.regions(prediction):
            for part, polygon in enumerate(mask_to_polygons(prediction.label_map == index, self.min_area)):
                # Contours run through pixel centres; +0.5 puts them on the pixel grid Label Studio draws.
                points = [[round((x + 0.5) / width * 100, 3), round((y + 0.5) / height * 100, 3)] for x, y in polygon]
                results.append(self.result(label, {"points": points, "closed": True}, score, height, width, part))
        return results

    @classmethod
    def check(cls, value: dict, height: int, width: int) -> None:
        points = value.get("points")
        if not isinstance(points, list) or len(points) < 3:
            raise AnnotationError("'value.points' must be a list of at least 3 [x, y] points")
        for point in points:
            if not (isinstance(point, list) and len(point) == 2
                    and all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
                            for c in point)):
                raise AnnotationError(f"polygon point {str(point)[:40]} is not a pair of finite numbers")

    @classmethod
    def mask(cls, result: dict, height: int, width: int) -> np.ndarray | None:
        """Points are in percent, so the polygon is drawn at (height, width) whatever size it declares."""
        points = result.get("value", {}).get("points")
        if not points:
            return None
        corners = np.asarray(points, float) / 100.0 * [width, height] - 0.5
        mask = np.zeros((height, width), np.uint8)
        cv2.fillPoly(mask, [np.round(corners).astype(np.int32)], 1)
        return mask.astype(bool)


def _bridge_holes(outer: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """Join each hole to the outer ring by a zero-width cut, so one simple ring excludes it."""
    ring = outer
    for hole in holes:
        distances = ((ring[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(distances), distances.shape)
        hole_loop = np.concatenate([hole[j:], hole[:j + 1]])
        ring = np.concatenate([ring[:i + 1], hole_loop, ring[i:]])
    return ring


def mask_to_polygons(mask: np.ndarray, min_area: float = 16, tolerance: float = 1.0,
                     max_points: int = MAX_POINTS) -> list[np.ndarray]:
    """Polygons (N, 2) in pixel (x, y) for each part of ``mask``; holes are bridged into their part.

    Each ring is simplified within ``tolerance`` pixels, and further (the tolerance doubling)
    until it has at most ``max_points`` vertices: a noisy mask must not hand the annotator a
    polygon of thousands of points to edit.
    """
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]

    def simplify(contour):
        epsilon = tolerance
        ring = cv2.approxPolyDP(contour, epsilon, True)
        while len(ring) > max_points:
            epsilon *= 2
            ring = cv2.approxPolyDP(contour, epsilon, True)
        return ring[:, 0, :].astype(float)

    polygons = []
    for index, contour in enumerate(contours):
        if hierarchy[index][3] != -1 or cv2.contourArea(contour) < min_area:
            continue  # a hole, or a speck
        holes, child = [], hierarchy[index][2]
        while child != -1:
            if cv2.contourArea(contours[child]) >= min_area:
                holes.append(simplify(contours[child]))
            child = hierarchy[child][0]
        outer = simplify(contour)
        if len(outer) >= 3:
            polygons.append(_bridge_holes(outer, holes))
    return polygons
