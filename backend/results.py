"""Model output → Label Studio results, one small builder per control tag."""
from __future__ import annotations

import uuid

import cv2
import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from backend.label_config import Target
from model.predictor import SemanticPrediction


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


class ResultBuilder:
    """Turns one :class:`SemanticPrediction` into results for one target."""

    type: str

    def __init__(self, target: Target, min_area: int = 16):
        self.target = target
        self.min_area = min_area  # polygon parts smaller than this many pixels are specks

    def regions(self, prediction: SemanticPrediction):
        """(label, mask, score) for each predicted label whose score passes the threshold."""
        labels = self.target.vocabulary.labels
        for index, score in prediction.region_scores.items():
            if score >= self.target.score_threshold:
                yield labels[index], prediction.label_map == index, score

    def _result(self, label: str, value: dict, score: float, height: int, width: int) -> dict:
        return {
            "id": _region_id(),
            "from_name": self.target.control,
            "to_name": self.target.image,
            "type": self.type,
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {**value, self.type: [label]},
            "score": round(score, 4),
        }

    def build(self, prediction: SemanticPrediction) -> list[dict]:
        raise NotImplementedError


class BrushLabelsBuilder(ResultBuilder):
    """One RLE brush region per predicted label."""

    type = "brushlabels"

    def build(self, prediction: SemanticPrediction) -> list[dict]:
        height, width = prediction.label_map.shape
        return [
            self._result(label, {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255)}, score, height, width)
            for label, mask, score in self.regions(prediction)
        ]


def _bridge_holes(outer: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """Join each hole to the outer ring by a zero-width cut, so one simple ring excludes it."""
    ring = outer
    for hole in holes:
        distances = ((ring[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(distances), distances.shape)
        hole_loop = np.concatenate([hole[j:], hole[:j + 1]])
        ring = np.concatenate([ring[:i + 1], hole_loop, ring[i:]])
    return ring


def mask_to_polygons(mask: np.ndarray, min_area: float = 16, tolerance: float = 1.0) -> list[np.ndarray]:
    """Polygons (N, 2) in pixel (x, y) for each part of ``mask``; holes are bridged into their part."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    simplify = lambda c: cv2.approxPolyDP(c, tolerance, True)[:, 0, :].astype(float)  # noqa: E731
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


class PolygonLabelsBuilder(ResultBuilder):
    """One polygon region per connected part of each predicted label, in percent coordinates."""

    type = "polygonlabels"

    def build(self, prediction: SemanticPrediction) -> list[dict]:
        height, width = prediction.label_map.shape
        results = []
        for label, mask, score in self.regions(prediction):
            for polygon in mask_to_polygons(mask, self.min_area):
                # Contours run through pixel centres; +0.5 puts them on the pixel grid Label Studio draws.
                points = [[round((x + 0.5) / width * 100, 3), round((y + 0.5) / height * 100, 3)] for x, y in polygon]
                results.append(self._result(label, {"points": points, "closed": True}, score, height, width))
        return results


BUILDERS = {"BrushLabels": BrushLabelsBuilder, "PolygonLabels": PolygonLabelsBuilder}


def build_results(target: Target, prediction: SemanticPrediction) -> list[dict]:
    return BUILDERS[target.control_type](target).build(prediction)
