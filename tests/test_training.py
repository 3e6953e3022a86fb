import base64
import dataclasses
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from label_studio_sdk.converter.brush import mask2rle

from backend.images import ImageFetcher
from backend.settings import Settings
from backend.training import build_samples, fit_serving_rules, restrict_to_annotated
from model.build import SegmentationModel
from model.calibration import scale_confidence
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.losses import (
    classification_loss,
    distillation_loss,
    diversified_logits,
    pool_regions,
    text_guided_distillation_loss,
)
from model.segmenter import build_segmenter
from model.synonyms import candidate_names, filter_synonyms
from model.train import Sample, TrainConfig, copy_paste, cutouts, finetune, masked_crop
from model.vocabulary import BACKGROUND, TextEncoder, Vocabulary
from tests.conftest import png_bytes


def test_distillation_losses_known_values():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert distillation_loss(student, teacher).item() == pytest.approx(1.0)  # (2 + 0) / 2
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # V = s·tᵀ = [[0, 0], [1, 1]]; T = 2·w·wᵀ = all 2 → errors 4, 4, 1, 1 → mean 2.5
    value = text_guided_distillation_loss(student, teacher, text, torch.tensor(2.0))
    assert value.item() == pytest.approx(2.5)


def test_pool_regions_averages_inside_the_mask():
    embeddings = torch.zeros(2, 2, 2)
    embeddings[0, :, 0] = 1.0  # left column points along x
    embeddings[1, :, 1] = 1.0  # right column along y
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :, :2] = True
    assert torch.allclose(pool_regions(embeddings, masks), torch.tensor([[1.0, 0.0]]))


def test_diversified_logits_replace_the_class_column_inside_the_region_only():
    embeddings = F.normalize(torch.randn(1, 3, 2, 2), dim=1)
    text = F.normalize(torch.randn(2, 3), dim=1)
    synonym = F.normalize(torch.randn(1, 3), dim=1)
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    mask[0, 0] = True
    scale = torch.tensor(10.0)
    plain = diversified_logits(embeddings, text, scale, [mask], [torch.tensor([1])], None, (2, 2))
    diversified = diversified_logits(embeddings, text, scale, [mask], [torch.tensor([1])], [synonym], (2, 2))
    expected = 10 * torch.einsum("dhw,d->hw", embeddings[0], synonym[0])
    assert torch.allclose(diversified[0, 1, 0], expected[0])
    assert torch.allclose(diversified[0, 1, 1], plain[0, 1, 1])
    assert torch.allclose(diversified[0, 0], plain[0, 0])


def test_classification_loss_ignores_unannotated_pixels():
    logits = torch.tensor([[[[0.0, 5.0]], [[math.log(3), -5.0]]]])  # (1, 2, 1, 2)
    labels = torch.tensor([[[1, -1]]])
    assert classification_loss(logits, labels).item() == pytest.approx(math.log(4) - math.log(3))


def test_a_background_pixel_is_one_of_the_other_things_whichever():
    """Classes a, b, then the other things o1, o2: an unpainted pixel of an image whose tag names them costs
    -log(p_o1 + p_o2), and the mean runs over it and the painted pixels; without other things it is not read."""
    p = torch.tensor([[1 / 4, 1 / 8], [1 / 4, 1 / 8], [1 / 4, 1 / 2], [1 / 4, 1 / 4]])  # (classes, pixels)
    logits = p.log()[None, :, None]  # (1, 4, 1, 2)
    labels = torch.tensor([[[0, BACKGROUND]]])
    # Pixel 0 (class a): p_a = 1/4; pixel 1 (background): p_o1 + p_o2 = 3/4.
    expected = (math.log(4) + math.log(4 / 3)) / 2
    assert classification_loss(logits, labels, others=2).item() == pytest.approx(expected, rel=1e-5)
    assert classification_loss(logits, labels).item() == pytest.approx(math.log(4), rel=1e-5)
    only_background = torch.tensor([[[BACKGROUND, BACKGROUND]]])
    assert classification_loss(logits, only_background).item() == 0


def test_synonym_filter_keeps_fitting_names_and_always_the_class_name():
    region = torch.tensor([1.0, 0.0])
    candidates = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    # softmax(2 · [0, 1, 0.6, -1]) = [0.08, 0.62, 0.28, 0.01]
    assert filter_synonyms(region, candidates, logit_scale=2.0, threshold=0.1) == [0, 1, 2]
    assert filter_synonyms(region, candidates, logit_scale=2.0, threshold=0.5) == [0, 1]
    assert filter_synonyms(region, candidates, logit_scale=2.0, threshold=0.9) == [0]


def test_candidates_come_from_wordnet_and_prompts():
    names = candidate_names(Vocabulary.from_labels(["car", "zzqx"], {"car": ["sedan"]}))
    assert names[0][:2] == ["car", "sedan"] and "automobile" in names[0]
    assert names[1] == ["zzqx"]


def test_masked_crop_greys_out_the_background():
    image = np.zeros((10, 10, 3), np.uint8) + 200
    mask = np.zeros((10, 10), bool)
    mask[2:4, 2:8] = True
    mask[3, 2] = False
    crop = masked_crop(image, mask, 12)
    assert crop.shape == (12, 12, 3) and (crop == 128).any() and (crop > 180).any()


def test_copy_paste_draws_every_label_alike_and_pastes_its_pixels_alone():
    common = [np.zeros((40, 40), np.int64) for _ in range(3)]  # label 0 everywhere, in three images
    rare = np.zeros((40, 40), np.int64)
    rare[10:20, 5:25] = 2  # label 2 in one image, a 10x20 box; label 1 nowhere
    rare[12, 5] = -1  # an unannotated pixel inside its box
    samples = [Sample(np.full((40, 40, 3), 10 * (i + 1), np.uint8), labels) for i, labels in enumerate(common + [rare])]
    samples[3].image[rare == 2] = 255
    found, chances = cutouts(samples, 3)
    assert sorted((c.sample, c.cls) for c in found) == [(0, 0), (1, 0), (2, 0), (3, 0), (3, 2)]
    by_label = {cls: sum(p for c, p in zip(found, chances, strict=True) if c.cls == cls) for cls in (0, 2)}
    assert by_label[0] == pytest.approx(0.5) and by_label[2] == pytest.approx(0.5)
    assert next(c for c in found if c.cls == 2).box == (10, 20, 5, 25)

    rng = np.random.default_rng(0)
    crop, ids = np.zeros((32, 32, 3), np.uint8), np.full((32, 32), 1000)
    for _ in range(20):
        image, pasted = copy_paste(rng, crop, ids, samples[3], next(c for c in found if c.cls == 2))
        assert set(np.unique(pasted)) == {2, 1000} and (crop == 0).all()  # the crop given is left as it was
        # The label's pixels (resampled), and nothing of its box around them.
        assert (image[pasted == 2] > 128).all() and (image[pasted != 2] == 0).all()
        rows, columns = np.nonzero(pasted == 2)
        assert max(np.ptp(rows), np.ptp(columns)) + 1 <= 0.6 * 32 + 1  # at most 0.6 of the crop's side


@pytest.fixture()
def tiny_samples():
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(3):
        labels = np.full((64, 64), -1, np.int64)
        labels[:32] = 0
        labels[40:, 10:50] = 1
        image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        samples.append(Sample(image, labels))
    return samples


def test_finetuning_is_deterministic_and_checkpoints_round_trip(demo_clip, tiny_samples, tmp_path):
    vocabulary = Vocabulary.from_labels(["sky", "grass"])
    config = TrainConfig(steps=3, batch_size=2, size=64, seed=5)
    states = []
    for _ in range(2):
        segmenter = build_segmenter(demo_clip, seed=5)
        summary = finetune(segmenter, demo_clip, TextEncoder(demo_clip), tiny_samples, vocabulary, config)
        states.append(segmenter.trainable_state_dict())
    assert summary["step"] == 3 and summary["regions"] == 9  # per image: 2 annotated + 1 unannotated part
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], build_segmenter(demo_clip, seed=5).trainable_state_dict()[k])
               for k in states[0])  # training changed something

    path = save_checkpoint(tmp_path / "ckpt.pt", segmenter, demo_clip.identity, vocabulary=list(vocabulary.labels))
    fresh = build_segmenter(demo_clip, seed=99)
    meta = load_checkpoint(path, fresh, demo_clip.identity)
    assert meta["vocabulary"] == ["sky", "grass"]
    assert all(torch.equal(fresh.trainable_state_dict()[k], states[1][k]) for k in states[1])
    x = torch.randn(1, 3, 64, 64)
    text = F.normalize(torch.randn(2, 128), dim=1)
    assert torch.allclose(fresh(x, text)[0], segmenter(x, text)[0])
    with pytest.raises(CheckpointError, match="trained under demo-clip.*, not other-clip"):
        load_checkpoint(path, fresh, "other-clip")


def test_training_runs_the_pass_in_the_precision_the_job_is_given(demo_clip, tiny_samples, monkeypatch):
    from backend.settings import Settings
    from backend.training import train_config

    assert train_config(Settings(precision="fp32")).precision == "fp32"
    # A benchmark's overrides replace what it sets and keep the job's other settings.
    config = train_config(Settings(precision="fp32", train_paste=0.0), steps=7, size=96)
    assert (config.steps, config.size, config.paste, config.precision) == (7, 96, 0.0, "fp32")
    vocabulary, seen = Vocabulary.from_labels(["sky", "grass"]), {}
    for precision in ("fp32", "bf16"):
        segmenter = build_segmenter(demo_clip, seed=5)

        def embed(images, original=segmenter.embed, precision=precision):
            tuned, frozen = original(images)
            seen[precision] = tuned.dtype
            return tuned, frozen
        monkeypatch.setattr(segmenter, "embed", embed)
        summary = finetune(segmenter, demo_clip, TextEncoder(demo_clip), tiny_samples, vocabulary,
                           TrainConfig(steps=2, batch_size=2, size=64, precision=precision))
        assert np.isfinite(summary["loss"])
    assert seen == {"fp32": torch.float32, "bf16": torch.bfloat16}


def test_a_checkpoint_trained_under_another_dense_method_is_refused(demo_clip, tmp_path):
    """A decoder trained on MaskCLIP's features must not load under ClearCLIP: the model's identity names both."""
    maskclip = SegmentationModel(demo_clip, ModelConfig(dense_method="maskclip"))
    clearclip = SegmentationModel(demo_clip, ModelConfig(dense_method="clearclip"))
    assert maskclip.identity != clearclip.identity and maskclip.identity.startswith(demo_clip.identity)
    path = save_checkpoint(tmp_path / "v1.pt", maskclip.segmenter(), maskclip.identity)
    assert maskclip.load_predictor(path) is not None
    with pytest.raises(CheckpointError, match=r"v1\.pt was trained under .*\+maskclip, not .*\+clearclip"):
        clearclip.load_predictor(path)


def test_a_killed_writer_leaves_the_previous_checkpoint(demo_clip, tmp_path):
    segmenter = build_segmenter(demo_clip)
    path = save_checkpoint(tmp_path / "ckpt.pt", segmenter, demo_clip.identity, note="first")
    code = (
        "import os, torch\n"
        "from model.checkpoint import save_checkpoint\n"
        "real_save = torch.save\n"
        "def dying_save(obj, f):\n"
        "    f.write(b'partial')\n"
        "    os._exit(9)\n"
        "torch.save = dying_save\n"
        "class S:\n"
        "    def trainable_state_dict(self): return {}\n"
        f"save_checkpoint({str(path)!r}, S(), 'x')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd())
    assert result.returncode == 9
    assert load_checkpoint(path, build_segmenter(demo_clip), demo_clip.identity)["note"] == "first"


def test_untrained_segmenter_reproduces_zero_shot(demo_clip):
    segmenter = build_segmenter(demo_clip, seed=3)
    tuned, zero_shot = segmenter.embed(torch.randn(2, 3, 64, 96))
    assert torch.equal(tuned, zero_shot)


def test_convnet_towers_work_too():
    from model.clip import load_clip

    torch.manual_seed(1)
    clip = load_clip("RN50", "random")
    drawn_after = torch.rand(1)
    again = load_clip("RN50", "random")  # random weights are the same in every run, so benchmark runs compare
    assert all(torch.equal(a, b) for a, b in zip(clip.model.state_dict().values(), again.model.state_dict().values(), strict=True))
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), drawn_after)  # and loading them leaves the caller's random stream alone
    segmenter = build_segmenter(clip)
    logits, image_logits = segmenter(torch.randn(1, 3, 64, 96), F.normalize(torch.randn(4, 1024), dim=1))
    assert logits.shape == (1, 4, 2, 3) and image_logits.shape == (1, 4)
    tuned, zero_shot = segmenter.embed(torch.randn(1, 3, 64, 64))
    assert torch.equal(tuned, zero_shot)


def test_fine_tuned_segmenter_ensembles_with_the_frozen_clip(demo_clip, tmp_path):
    segmenter = build_segmenter(demo_clip, seed=1, seen_weight=0.0, unseen_weight=1.0)
    torch.nn.init.normal_(segmenter.decoder.out.weight, std=0.5)  # a decoder that moves the embeddings
    x, text = torch.randn(1, 3, 64, 64), F.normalize(torch.randn(3, demo_clip.model.visual.output_dim), dim=1)
    assert segmenter.ensemble_weights(("a", "b", "c")) is None  # not fine-tuned: no ensemble
    tuned_logits, _ = segmenter(x, text)
    segmenter.trained_labels = ("a", "c")
    weights = segmenter.ensemble_weights(("a", "b", "c"))
    assert weights.label.tolist() == weights.group.tolist() == [0.0, 1.0, 0.0]
    assert weights.seen.tolist() == [True, False, True]
    ensembled, _ = segmenter(x, text, weights)
    _, frozen = segmenter.embed(x)
    frozen_logits = segmenter.frozen_logit_scale * torch.einsum("bdhw,cd->bchw", frozen, text)
    tuned_log, frozen_log = tuned_logits.log_softmax(1), frozen_logits.log_softmax(1)
    # Weight 0 for seen classes: the fine-tuned classifier's; weight 1 for unseen: the frozen CLIP's.
    expected = torch.stack([tuned_log[:, 0], frozen_log[:, 1], tuned_log[:, 2]], 1).log_softmax(1)
    assert torch.allclose(ensembled, expected, atol=1e-5)
    assert not torch.allclose(tuned_log, frozen_log, atol=1e-3)
    path = save_checkpoint(tmp_path / "v1.pt", segmenter, demo_clip.identity)
    restored = build_segmenter(demo_clip)
    load_checkpoint(path, restored, demo_clip.identity)
    assert restored.trained_labels == ("a", "c")  # a served version knows which labels it saw

    # A seen label's weight among the seen ones is α scaled by the trust fitted in it (1 where none was) ...
    segmenter.seen_weight, segmenter.unseen_weight, segmenter.frozen_trust = 0.4, 0.8, {"a": 0.5}
    weights = segmenter.ensemble_weights(("a", "b", "c"))
    assert weights.label.tolist() == pytest.approx([0.2, 0.8, 0.4])
    assert weights.group.tolist() == pytest.approx([0.4, 0.8, 0.4])
    trusting = segmenter(x, text, weights)[0].exp()
    untrusting = segmenter(x, text, dataclasses.replace(weights, label=weights.group))[0].exp()
    # ... which moves pixels between "a" and "c", not to or from "b", which no annotation showed.
    assert torch.allclose(trusting[:, 1], untrusting[:, 1], atol=1e-5)
    assert torch.allclose(trusting.sum(1), torch.ones_like(trusting[:, 0]), atol=1e-5)
    label = torch.tensor([0.2, 0.4]).view(1, 2, 1, 1)
    own = (1 - label) * tuned_log[:, [0, 2]] + label * frozen_log[:, [0, 2]]
    assert torch.allclose(trusting[:, 0] / trusting[:, 2], (own[:, 0] - own[:, 1]).exp(), rtol=1e-4)
    assert not torch.allclose(trusting[:, 0], untrusting[:, 0], atol=1e-3)


def test_training_learns_every_segmentation_tag_of_the_config():
    """A brush tag and a polygon tag on one image: both tags' regions are learnt, in one label map. The brush tag
    names other things the image shows, so what the annotation leaves unpainted is one of them: training learns
    them as a group, and an annotation that paints nothing says the image shows none of the labels."""
    config = """<View><Image name="image" value="$image"/>
      <BrushLabels name="stuff" toName="image" model_background="road,car">
        <Label value="grass"/><Label value="sky"/></BrushLabels>
      <PolygonLabels name="things" toName="image"><Label value="car"/><Label value="sky"/></PolygonLabels></View>"""
    image = np.zeros((40, 60, 3), np.uint8)
    brush = np.zeros((40, 60), np.uint8)
    brush[20:, :] = 255
    results = [
        {"from_name": "stuff", "to_name": "image", "type": "brushlabels", "original_width": 60, "original_height": 40,
         "value": {"format": "rle", "rle": mask2rle(brush), "brushlabels": ["grass"]}},
        {"from_name": "things", "to_name": "image", "type": "polygonlabels", "original_width": 60,
         "original_height": 40, "value": {"points": [[10, 5], [40, 5], [40, 40], [10, 40]], "polygonlabels": ["car"]}},
    ]
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    annotations = [{"task_id": 1, "data": {"image": uri}, "result": results},
                   {"task_id": 2, "data": {"image": uri}, "result": []}]
    samples, vocabulary = build_samples(annotations, config, ImageFetcher())
    # The config's labels, as pre-labels are served, then the other things no tag has as a label.
    assert vocabulary.served == ("grass", "sky", "car") and vocabulary.labels[3:] == ("road",)
    assert [s.background for s in samples] == [True, True] and (samples[1].labels == -1).all()
    samples, trained = restrict_to_annotated(samples, vocabulary)
    # Both tags' annotated labels, then the other things (as one group: the unpainted pixels' class).
    assert trained.labels == ("grass", "car", "road") and trained.others == 1
    assert (samples[0].labels[30, 50], samples[0].labels[5, 15], samples[0].labels[2, 2]) == (0, 1, -1)
    # Without model_background an unpainted pixel says nothing, and an empty annotation teaches nothing.
    plain, vocabulary = build_samples(annotations, config.replace(' model_background="road,car"', ""), ImageFetcher())
    assert [s.background for s in plain] == [False]
    assert restrict_to_annotated(plain, vocabulary)[1].labels == ("grass", "car")


def test_fine_tuning_learns_that_unpainted_pixels_are_other_things(demo_clip, tiny_samples):
    """Where the tag names other things, the pixels the annotations leave unpainted move towards them; where it
    does not, they are not read."""
    vocabulary = Vocabulary(("sky", "grass", "road", "car"), others=2)
    config = TrainConfig(steps=30, batch_size=2, size=64, seed=5, paste=0)
    unpainted = np.stack([s.labels < 0 for s in tiny_samples])
    images = torch.from_numpy(np.stack([s.image for s in tiny_samples]))
    text = TextEncoder(demo_clip).embed(vocabulary)
    share = {}
    for background in (False, True):
        segmenter = build_segmenter(demo_clip, seed=5)
        samples = [dataclasses.replace(s, background=background) for s in tiny_samples]
        finetune(segmenter, demo_clip, TextEncoder(demo_clip), samples, vocabulary, config)
        with torch.no_grad():
            logits, _ = segmenter(segmenter.preprocess(images), text)
        p = F.interpolate(logits, size=unpainted.shape[1:], mode="bilinear").softmax(1)
        share[background] = float(p[:, 2:].sum(1)[torch.from_numpy(unpainted)].mean())
    assert share[True] > share[False] + 0.2, share


class _RecordingPredictor:
    """A version fine-tuned on "a" and "b": flat logits and prior (every pixel's argmax is label 0); every
    prediction labels every pixel 0 at confidence 0.6, and finds labels 0, 1 and 2 at scores 0.6, 0.2 and 0.1."""

    temperature, presence_weight, confidence_scale = 1.0, 0.5, None

    def __init__(self):
        self.vocabularies = []
        self.segmenter = SimpleNamespace(trained_labels=("a", "b"), frozen_trust={})

    def passes(self, images, vocabulary, frozen_only=False):
        self.vocabularies.append(vocabulary.labels)
        classes = len(vocabulary.labels)
        return [(torch.zeros(classes, 4, 4), torch.full((classes,), -math.log(classes))) for _ in images]

    def predict(self, images, vocabulary, rules):
        self.vocabularies.append(vocabulary.labels)
        return [SimpleNamespace(found_scores={0: 0.6, 1: 0.2, 2: 0.1}, label_map=np.zeros(image.shape[:2], np.int16),
                                confidence=np.full(image.shape[:2], 0.6, np.float32)) for image in images]

    def presence(self, priors, vocabulary):
        return [self.presence_weight * prior for prior in priors]


def test_a_version_is_calibrated_in_every_label_it_serves_and_its_rule_on_the_annotated_ones():
    """The fit sees the labels no annotation shows compete (they are served), and the region rule does not
    count them: served, the rule spares them."""
    both, only_a = np.zeros((8, 8), np.int64), np.zeros((8, 8), np.int64)
    both[4:] = 1
    samples = [Sample(np.zeros((8, 8, 3), np.uint8), labels) for labels in [both, only_a] * 10]
    predictor = _RecordingPredictor()
    summary = fit_serving_rules(predictor, samples, Vocabulary.from_labels(["a", "b", "c"]), Settings())
    assert set(predictor.vocabularies) == {("a", "b", "c")}
    # "b" found where it is not (0.2) is counted; "c", which no annotation shows (0.1), is not: with it the
    # threshold would fall halfway to it (0.15), without it every annotated label's region is kept.
    assert summary["min_region_score"] == 0.0
    assert summary["region_recall_weight"] == 1.0  # what the rule was fitted with, shown in /versions
    assert summary["calibration_images"] == 20
    # The frozen CLIP names all of "a"'s annotated pixels and none of "b"'s: the version trusts it in "a" alone.
    assert summary["frozen_trust"] == predictor.segmenter.frozen_trust == {"a": 1.0, "b": 0.0}
    # Its pixels say 0.6 and three in four are right (all of "a"'s, none of "b"'s): served, they say so.
    assert predictor.confidence_scale == pytest.approx(summary["confidence_scale"], abs=1e-4)
    served = scale_confidence(torch.tensor([0.6]), predictor.confidence_scale)
    assert float(served) == pytest.approx(0.75, abs=0.02)
    assert summary["served_ece_after"] < 2 < 10 < summary["served_ece_before"]
    # Where the tag names other things, the pixels an annotation leaves unpainted are theirs: labeled, they are
    # wrong. Half of each image is, so the pixels saying 0.6 are right half of the time; without it, always.
    half = np.full((8, 8), -1, np.int64)
    half[:4] = 0
    for background, right in ((True, 0.5), (False, 1.0)):
        predictor = _RecordingPredictor()
        fit_serving_rules(predictor, [Sample(np.zeros((8, 8, 3), np.uint8), half, background)] * 20,
                          Vocabulary.from_labels(["a", "b"], others=["c"]), Settings())
        assert float(scale_confidence(torch.tensor([0.6]), predictor.confidence_scale)) == pytest.approx(right, abs=0.02)
    # A version trained on 10 images knows them by heart: a scale fitted on them made served pre-labels of two CLIPs
    # overconfident (README, *Measured → Calibration*).
    fewer = _RecordingPredictor()
    summary = fit_serving_rules(fewer, samples[:10], Vocabulary.from_labels(["a", "b", "c"]), Settings())
    assert summary["confidence_scale"] is None and fewer.confidence_scale is None
