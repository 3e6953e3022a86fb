from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from demo import world
from demo.train_clip import DENSE_METHOD
from model.build import SegmentationModel
from model.config import ModelConfig
from model.evaluation import ConfusionMatrix
from model.predictor import Predictor
from model.vocabulary import Vocabulary


def _full_softmax(logits: torch.Tensor, height: int, width: int, temperature: float = 1.0):
    """Today's reference: every label upsampled at full size, then the softmax."""
    up = F.interpolate(logits[None], size=(height, width), mode="bilinear")[0] / temperature
    probability, label = up.softmax(0).max(0)
    return label.numpy(), probability.numpy()


def test_post_processing_is_exact_with_few_labels():
    logits = torch.randn(3, 9, 13) * 2
    semantic = Predictor.to_semantic(logits, 70, 101, temperature=1.5)
    label, probability = _full_softmax(logits, 70, 101, 1.5)
    assert np.array_equal(semantic.label_map, label)
    assert np.allclose(semantic.confidence, probability, atol=1e-5)


def test_top_k_post_processing_agrees_with_the_full_softmax_for_847_labels(demo_clip):
    """On demo scenes rendered at 4x the inference size with an ADE20K-full-sized vocabulary."""
    from model.wordnet import wordnet

    nouns = [s.lemma_names()[0].replace("_", " ") for s in list(wordnet().all_synsets("n"))[::90]]
    vocabulary = Vocabulary.from_labels(list(dict.fromkeys(world.NAMES + nouns))[:847])
    predictor = _predictor(demo_clip)
    ours, full, agree, pixels = ConfusionMatrix(len(world.NAMES)), ConfusionMatrix(len(world.NAMES)), 0, 0
    for image, truth in world.test_scenes(6, seed=777):
        image = np.asarray(Image.fromarray(image).resize((512, 512), Image.BICUBIC))
        truth = np.asarray(Image.fromarray(truth).resize((512, 512), Image.NEAREST))
        logits = predictor.logits([image], vocabulary)[0]
        semantic = Predictor.to_semantic(logits, 512, 512)
        label, probability = _full_softmax(logits, 512, 512)
        same = semantic.label_map == label
        agree, pixels = agree + same.sum(), pixels + same.size
        # The other labels' mass is interpolated as an upper bound: confidences err low, slightly.
        assert 0 <= (probability - semantic.confidence)[same].mean() < 0.02
        ours.update(truth, semantic.label_map)
        full.update(truth, label)
    assert agree / pixels >= 0.995 and abs(ours.miou() - full.miou()) <= 0.1, (agree / pixels, ours.miou(), full.miou())


def _predictor(clip, **options):
    options = {"refine_boundaries": False, **options}
    return SegmentationModel(clip, ModelConfig(dense_method=DENSE_METHOD, inference_size=128, **options)).predictor()


def test_batching_does_not_change_predictions(demo_clip, scenes):
    # At a set temperature: the label-free one pools the images seen, so it moves with their order.
    predictor = _predictor(demo_clip, batch_size=4, temperature=1.6)
    vocabulary = Vocabulary.from_labels(world.NAMES)
    images = [image for image, _ in scenes[:5]]
    together = predictor.passes(images, vocabulary)
    alone = [predictor.passes([image], vocabulary)[0] for image in images]
    for (a, prior_a), (b, prior_b) in zip(together, alone, strict=True):
        assert torch.allclose(a, b, atol=1e-4) and torch.allclose(prior_a, prior_b, atol=1e-4)
    for a, b in zip(predictor.predict(images, vocabulary), [predictor.predict([i], vocabulary)[0] for i in images],
                    strict=True):
        assert (a.label_map == b.label_map).mean() > 0.999


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


def test_precision_setting(demo_clip, scenes, monkeypatch):
    from model import predictor
    from model.predictor import uses_bf16

    cpu = torch.device("cpu")
    # auto: bfloat16 only where the CPU has the instructions and they run at least 1.2x float32's speed
    for hardware, speedup, expected in ((False, 3.0, False), (True, 3.0, True), (True, 1.19, False), (True, 0.56, False)):
        monkeypatch.setattr(predictor, "cpu_has_bf16", lambda hardware=hardware: hardware)
        monkeypatch.setattr(predictor, "cpu_bf16_speedup", lambda speedup=speedup: speedup)
        assert uses_bf16("auto", cpu) is expected
        assert uses_bf16("bf16", cpu) and not uses_bf16("fp32", cpu)
    assert not uses_bf16("fp32", torch.device("cuda"))
    with pytest.raises(ValueError, match="PRECISION"):
        uses_bf16("half", torch.device("cpu"))
    vocabulary = Vocabulary.from_labels(world.NAMES)
    images = [image for image, _ in scenes[:4]]
    fp32 = _predictor(demo_clip).predict(images, vocabulary)
    bf16 = _predictor(demo_clip, precision="bf16").predict(images, vocabulary)
    for a, b in zip(fp32, bf16, strict=True):  # bfloat16 autocast on the CPU stands in for a GPU's
        assert (a.label_map == b.label_map).mean() > 0.97


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's CPU flags")
def test_the_cpu_check_reads_what_the_cpu_has():
    from model.predictor import cpu_has_bf16

    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert cpu_has_bf16() == bool(flags & {"amx_tile", "avx512_bf16"})


def test_the_bf16_speed_probe_runs_only_where_the_cpu_has_bf16_and_leaves_the_seeds_alone(monkeypatch):
    from model import predictor

    def no_probe():
        raise AssertionError("probed a CPU without bfloat16 instructions")

    monkeypatch.setattr(predictor, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(predictor, "cpu_bf16_speedup", no_probe)
    assert not predictor.uses_bf16("auto", torch.device("cpu"))
    monkeypatch.undo()
    predictor.cpu_bf16_speedup.cache_clear()
    state = torch.random.get_rng_state()
    assert predictor.cpu_bf16_speedup() > 0
    assert torch.equal(torch.random.get_rng_state(), state)  # models seeded before it draw the same weights


def test_bf16_batches_run_the_tower_as_matrix_products(demo_clip):
    """Under CPU bf16 autocast, nn.MultiheadAttention's own path hands a linear layer a transposed view, and the
    layer then broadcasts its weight to every token (a batched matmul): ViT-B/16 at 448 px took 13 s per image in
    a batch of two against 0.4 s alone. The tower computes attention on contiguous batch-first tensors instead."""
    from torch.profiler import ProfilerActivity, profile

    predictor = _predictor(demo_clip)
    text = predictor.text_encoder.embed(Vocabulary.from_labels(world.NAMES))
    width = demo_clip.model.visual.transformer.width
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as trace, \
            torch.autocast("cpu", dtype=torch.bfloat16):
        predictor.segmenter(torch.randn(2, 3, 128, 128), text, None, False)
    broadcast = [event.input_shapes for event in trace.key_averages(group_by_input_shape=True)
                 if event.key == "aten::bmm" and event.input_shapes[1][-2:] in ([width, 3 * width], [width, 2 * width])]
    assert not broadcast  # an attention projection's weight, copied once per token
