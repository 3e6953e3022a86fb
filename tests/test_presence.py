"""The label-free zero-shot rules (model.presence), the rule each version fits (model.calibration), and
refinement that keeps the specks pruning removed (model.regions)."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.label_config import parse_targets
from backend.settings import Settings
from demo import world
from demo.train_clip import DENSE_METHOD
from model import presence
from model.build import SegmentationModel
from model.calibration import fit_min_score
from model.config import ModelConfig, RegionRules
from model.predictor import Predictor, SemanticPrediction
from model.regions import peak_probabilities
from model.task_scores import stream_score, task_score
from model.vocabulary import Vocabulary


def _matching_prior(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The image-level log prior that a pixel temperature of ``temperature`` reproduces exactly."""
    return (logits / temperature).softmax(0).mean((1, 2)).log()


@pytest.mark.parametrize("scale", [1.0, 20.0, 100.0])
def test_label_free_temperature_follows_the_logits_scale_with_no_constant_of_its_own(scale):
    # The same images under CLIPs whose logit scales differ 100-fold: the fitted temperature scales with
    # them, so the calibrated probabilities are the same whichever CLIP made them.
    generator = torch.Generator().manual_seed(0)
    passes = []
    for _ in range(6):
        logits = torch.randn(5, 8, 8, generator=generator) * 3
        passes.append((logits * scale, _matching_prior(logits, 2.0)))
    fitted = presence.LabelFreeTemperature().update("vocabulary", passes)
    assert fitted == pytest.approx(2.0 * scale, rel=0.07)


def test_label_free_temperature_is_per_vocabulary_and_stops_moving():
    estimator = presence.LabelFreeTemperature(max_images=3)
    logits = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(1)) * 4
    sharp, soft = (logits, _matching_prior(logits, 0.5)), (logits, _matching_prior(logits, 5.0))
    assert estimator.get("a") is None
    estimator.update("a", [sharp] * 3)
    estimator.update("b", [soft])
    assert estimator.update("a", [soft] * 10) == pytest.approx(0.5, rel=0.07)  # already pooled 3 images
    assert estimator.get("b") == pytest.approx(5.0, rel=0.07)


def test_the_presence_prior_takes_pixels_from_a_label_the_image_does_not_show():
    # Label 1 wins scattered pixels by a hair; the image as a whole shows labels 0 and 2 only.
    logits = torch.zeros(3, 10, 10)
    logits[0, :, :5], logits[2, :, 5:] = 2.0, 2.0
    logits[1, ::3, ::3] = 2.2
    prior = torch.tensor([0.49, 0.02, 0.49]).log()
    without = Predictor.to_semantic(presence.apply(logits, prior, 1.0, 0.0), 10, 10).label_map
    served = Predictor.to_semantic(presence.apply(logits, prior, 1.0, 0.5), 10, 10).label_map
    assert (without == 1).sum() > 0 and (served == 1).sum() == 0
    assert (served[:, :5] == 0).all() and (served[:, 5:] == 2).all()


def test_a_fine_tuned_version_keeps_the_zero_shot_weight_between_its_trained_labels_and_the_others():
    # Labels 0 and 1 were trained on, 2 and 3 not; the whole image shows 2 (0.6). Training fitted the weight at 0.05.
    prior = torch.tensor([0.1, 0.2, 0.6, 0.1]).log()
    seen = torch.tensor([True, True, False, False])
    served = presence.offsets(prior, 0.05, seen, 0.5)
    groups = torch.tensor([0.3, 0.3, 0.7, 0.7]).log()
    assert torch.allclose(served, 0.05 * (prior - groups) + 0.5 * groups)  # within each group at 0.05
    assert torch.allclose(presence.offsets(prior, 0.05, torch.ones(4, dtype=torch.bool), 0.5), 0.05 * prior)
    assert torch.equal(presence.offsets(prior, 0.05), 0.05 * prior)  # zero-shot: one weight
    # Label 0, which training taught, leads label 2 by a hair where the image shows label 2: at the fitted
    # weight alone it keeps those pixels; with the split kept at the zero-shot weight, label 2 takes them.
    logits = torch.zeros(4, 6, 6)
    logits[0], logits[2] = 2.3, 2.0
    plain = Predictor.to_semantic(presence.apply(logits, prior, 1.0, 0.05), 6, 6).label_map
    split = Predictor.to_semantic(presence.apply(logits, prior, 1.0, 0.05, seen, 0.5), 6, 6).label_map
    assert (plain == 0).all() and (split == 2).all()


def test_the_task_score_weighs_each_label_left_out_by_how_likely_the_dense_view_finds_it():
    # Label 1 wins 16 % of the cells by a hair and the prior takes them; the whole-image view shows 0, 3 and 2.
    logits = torch.zeros(4, 10, 10)
    logits[0, :, :5], logits[2, :, 5:] = 2.0, 2.0
    logits[1, ::3, ::3] = 2.2
    prior = torch.tensor([0.55, 0.01, 0.04, 0.40]).log()

    def semantic(rules, logits=logits, prior=prior):
        return Predictor.to_semantic(presence.apply(logits, prior, 1.0, 0.5), *logits.shape[1:], rules=rules,
                                     prior=prior, presence=0.5 * prior)

    served = semantic(RegionRules(presence_cut=True))
    assert set(np.unique(served.label_map)) == {0, 2}
    # The dense view without the prior gives label 1 e^2.2 / (e^2.2 + e^2 + 2) at its cells, label 3 (never
    # leading) 1 / (e^2 + 3) anywhere.
    peak_1 = np.exp(2.2) / (np.exp(2.2) + np.exp(2.0) + 2)
    assert served.missed.keys() == {1, 3} and served.missed[1] == pytest.approx(peak_1, rel=1e-5)
    assert served.missed[3] == pytest.approx(1 / (np.exp(2.0) + 3), rel=1e-5)
    regions = served.region_scores.values()
    assert task_score(served) == pytest.approx(sum(regions) / (2 + peak_1 + served.missed[3]))
    # Labels the dense view gives next to nothing anywhere barely count: a vocabulary five times larger scores
    # the same task all but the same, with no threshold deciding which labels count.
    wider = semantic(RegionRules(presence_cut=True), torch.cat([logits, torch.full((16, 10, 10), -12.0)]),
                     torch.cat([prior, torch.full((16,), -30.0)]).log_softmax(0))
    assert len(wider.missed) == 18 and task_score(wider) == pytest.approx(task_score(served), abs=1e-3)
    # Without the presence cut (a fine-tuned version's rules), the labels left out count alike.
    assert semantic(RegionRules()).missed == served.missed


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_the_labels_an_image_shows_are_as_many_as_its_prior_spreads_over(scale):
    # The image-level logits of one CLIP and of another whose logit scale is 100 times larger: each counts as
    # many labels as its own distribution's perplexity, with no threshold on either's probabilities.
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0, 2.95]) / (1.0 if scale == 1 else 0.01 * 3)
    prior = presence.log_prior(logits)
    perplexity = float(torch.exp(-(prior.exp() * prior).sum()))
    shown = presence.shown_labels(prior)
    assert int(shown.sum()) == int(np.ceil(perplexity))
    assert shown[prior.argsort(descending=True)[:int(shown.sum())]].all()
    sure = presence.shown_labels(torch.tensor([0.01, 0.97, 0.01, 0.005, 0.005]).log())  # perplexity 1.2
    assert sure.tolist() == [True, True, False, False, False]
    spread = presence.shown_labels(torch.tensor([0.25, 0.25, 1e-9, 0.25, 0.25]).log())  # 4, to float rounding
    assert spread.tolist() == [True, True, False, True, True]


def test_the_presence_cut_unlabels_a_region_the_image_does_not_show_and_that_is_less_sure():
    # Left half label 0 (sure), right half label 1 (unsure); labels 2 and 3 win nowhere.
    logits = torch.full((4, 8, 8), -4.0)
    logits[0, :, :4], logits[1, :, 4:], logits[2, :, 4:] = 6.0, 1.0, 0.5
    label_map = lambda rules, prior=None: Predictor.to_semantic(logits, 8, 8, rules=rules, prior=prior).label_map  # noqa: E731
    shows = lambda *p: torch.tensor(p).log()  # noqa: E731  (each perplexity under 2: two labels shown)
    cut = RegionRules(presence_cut=True)
    assert set(np.unique(label_map(RegionRules(), shows(0.9, 0.01, 0.08, 0.01)))) == {0, 1}  # without the rule
    served = Predictor.to_semantic(logits, 8, 8, rules=cut, prior=shows(0.9, 0.01, 0.08, 0.01))  # shows 0 and 2
    assert (served.label_map[:, :4] == 0).all() and (served.label_map[:, 4:] == -1).all()
    assert set(served.found_scores) == {0, 1}  # what was found is still scored
    # A region the image does not show but surer than those it does stays; so does every region when the image
    # shows none of them, or when no prior is given.
    assert set(np.unique(label_map(cut, shows(0.01, 0.9, 0.08, 0.01)))) == {0, 1}  # shows 1 and 2
    assert set(np.unique(label_map(cut, shows(0.01, 0.01, 0.08, 0.9)))) == {0, 1}  # shows 3 and 2
    assert set(np.unique(label_map(cut))) == {0, 1}


def test_the_presence_cut_is_zero_shot_only_and_the_region_check_serves_versions_too():
    settings = Settings()
    assert settings.region_rules().presence_cut and settings.region_rules().region_check
    tuned = settings.region_rules(0.3, zero_shot=False)
    assert not tuned.presence_cut and tuned.region_check
    assert not dataclasses.replace(settings, presence_cut=False).region_rules().presence_cut
    assert not dataclasses.replace(settings, region_check=False).region_rules().region_check


def test_a_region_is_kept_only_if_its_own_masked_crop_shows_its_label():
    # Crop log-probabilities over 5 labels: the first crop shows labels 0 and 1 (perplexity under 2), the second
    # spreads over four. No threshold of any CLIP's: a label the crop counts stays, wherever it ranks among them.
    crops = torch.tensor([[0.7, 0.29, 0.005, 0.0025, 0.0025], [0.25, 0.25, 0.25, 0.25, 1e-9]]).log()
    assert presence.unshown_regions([1, 3], crops) == []
    assert presence.unshown_regions([2, 4], crops) == [2, 4]
    # A fine-tuned version's view of the same crops: a region goes only if neither view shows its label.
    views = torch.tensor([[0.1, 0.1, 0.78, 0.01, 0.01], [0.97, 0.01, 0.01, 0.005, 0.005]]).log()
    assert presence.unshown_regions([2, 4], crops, views) == [4]


def test_the_crop_coverage_is_the_masks_share_of_each_cell_of_its_masked_crop():
    mask = np.zeros((40, 60), bool)
    mask[10:30, 5:45] = True  # a 20x40 box: the crop's square is 40 a side, the box fills its middle half
    mask[10:20, 5:25] = False  # and the box's top-left quarter is off the mask
    image = np.full((40, 60, 3), 200, np.uint8)
    coverage = presence.crop_coverage(mask, 8)
    crop = presence.masked_crop(image, mask, 8)
    assert coverage.shape == (8, 8) and coverage[:2].sum() == coverage[6:].sum() == 0  # padding above and below
    assert coverage.mean() == pytest.approx(mask.sum() / 40 ** 2, abs=1e-3)
    # Cells the mask covers show the image, the others the grey: the coverage lies on the crop's own grid.
    assert ((crop > 164).all(-1) == (coverage > 0.5)).all()


def test_the_region_check_unlabels_a_region_its_crop_does_not_show_and_keeps_the_others(demo_clip, scenes):
    # Each scene's largest region (its background) relabeled as a clock, which none of them shows: the frozen
    # CLIP's view of that region's crop shows its texture, not a clock. Its true regions stay.
    model = SegmentationModel(demo_clip, ModelConfig(dense_method=DENSE_METHOD, inference_size=128,
                                                     refine_boundaries=False, precision="fp32", runtime="torch"))
    predictor, vocabulary, clock = model.predictor(), Vocabulary.from_labels(world.NAMES), world.NAMES.index("clock")
    images = [image for image, _ in scenes]
    passes = predictor.calibrated(images, vocabulary)
    wrong = []
    for (_, truth), (scores, _, offsets) in zip(scenes, passes, strict=True):
        labels, counts = np.unique(truth, return_counts=True)
        assert clock not in labels
        label_map = np.where(truth == labels[counts.argmax()], clock, truth).astype(np.int16)
        wrong.append(SemanticPrediction(label_map, np.full(truth.shape, 0.5, np.float32),
                                        peaks=peak_probabilities(scores, offsets).numpy()))
    checked = predictor.check_regions(images, wrong, vocabulary)
    assert all(clock not in np.unique(p.label_map) for p in checked)
    assert all((p.label_map[w.label_map == clock] == -1).all() for p, w in zip(checked, wrong, strict=True))
    # The review score counts the cut label as left out, at its peak probability; the stream score, which the
    # acquisition orders by, keeps it among the labels found with its score.
    for p, w in zip(checked, wrong, strict=True):
        assert p.checked_out[clock] == pytest.approx(float(w.peaks[clock])) and clock in p.found_scores
        assert p.checked_out == {c: pytest.approx(float(w.peaks[c])) for c in w.found_scores
                                 if c not in np.unique(p.label_map)}
        kept = len(w.found_scores) - len(p.checked_out)
        assert task_score(p) == pytest.approx(0.5 * kept / (kept + sum(p.checked_out.values())))
        assert stream_score(p) == stream_score(w) == task_score(w) == 0.5
    true_regions = [(label, p) for p, w in zip(checked, wrong, strict=True) for label in np.unique(w.label_map)
                    if label != clock]
    assert sum(label in np.unique(p.label_map) for label, p in true_regions) >= 0.75 * len(true_regions)
    # Served through semantic() with the rule, as the backend does; it needs the vocabulary's words.
    assert len(predictor.semantic(images[:2], passes[:2], RegionRules(region_check=True), vocabulary)) == 2
    with pytest.raises(ValueError, match="vocabulary"):
        predictor.semantic(images[:1], passes[:1], RegionRules(region_check=True))


def test_a_label_the_image_does_not_show_gets_no_pixels_when_the_config_names_what_else_it_shows(demo_clip,
                                                                                                  scenes):
    # A project with one label: alone, softmax over one label paints every pixel with it at 1.0. With the
    # tag's model_background naming the world's other things, pixels of none of the labels are left unlabeled.
    model = SegmentationModel(demo_clip, ModelConfig(dense_method=DENSE_METHOD, inference_size=128,
                                                     precision="fp32", runtime="torch"))
    label = "snow"
    others = [name for name in world.NAMES if name != label]
    config = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image"{}>'
              '<Label value="snow"/></BrushLabels></View>')
    (alone,), (named,) = parse_targets(config.format("")), parse_targets(
        config.format(f' model_background="{",".join(others)}"'))
    assert named.vocabulary.served == (label,) and named.vocabulary.others == len(others)
    images, truths = [image for image, _ in scenes], [truth == world.NAMES.index(label) for _, truth in scenes]
    rules = Settings().region_rules()
    painted = model.predictor().predict(images, alone.vocabulary, rules)
    assert all((p.label_map == 0).all() and p.region_scores == {0: pytest.approx(1.0)} for p in painted)
    served = model.predictor().predict(images, named.vocabulary, rules)
    for p in served:  # nothing of the other things reaches the results or the scores
        assert set(np.unique(p.label_map)) <= {-1, 0} and set(p.found_scores) <= {0} and set(p.missed) <= {0}
        assert len(p.peaks) == 1 and set(p.checked_out) <= {0} and p.background
        if not p.region_scores:  # "no snow here" is an answer: as sure as the snow's dense peak is low
            assert task_score(p) == pytest.approx(1 - max({**p.missed, **p.checked_out}.values()))
        assert [r["value"]["brushlabels"] for r in named.build(p)] == [[label]] * bool(p.region_scores)
    precision = sum((p.label_map == 0)[t].sum() for p, t in zip(served, truths, strict=True)) / max(
        1, sum((p.label_map == 0).sum() for p in served))
    assert sum(t.any() for t in truths) < len(truths)  # some scenes show no snow: painting them all is wrong
    assert precision > 0.5 > sum(t.mean() for t in truths) / len(truths)
    # Naming everything else, the label gets the pixels it gets in a vocabulary of the whole world.
    whole = model.predictor().predict(images, Vocabulary.from_labels([label, *others]), rules)
    assert all(((p.label_map == 0) == (w.label_map == 0)).all() for p, w in zip(served, whole, strict=True))


def test_a_fine_tuned_version_keeps_a_region_its_own_view_of_the_crop_shows(demo_clip, scenes):
    # Each scene's background relabeled as a clock, which the frozen CLIP's crop does not show. A version that
    # learnt nothing beyond it (its decoder still zero) disowns those regions too; a version that learnt to see
    # clocks everywhere (its decoder's bias pulls every pixel onto "clock") keeps them: it is the second judge.
    model = SegmentationModel(demo_clip, ModelConfig(dense_method=DENSE_METHOD, inference_size=128,
                                                     refine_boundaries=False, precision="fp32", runtime="torch"))
    vocabulary, clock = Vocabulary.from_labels(world.NAMES), world.NAMES.index("clock")
    wrong = []
    for _, truth in scenes[:4]:
        labels, counts = np.unique(truth, return_counts=True)
        label_map = np.where(truth == labels[counts.argmax()], clock, truth).astype(np.int16)
        wrong.append(SemanticPrediction(label_map, np.full(truth.shape, 0.5, np.float32)))
    images = [image for image, _ in scenes[:4]]
    kept = {}
    for learnt in ("nothing", "clocks"):
        segmenter = model.segmenter()
        segmenter.trained_labels = tuple(world.NAMES)
        if learnt == "clocks":
            with torch.no_grad():
                segmenter.decoder.out.bias.copy_(1e4 * model.encoder.embed(vocabulary)[clock])  # outweighs Z
        checked = model.predictor(segmenter, temperature=1.0).check_regions(images, wrong, vocabulary)
        kept[learnt] = sum(clock in np.unique(p.label_map) for p in checked)
    assert kept == {"nothing": 0, "clocks": 4}


def test_the_prior_comes_from_the_same_pass_and_is_the_clips_own_image_classification(demo_clip):
    # An identity to float rounding: the pass in float32 torch, as open_clip's own encode_image runs.
    model = SegmentationModel(demo_clip, ModelConfig(dense_method=DENSE_METHOD, inference_size=64,
                                                     refine_boundaries=False, precision="fp32", runtime="torch"))
    predictor = model.predictor()
    vocabulary = Vocabulary.from_labels(world.NAMES)
    images = [image[:64, :64] for image, _ in world.test_scenes(3, seed=5)]
    priors = torch.stack([prior for _, prior in predictor.passes(images, vocabulary)])
    clip = demo_clip.model
    with torch.no_grad():
        pixels = demo_clip.preprocess(torch.from_numpy(np.stack(images)))
        image = F.normalize(clip.encode_image(pixels), dim=-1)
        text = model.encoder.embed(vocabulary)
        expected = (clip.logit_scale.exp() * image @ text.T).log_softmax(-1)
    assert torch.allclose(priors, expected, atol=1e-4)


def test_a_served_prediction_without_temperature_uses_the_label_free_one(demo_clip, scenes):
    predictor = SegmentationModel(demo_clip, ModelConfig(dense_method=DENSE_METHOD, inference_size=128,
                                                         refine_boundaries=False)).predictor()
    vocabulary = Vocabulary.from_labels(world.NAMES)
    assert predictor.temperature is None
    predictor.predict([image for image, _ in scenes[:4]], vocabulary)
    fitted = predictor.label_free.get(vocabulary.key)
    assert fitted is not None and fitted != 1.0


def test_the_fitted_min_score_keeps_what_the_annotations_show_and_drops_what_they_do_not():
    found = [{0: 0.9, 1: 0.35, 2: 0.7}, {0: 0.8, 3: 0.3}, {2: 0.6, 4: 0.4, 1: 0.2}]
    present = [{0, 2}, {0}, {2, 4}]
    threshold = fit_min_score(found, present)
    kept = [{label for label, score in scores.items() if score >= threshold} for scores in found]
    assert kept == [{0, 2}, {0}, {2, 4}]
    assert fit_min_score([{}], [set()]) == 0.0


def test_a_recall_weight_under_one_fits_a_rule_that_keeps_fewer_surer_regions():
    # Sorted: 0.9 right, 0.8 right, 0.5 wrong, 0.4 right, 0.1 wrong. F1 keeps down to 0.4, the wrong 0.5
    # with it; at beta 0.5 a wrong region kept costs four times a right one dropped: down to 0.8 only.
    found = [{0: 0.9, 1: 0.5, 2: 0.1}, {0: 0.8, 3: 0.4}]
    present = [{0}, {0, 3}]
    assert fit_min_score(found, present) == 0.25
    assert fit_min_score(found, present, recall_weight=0.5) == 0.65
    assert fit_min_score(found, present, recall_weight=2.0) == 0.25


def test_no_region_under_min_area_survives_refinement_at_1920x1080():
    # Label 2 covers 1.3% of the image after pruning; its pixels look like label 0's, so the guided filter
    # shrinks it to about 0.6%: a speck under MIN_REGION_AREA that refinement must give away too.
    height, width = 1080, 1920
    logits = torch.zeros(3, 34, 60)
    logits[0, :, :30], logits[1, :, 30:] = 3.0, 3.0
    logits[2, 14:20, 8:14] = 3.2
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :width // 2] = (40, 160, 40)
    image[:, width // 2:] = (40, 40, 200)
    rules = RegionRules(0.0, 0.01)
    unrefined = Predictor.to_semantic(logits, height, width, 1.0, rules).label_map
    assert (unrefined == 2).mean() > rules.min_area  # large enough to be kept by pruning alone
    prediction = Predictor.to_semantic(logits, height, width, 1.0, rules, image)
    areas = np.bincount(prediction.label_map.ravel().astype(np.int64), minlength=3) / prediction.label_map.size
    assert prediction.label_map.shape == (height, width)
    assert all(area == 0 or area >= rules.min_area for area in areas), areas
