import cv2
import numpy as np

from backend.annotations import results_to_label_map
from backend.control_tags.polygon_labels import mask_to_polygons
from backend.label_config import parse_targets
from model.predictor import SemanticPrediction
from model.vocabulary import UNLABELED

CONFIG = """<View><Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image" model_score_threshold="0.5">
    <Label value="ring"/><Label value="blob"/><Label value="faint"/><Label value="absent"/></BrushLabels>
  <PolygonLabels name="poly" toName="image">
    <Label value="ring"/><Label value="blob"/><Label value="faint"/><Label value="absent"/></PolygonLabels></View>"""


def _prediction():
    h, w = 60, 90
    y, x = np.mgrid[0:h, 0:w]
    label_map = np.full((h, w), UNLABELED, np.int16)
    radius = np.hypot(y - 30, x - 25)
    label_map[(radius < 20) & (radius >= 8)] = 0  # a ring: one part with a hole
    label_map[5:20, 60:80] = 1  # two separate parts of "blob"
    label_map[40:55, 55:85] = 1
    label_map[0:4, 0:10] = 2  # "faint": confident enough only for the polygon target
    confidence = np.full((h, w), 0.9, np.float32)
    confidence[label_map == 2] = 0.3
    return SemanticPrediction(label_map, confidence)


def test_brush_results_decode_to_the_predicted_masks_and_respect_the_threshold():
    brush = parse_targets(CONFIG)[0]
    prediction = _prediction()
    results = brush.build(prediction)
    assert sorted(r["value"]["brushlabels"][0] for r in results) == ["blob", "ring"]  # faint < 0.5 left out
    for r in results:
        assert (r["from_name"], r["to_name"], r["type"]) == ("mask", "image", "brushlabels")
        assert (r["original_width"], r["original_height"]) == (90, 60)
        assert abs(r["score"] - 0.9) < 1e-4
    decoded = results_to_label_map(results, brush, 60, 90)
    expected = np.where(np.isin(prediction.label_map, [0, 1]), prediction.label_map, -1)
    assert np.array_equal(decoded, expected)


def test_polygons_cover_parts_and_holes():
    polygon_target = parse_targets(CONFIG)[1]
    prediction = _prediction()
    results = polygon_target.build(prediction)
    labels = [r["value"]["polygonlabels"][0] for r in results]
    assert labels.count("blob") == 2 and labels.count("ring") == 1 and labels.count("faint") == 1
    for r in results:
        assert all(0 <= p <= 100 for point in r["value"]["points"] for p in point)
    decoded = results_to_label_map(results, polygon_target, 60, 90)
    for index in (0, 1):
        truth, got = prediction.label_map == index, decoded == index
        iou = (truth & got).sum() / (truth | got).sum()
        assert iou > 0.85, (index, iou)
    assert decoded[30, 25] == -1  # the ring's hole stays empty


def test_polygon_of_empty_mask_is_empty():
    assert mask_to_polygons(np.zeros((10, 10), bool)) == []


def test_a_noisy_mask_gives_polygons_within_the_vertex_budget():
    y, x = np.mgrid[0:400, 0:400]
    jagged = (np.hypot(y - 200, x - 200) + 6 * np.sin(np.arctan2(y - 200, x - 200) * 150)) < 150  # a saw-toothed disc
    unbounded = mask_to_polygons(jagged, max_points=100_000)
    bounded = mask_to_polygons(jagged, max_points=120)
    assert len(unbounded[0]) > 400 and len(bounded) == 1 and 3 <= len(bounded[0]) <= 120
    kept = np.zeros((400, 400), np.uint8)
    cv2.fillPoly(kept, [np.round(bounded[0]).astype(np.int32)], 1)
    assert (kept.astype(bool) & jagged).sum() / (kept.astype(bool) | jagged).sum() > 0.9  # still the same shape
