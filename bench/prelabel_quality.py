"""Pre-labels annotators keep: region pruning, boundaries that follow the image, task scores.

    python -m bench.prelabel_quality [--test-images 80] [--train-images 100] [--steps 300] [--train-world shifted]

Two worlds: the demo world's test scenes (where the defaults were chosen) and
:func:`demo.world.shifted_scenes` (smaller things, a random camera; never tuned on). Two
models: zero-shot at the demo CLIP's temperature, and fine-tuned with GKC on
``--train-images`` annotated demo scenes, calibrated on them as training jobs do (with
``--held-out-images N``, also the region rule fitted on N other annotated scenes the version never
trained on, at both recall weights: what a rule fitted on its own training images gives away). With
``--train-world shifted`` the annotated scenes are other scenes of the shifted world, as in a project whose
images are all like that; by default the shifted world's rows ask how a version does on images unlike its
annotations.

* **Pruning**: regions per image, region precision (the share of predicted regions whose
  label is in the image's ground truth) and dataset mIoU, today's post-processing against
  :class:`model.regions.RegionRules` (the backend's defaults and two alternatives).
* **Boundaries**: scenes rendered at 4× the inference size; boundary F-score (a boundary
  pixel counts if one of the other map's lies within 2 px), mIoU, and the post-processing
  time per image, for bilinear upsampling, PAMR (Araslanov & Roth, CVPR 2020) and the
  guided filter the backend uses; then the refinement's share of a whole CPU prediction.
* **Task scores**: Spearman correlation between each task score on offer and the task's
  own mIoU, on the served (pruned, refined) predictions.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from backend.settings import Settings
from backend.training import fit_served_confidence, region_scores, train_config
from bench.calibration import task_miou
from demo import world
from demo.train_clip import DEMO_CLIPS, parse_bench_arguments
from model import presence
from model.calibration import calibrate, fit_min_score
from model.config import NO_PRUNING, RegionRules
from model.evaluation import ConfusionMatrix
from model.predictor import Predictor
from model.regions import GUIDED_FILTER_EPS, guided_filter, working_shape
from model.task_scores import TASK_SCORES, task_score
from model.train import Sample, finetune
from model.vocabulary import Vocabulary

VOCABULARY = Vocabulary.from_labels(world.NAMES)
TODAY = NO_PRUNING


def boundary(label_map: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label."""
    edges = np.zeros(label_map.shape, bool)
    edges[:, :-1] |= label_map[:, :-1] != label_map[:, 1:]
    edges[:-1] |= label_map[:-1] != label_map[1:]
    return edges


def boundary_f(predicted: np.ndarray, truth: np.ndarray, tolerance: int = 2) -> float:
    """Boundary F-score: precision and recall of boundary pixels within ``tolerance`` px of the other map's."""
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    ours, theirs = boundary(predicted), boundary(truth)
    near_ours = cv2.dilate(ours.astype(np.uint8), disk) > 0
    near_theirs = cv2.dilate(theirs.astype(np.uint8), disk) > 0
    precision = (ours & near_theirs).sum() / max(1, ours.sum())
    recall = (theirs & near_ours).sum() / max(1, theirs.sum())
    return float(2 * precision * recall / max(1e-9, precision + recall))


def pamr(logits: torch.Tensor, image: np.ndarray, temperature: float, iterations: int = 10,
         dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)) -> np.ndarray:
    """Pixel-adaptive mask refinement of the bilinearly upsampled probabilities of the labels that win
    somewhere: each step averages every pixel's neighbours (at several dilations), weighted by a
    softmax of their colour similarity."""
    height, width = image.shape[:2]
    up = F.interpolate(logits[None].float() / temperature, size=(height, width), mode="bilinear",
                       align_corners=False)[0]
    labels = up.argmax(0).unique()
    masks = up.softmax(0)[labels][None]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        shifted = []
        for d in dilations:
            padded = F.pad(x, [d] * 4, mode="replicate")
            shifted += [padded[..., d + dy:d + dy + height, d + dx:d + dx + width]
                        for dy in (-d, 0, d) for dx in (-d, 0, d) if dy or dx]
        return torch.stack(shifted, 2)

    around = neighbours(pixels)
    affinity = (-((around - pixels[:, :, None]).abs() / (1e-8 + 0.1 * around.std(2, keepdim=True))).mean(1)).softmax(1)
    for _ in range(iterations):
        masks = (neighbours(masks) * affinity[:, None]).sum(2)
    return labels[masks[0].argmax(0)].numpy()


def region_precision(pairs) -> tuple[float, float]:
    """(regions per image, the share of predicted labels present in the truth) over (label map, truth) pairs."""
    right = total = 0
    for predicted, truth in pairs:
        labels = set(np.unique(predicted[predicted >= 0]).tolist())
        right += len(labels & set(np.unique(truth).tolist()))
        total += len(labels)
    return total / len(pairs), right / max(1, total)


def miou(pairs) -> float:
    confusion = ConfusionMatrix(len(world.NAMES))
    for predicted, truth in pairs:
        confusion.update(truth, predicted)
    return confusion.miou()


class Bench:
    def __init__(self, args):
        self.args = args
        self.clip = DEMO_CLIPS[args.clip]
        self.model = self.clip.model(refine_boundaries=False)
        self.worlds = {"demo world": world.test_scenes(args.test_images),
                       "shifted world": world.shifted_scenes(args.test_images)}

    def annotated(self, count: int, seed: int) -> list[Sample]:
        """``count`` annotated scenes of ``--train-world``, drawn from a seed of their own (not the test scenes')."""
        scenes = (world.shifted_scenes(count, seed=seed) if self.args.train_world == "shifted"
                  else world.test_scenes(count, seed=seed))
        return [Sample(i, t) for i, t in scenes]

    def fine_tuned(self) -> tuple[Predictor, RegionRules, dict[str, RegionRules]]:
        """Fine-tuned and calibrated as a training job does; with the pruning it fits and serves, and that rule
        fitted at ``--recall-weight`` (by row name)."""
        samples = self.annotated(self.args.train_images, seed=777)
        segmenter, settings = self.model.segmenter(), Settings()
        finetune(segmenter, self.model.clip, self.model.encoder, samples, VOCABULARY,
                 train_config(settings, steps=self.args.steps, size=self.clip.inference_size))
        predictor = self.model.predictor(segmenter)
        predictor.refine_boundaries = settings.refine_boundaries  # the rule is fitted as pre-labels are served
        # fit_serving_rules' steps, with one pass over the samples for the rule at both recall weights.
        calibrate(predictor, [s.image for s in samples], [s.labels for s in samples], VOCABULARY)
        fit_served_confidence(predictor, samples, VOCABULARY, settings)
        found, present = region_scores(predictor, samples, VOCABULARY, settings)
        rules = settings.region_rules(fit_min_score(found, present, settings.region_recall_weight), zero_shot=False)
        weight = self.args.recall_weight
        preciser = settings.region_rules(fit_min_score(found, present, weight), zero_shot=False)
        alternatives = {f"pruned and refined, min_score fitted at REGION_RECALL_WEIGHT={weight} "
                        f"({preciser.min_score})": preciser}
        if self.args.held_out_images:
            held_out = self.annotated(self.args.held_out_images, seed=778)
            found, present = region_scores(predictor, held_out, VOCABULARY, settings)
            for recall_weight in (settings.region_recall_weight, weight):
                fitted = settings.region_rules(fit_min_score(found, present, recall_weight), zero_shot=False)
                alternatives[f"pruned and refined, min_score fitted on {len(held_out)} held-out annotated scenes at "
                             f"REGION_RECALL_WEIGHT={recall_weight} ({fitted.min_score})"] = fitted
        predictor.refine_boundaries = False
        return predictor, rules, alternatives

    def pruning(self, name: str, predictor: Predictor, scenes, chosen: RegionRules,
                alternatives: dict[str, RegionRules] | None = None) -> dict:
        """Regions, precision and mIoU under several rules, ``alternatives`` among them, refined as served; the
        served predictions."""
        passes = predictor.passes([image for image, _ in scenes], VOCABULARY)
        temperature = predictor.temperature_for(VOCABULARY, passes)
        logits = [presence.apply(out, prior, temperature, predictor.presence_weight) for out, prior in passes]
        unprimed = [presence.apply(out, prior, temperature, 0.0) for out, prior in passes]
        # What a CLIP got before the label-free rules: no prior, TEMPERATURE unset (1) or the fitted one, 0.25.
        previous = [presence.apply(out, prior, predictor.temperature or 1.0, 0.0) for out, prior in passes]
        default = (f"min_score {chosen.min_score}, min_area {chosen.min_area}" + (", presence cut" * chosen.presence_cut)
                   + (", region check" * chosen.region_check))
        unprimed_row = "no presence prior, no pruning, refined"
        previous_row = "previous defaults (no prior, T 1 unless fitted, min_score 0.25, min_area 0.01)"
        sources = {unprimed_row: unprimed, previous_row: previous}
        rows = {unprimed_row: (TODAY, True), previous_row: (RegionRules(0.25, 0.01), True),
                "today (no pruning, bilinear)": (TODAY, False), "refined, no pruning": (TODAY, True),
                f"pruned ({default}), bilinear": (chosen, False), f"pruned and refined ({default}): served": (chosen, True),
                "pruned and refined, stricter: min_score 0.3, min_area 0.05": (RegionRules(0.3, 0.05), True),
                "pruned and refined, looser: min_score 0.2, min_area 0.01": (RegionRules(0.2, 0.01), True),
                "pruned and refined, unlikely regions' pixels to the best label that stays instead of unlabeled":
                    (RegionRules(chosen.min_score, chosen.min_area, reassign_unlikely=True), True)}
        rows.update({row: (rules, True) for row, rules in (alternatives or {}).items()})
        if chosen.presence_cut:
            rows["pruned and refined, neither cut"] = (dataclasses.replace(chosen, presence_cut=False,
                                                                            region_check=False), True)
        if chosen.region_check:
            alone = "presence cut alone (no region check)" if chosen.presence_cut else "no region check"
            rows[f"pruned and refined, {alone}"] = (dataclasses.replace(chosen, region_check=False), True)
        print(f"\n{name}: {len(scenes)} scenes, T = {temperature:.3f}\n\n| post-processing | regions / image | region precision | mIoU |\n|---|---|---|---|")
        kept = {}
        for row, (rules, refine) in rows.items():
            scores = sources.get(row, logits)
            weight = 0.0 if row in sources else predictor.presence_weight
            predictions = [Predictor.to_semantic(out, *image.shape[:2], 1.0, rules, image if refine else None, prior,
                                                 weight * prior)
                           for out, (_, prior), (image, _) in zip(scores, passes, scenes, strict=True)]
            if rules.region_check:
                predictions = predictor.check_regions([image for image, _ in scenes], predictions, VOCABULARY)
            pairs = [(p.label_map, truth) for p, (_, truth) in zip(predictions, scenes, strict=True)]
            count, precision = region_precision(pairs)
            print(f"| {row} | {count:.2f} | {precision:.3f} | {miou(pairs):.2f} |", flush=True)
            if (rules, refine) in ((chosen, True), (TODAY, False)):
                kept["served" if refine else "today"] = predictions
        return kept

    def boundaries(self, name: str, predictor: Predictor, scenes) -> None:
        print(f"\n{name}, rendered at {scenes[0][0].shape[0]} px (4x the inference size): boundaries, "
              "no pruning\n\n| upsampling | boundary F (%) | mIoU | ms / image |\n|---|---|---|---|")
        logits = predictor.logits([image for image, _ in scenes], VOCABULARY)
        temperature = 1.0  # the logits are calibrated already
        methods = {
            "bilinear (today)": lambda out, image: Predictor.to_semantic(out, *image.shape[:2], temperature).label_map,
            "PAMR, 10 iterations": lambda out, image: pamr(out, image, temperature),
            "guided filter (the backend's)": lambda out, image: Predictor.to_semantic(
                out, *image.shape[:2], temperature, image=image).label_map,
        }
        for method, run in methods.items():
            started = time.perf_counter()
            maps = [run(out, image) for out, (image, _) in zip(logits, scenes, strict=True)]
            elapsed = (time.perf_counter() - started) / len(scenes) * 1000
            scores = [boundary_f(m, truth) for m, (_, truth) in zip(maps, scenes, strict=True)]
            pairs = [(m, truth) for m, (_, truth) in zip(maps, scenes, strict=True)]
            print(f"| {method} | {100 * np.mean(scores):.1f} | {miou(pairs):.2f} | {elapsed:.0f} |", flush=True)

    def task_scores(self, name: str, predictions, scenes) -> dict[str, float]:
        quality = [task_miou(truth, p.label_map) for p, (_, truth) in zip(predictions, scenes, strict=True)]
        values = {kind: [task_score(p, kind) for p in predictions] for kind in TASK_SCORES}
        rhos = {kind: spearmanr(v, quality).statistic for kind, v in values.items()}
        print(f"  {name}: " + ", ".join(f"{kind} {rho:+.2f} (range {min(values[kind]):.2g}-{max(values[kind]):.2g})"
                                      for kind, rho in rhos.items()), flush=True)
        return rhos


def request_share(predictor: Predictor, images: list[np.ndarray]) -> None:
    """Whole CPU predictions with and without refinement, and the guided filter's own share of one."""
    timings = {}
    for refine in (False, True):
        predictor.refine_boundaries = refine
        predictor.predict(images[:2], VOCABULARY)  # warm-up
        started = time.perf_counter()
        predictions = predictor.predict(images, VOCABULARY, Settings().region_rules())
        timings[refine] = (time.perf_counter() - started) / len(images) * 1000
    logits = predictor.logits(images[:1], VOCABULARY)[0]
    shape = working_shape(logits, *images[0].shape[:2])
    labels = int(np.median([len(p.region_scores) for p in predictions]))
    guide, probabilities = torch.rand(3, *shape), torch.rand(max(2, labels), *shape)
    started = time.perf_counter()
    for _ in range(10):
        guided_filter(guide, probabilities, max(1, shape[0] // logits.shape[1]), GUIDED_FILTER_EPS)
    filter_ms = (time.perf_counter() - started) * 100
    print(f"\nwhole CPU prediction at {images[0].shape[0]} px: {timings[False]:.0f} ms/image unrefined, "
          f"{timings[True]:.0f} refined (post-processing then works at {shape[0]} px); the guided filter itself "
          f"({max(2, labels)} labels): {filter_ms:.1f} ms, {filter_ms / timings[True]:.0%} of a refined prediction")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prelabel_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-images", type=int, default=80)
    parser.add_argument("--boundary-images", type=int, default=20)
    parser.add_argument("--train-images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--recall-weight", type=float, default=0.5,
                        help="the fine-tuned rows also show the region rule fitted at this REGION_RECALL_WEIGHT")
    parser.add_argument("--held-out-images", type=int, default=0,
                        help="the fine-tuned rows also show the rule fitted on this many held-out annotated scenes")
    parser.add_argument("--train-world", choices=("demo", "shifted"), default="demo",
                        help="the world of the fine-tuned version's annotated scenes")
    args = parse_bench_arguments(parser, argv)
    bench = Bench(args)
    zero_shot = bench.model.predictor()
    with torch.enable_grad():
        tuned, tuned_rules, alternatives = bench.fine_tuned()
    print(f"fine-tuned version ({args.train_images} annotated scenes of the {args.train_world} world): "
          f"T = {tuned.temperature:.3f}, fitted min_score = {tuned_rules.min_score}")
    served = {}
    for world_name, scenes in bench.worlds.items():
        for model_name, predictor, rules, others in (("zero-shot", zero_shot, Settings().region_rules(), None),
                                                     ("fine-tuned", tuned, tuned_rules, alternatives)):
            served[world_name, model_name] = bench.pruning(f"{world_name}, {model_name}", predictor, scenes, rules,
                                                           others)
    size = 4 * bench.clip.inference_size
    rng = np.random.default_rng(2025)
    large = {"demo world": [world.render_scene(rng, size=size) for _ in range(args.boundary_images)],
             "shifted world": world.shifted_scenes(args.boundary_images, seed=99, size=size)}
    for world_name, scenes in large.items():
        bench.boundaries(f"{world_name}, zero-shot", zero_shot, scenes)

    request_share(zero_shot, [image for image, _ in large["demo world"]])

    print("\nSpearman(task score, the task's own mIoU), on the served predictions (pruned, refined):")
    rhos = {key: bench.task_scores(", ".join(key), result["served"], bench.worlds[key[0]])
            for key, result in served.items()}
    print("\n... and today's (no pruning, bilinear):")
    for key, result in served.items():
        bench.task_scores(", ".join(key), result["today"], bench.worlds[key[0]])
    kind = Settings().task_score
    print(f"\nprelabel_quality: clip={args.clip} train_world={args.train_world} " + " ".join(
        f"spearman_{w.split()[0]}_{m.split('-')[0]}={rhos[w, m][kind]:.2f}" for w, m in rhos))


if __name__ == "__main__":
    main()
