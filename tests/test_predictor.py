import numpy as np
import torch
import torch.nn.functional as F

from demo import world
from demo.train_clip import DENSE_METHOD
from model.build import ModelConfig, SegmentationModel
from model.metrics import ConfusionMatrix
from model.predictor import Predictor
from model.vocabulary import Vocabulary


def test_chunked_upsampling_matches_a_full_resize():
    logits = torch.randn(5, 9, 13)
    semantic = Predictor.to_semantic(logits, 70, 101, rows_per_chunk=16)
    probability, label = F.interpolate(logits[None], size=(70, 101), mode="bilinear")[0].softmax(0).max(0)
    assert np.array_equal(semantic.label_map, label.numpy())
    assert np.allclose(semantic.confidence, probability.numpy(), atol=1e-5)


def _predictor(clip, **options):
    return SegmentationModel(clip, ModelConfig(dense_method=DENSE_METHOD, inference_size=128, **options)).predictor()


def test_batching_does_not_change_predictions(demo_clip, scenes):
    predictor = _predictor(demo_clip, batch_size=4)
    vocabulary = Vocabulary.from_labels(world.NAMES)
    images = [image for image, _ in scenes[:5]]
    together = predictor.predict(images, vocabulary)
    alone = [predictor.predict([image], vocabulary)[0] for image in images]
    for a, b in zip(together, alone, strict=True):
        assert (a.label_map == b.label_map).mean() > 0.999
        assert np.allclose(a.confidence, b.confidence, atol=1e-4)


def test_any_image_size_gets_a_full_size_prediction(demo_clip):
    predictor = _predictor(demo_clip)
    vocabulary = Vocabulary.from_labels(["sky", "grass"])
    for shape in [(37, 91, 3), (128, 128, 3), (60, 400, 3)]:  # the last one is covered by sliding windows
        prediction = predictor.predict([np.zeros(shape, np.uint8)], vocabulary)[0]
        assert prediction.label_map.shape == shape[:2] and prediction.confidence.shape == shape[:2]


def test_zero_shot_segments_the_demo_world(demo_clip, scenes):
    predictor = _predictor(demo_clip)
    confusion = ConfusionMatrix(len(world.NAMES))
    for (_image, truth), prediction in zip(scenes, predictor.predict([s[0] for s in scenes],
                                                                    Vocabulary.from_labels(world.NAMES)), strict=True):
        confusion.update(truth, prediction.label_map)
    assert confusion.miou() > 15.0  # chance is ~3% for 30 classes


def test_confusion_matrix_miou():
    confusion = ConfusionMatrix(3).update(np.array([0, 0, 1, 1, 2, 255]), np.array([0, 1, 1, 1, -1, 0]))
    iou = confusion.iou()
    assert np.allclose(iou, [0.5, 2 / 3, 0.0])
    assert abs(confusion.miou([0, 1]) - (0.5 + 2 / 3) / 2 * 100) < 1e-9
