import dataclasses

import numpy as np
import pytest
import torch

from model.acquisition import TaskView
from model.calibration import expected_calibration_error, fit_confidence_scale, fit_temperature, scale_confidence
from model.predictor import Predictor, SemanticPrediction
from model.task_scores import stream_score, task_score, unsure_fraction


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_fitted_temperature_recovers_the_one_that_generated_the_labels(true_temperature):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, 40, generator=generator) * 3
    # Labels drawn from softmax(logits / T): the NLL-optimal temperature is T itself.
    labels = torch.multinomial((logits / true_temperature).softmax(0).permute(1, 2, 0).reshape(-1, 5), 1,
                               generator=generator).reshape(40, 40).numpy()
    labels[:5] = -1  # unannotated rows are ignored
    fitted = fit_temperature([logits], [labels])
    assert abs(fitted - true_temperature) / true_temperature < 0.1, fitted


def test_temperature_changes_confidence_not_the_winner():
    logits = torch.randn(4, 6, 7)
    sharp, soft = Predictor.to_semantic(logits, 12, 14), Predictor.to_semantic(logits, 12, 14, temperature=3.0)
    assert np.array_equal(sharp.label_map, soft.label_map)
    assert (soft.confidence < sharp.confidence + 1e-6).all() and (soft.confidence < sharp.confidence).any()


def test_the_confidence_scale_recovers_the_map_that_generated_the_outcomes():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 0.95, 50_000)
    # Right as often as sigmoid(2 logit(c) + 1) says: an underconfident model, as refined versions were.
    truth = scale_confidence(torch.from_numpy(confidence), (2.0, 1.0)).numpy()
    correct = rng.random(len(confidence)) < truth
    a, b = fit_confidence_scale(confidence, correct)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(1.0, abs=0.1)
    scaled = scale_confidence(torch.from_numpy(confidence), (a, b)).numpy()
    assert expected_calibration_error(scaled, correct) < 1 < 10 < expected_calibration_error(confidence, correct)
    # Pixels all right give a finite map, below certainty, that keeps the order of the confidences.
    a, b = fit_confidence_scale(confidence, np.ones(len(confidence), bool))
    scaled = scale_confidence(torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64), (a, b))
    assert np.isfinite([a, b]).all() and (scaled.diff() > 0).all() and scaled.max() < 1


def test_ece_of_known_bins():
    confidence = np.array([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 1, 1, 0, 1, 0])
    # Bin 0.93-1.0: confidence 0.95, accuracy 0.75 (4 pixels); bin 0.53-0.6: 0.55 vs 0.5 (2 pixels).
    assert expected_calibration_error(confidence, correct) == pytest.approx((4 * 0.2 + 2 * 0.05) / 6 * 100)
    assert expected_calibration_error(np.full(10, 0.7), np.arange(10) < 7) == pytest.approx(0)


def test_task_scores():
    label_map = np.zeros((10, 10), np.int16)
    label_map[0, :4] = 3  # a small doubtful region
    confidence = np.full((10, 10), 0.9, np.float32)
    confidence[0, :4] = 0.3
    prediction = SemanticPrediction(label_map, confidence)
    assert prediction.region_scores == pytest.approx({0: 0.9, 3: 0.3})
    assert task_score(prediction, "product") == pytest.approx(0.27)  # both regions right: 0.9 × 0.3
    assert task_score(prediction) == task_score(prediction, "mean") == pytest.approx(0.6)  # pixel mean: 0.876
    assert task_score(prediction, "sure_pixels", sure_at=0.5) == pytest.approx(0.96)
    assert task_score(prediction, "pixel_accuracy") == pytest.approx(0.876)
    # A label left unlabeled as unlikely still counts in the mean and the product: it is the model's doubt.
    pruned = SemanticPrediction(np.where(label_map == 3, -1, label_map).astype(np.int16), confidence,
                                found={0: 0.9, 3: 0.3})
    assert pruned.region_scores == pytest.approx({0: 0.9})
    assert task_score(pruned) == pytest.approx(0.6) and task_score(pruned, "product") == pytest.approx(0.27)
    # A label the pre-label missed counts 0 in the mean, weighed by how likely it is there, found (and cut) or not.
    missed = dataclasses.replace(pruned, missed={3: 1.0, 5: 0.5})
    assert task_score(missed) == pytest.approx(0.9 / 2.5)
    # A region the region check unlabeled counts as left out in the review score, at its peak probability; the
    # acquisition's stream score keeps its found score.
    checked = dataclasses.replace(pruned, found={0: 0.9, 3: 0.3, 4: 0.6}, missed={5: 0.5}, checked_out={4: 0.8})
    assert task_score(checked) == pytest.approx((0.9 + 0.3) / (2 + 0.5 + 0.8))
    assert stream_score(checked) == pytest.approx((0.9 + 0.3 + 0.6) / (3 + 0.5))
    assert TaskView.of(checked, np.log(np.full(6, 1 / 6))).stream_score == stream_score(checked)
    assert task_score(pruned, "pixel_accuracy") == pytest.approx(0.9 * 0.96)  # unlabeled pixels count 0
    assert unsure_fraction(confidence, 0.5) == pytest.approx(0.04)
    empty = SemanticPrediction(np.full((4, 4), -1, np.int16), np.zeros((4, 4), np.float32))
    assert task_score(empty) == task_score(empty, "product") == task_score(empty, "pixel_accuracy") == 0.0
    # A pre-label that leaves every label out (a tag that names what else its images show) claims none is there:
    # as sure as the likeliest label is absent. Its score is low where a label left out peaks high (likely missed),
    # high where none does (likely an image of none of them), and its own cut labels count as left out.
    # Without other things named, every pixel is some label and that pre-label misses them all: 0.
    nothing = dataclasses.replace(empty, found={3: 0.3}, missed={3: 0.6, 5: 0.1}, background=True)
    assert task_score(nothing) == pytest.approx(0.4) and stream_score(nothing) == pytest.approx(0.4)
    assert task_score(dataclasses.replace(nothing, missed={3: 0.05, 5: 0.1})) == pytest.approx(0.9)
    cut = dataclasses.replace(empty, found={4: 0.7}, checked_out={4: 0.8}, background=True)
    assert task_score(cut) == pytest.approx(0.2) and stream_score(cut) == pytest.approx(0.7)
    assert task_score(dataclasses.replace(nothing, background=False)) == 0.0
    with pytest.raises(ValueError, match="unknown task score"):
        task_score(prediction, "entropy")
