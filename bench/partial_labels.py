"""A project whose labels name only some of what its images show, as served, zero-shot and fine-tuned.

    python -m bench.partial_labels --clip NAME [--test-images 80] [--sizes 1,3,8] [--draws 4]
                                   [--train-images 100 --train-sizes 3,8 --train-draws 2 --steps 300]

The demo world's scenes show 30 concepts; a project here labels ``--sizes`` of them, drawn at random
(``--draws`` draws each), and its ground truth is their pixels alone (an annotator leaves the rest
unlabeled). Three label configs, through :func:`backend.label_config.parse_targets` as the backend reads them:

* ``labels alone``: the ``BrushLabels`` tag lists the project's labels;
* ``background, all``: its ``model_background`` also names every other concept of the world;
* ``background, half``: it names half of them, drawn at random (a user who names some of what else the
  images show).

With ``--train-images N``, the same for versions fine-tuned as a training job does on N other demo scenes
annotated with the project's labels alone (the rest left unlabeled, as an annotator leaves it), for
``--train-sizes`` labels and ``--train-draws`` draws: one fine-tuning per draw and config (where the tag names
other things, training reads the unlabeled pixels as theirs), calibrated and its rule fitted in its vocabulary.

Cells: pixel precision (labeled pixels whose label is right), pixel recall, region precision (regions
whose label the image shows), regions per image, mIoU over the project's labels (a pixel predicted
where the truth is unlabeled counts against its label), and the Spearman correlation between the task score
and the share of the task's pixels its pre-label gets right (labeled right, or left unlabeled where the truth
is): the review score's ranking. Each cell is the mean over the draws.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from scipy.stats import spearmanr

from backend.label_config import parse_targets
from backend.settings import Settings
from backend.training import fit_serving_rules, restrict_to_annotated, train_config
from demo import world
from demo.train_clip import DEMO_CLIPS, parse_bench_arguments
from model.task_scores import task_score
from model.train import Sample, finetune

ARMS = ("labels alone", "background, all", "background, half")
METRICS = ("pixel_precision", "pixel_recall", "region_precision", "regions", "miou", "spearman")


def label_config(labels: list[str], background: list[str]) -> str:
    names = "".join(f'<Label value="{label}"/>' for label in labels)
    attribute = f' model_background="{",".join(background)}"' if background else ""
    return (f'<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image"{attribute}>'
            f"{names}</BrushLabels></View>")


def project_truth(truth: np.ndarray, classes: list[int]) -> np.ndarray:
    """(H, W) int64: each pixel's position in ``classes``, -1 (unlabeled) elsewhere."""
    mine = np.full(truth.shape, -1, np.int64)
    for k, concept in enumerate(classes):
        mine[truth == concept] = k
    return mine


def configs(labels: list[str], others: list[str], half: list[str]) -> dict:
    """Each arm's control tag, as the backend reads its config."""
    return {arm: parse_targets(label_config(labels, background))[0]
            for arm, background in zip(ARMS, ([], others, half), strict=True)}


def fine_tuned(model, classes: list[int], targets: dict, count: int, steps: int, inference_size: int) -> dict:
    """Per arm, a predictor of a version trained as a job does on ``count`` demo scenes annotated with the project's
    labels alone (where the arm's tag names other things, the unlabeled pixels are taken as those), calibrated with
    its rule fitted in that arm's vocabulary; and that arm's rules."""
    settings = Settings()
    scenes = [(image, project_truth(truth, classes)) for image, truth in world.test_scenes(count, seed=777)]
    served = {}
    for arm, target in targets.items():
        background = bool(target.vocabulary.others)
        # Without other things named, an empty annotation teaches nothing; with them, that none of the labels is there.
        samples = [Sample(image, mine, background) for image, mine in scenes if background or (mine >= 0).any()]
        trained_samples, trained = restrict_to_annotated(samples, target.vocabulary)
        segmenter = model.segmenter()
        with torch.enable_grad():
            finetune(segmenter, model.clip, model.encoder, trained_samples, trained,
                     train_config(settings, steps=steps, size=inference_size))
        predictor = model.predictor(segmenter, temperature=1.0)
        fitted = fit_serving_rules(predictor, samples, target.vocabulary, settings)
        served[arm] = predictor, target.rules(settings.region_rules(fitted["min_region_score"], zero_shot=False))
    return served


def measure(predictions, truths: list[np.ndarray], classes: list[int]) -> dict[str, float]:
    """The cells, for predictions indexed by position in ``classes`` (world concept indices)."""
    count = len(classes)
    right = labeled = found = shown = regions = regions_right = 0
    inter, union = np.zeros(count), np.zeros(count)
    scores, agreement = [], []
    for prediction, truth in zip(predictions, truths, strict=True):
        mine = project_truth(truth, classes)
        label_map = prediction.label_map
        scores.append(task_score(prediction))
        agreement.append(float((np.where(label_map >= 0, label_map, -1) == mine).mean()))
        right += ((label_map >= 0) & (label_map == mine)).sum()
        labeled += (label_map >= 0).sum()
        found += ((mine >= 0) & (label_map == mine)).sum()
        shown += (mine >= 0).sum()
        for k in range(count):
            inter[k] += ((label_map == k) & (mine == k)).sum()
            union[k] += ((label_map == k) | (mine == k)).sum()
            if (label_map == k).any():
                regions += 1
                regions_right += bool((mine == k).any())
    occurring = union > 0
    return {"pixel_precision": right / max(labeled, 1), "pixel_recall": found / max(shown, 1),
            "region_precision": regions_right / max(regions, 1), "regions": regions / len(truths),
            "miou": float((inter[occurring] / union[occurring]).mean() * 100) if occurring.any() else 0.0,
            "spearman": spearmanr(scores, agreement).statistic if np.ptp(scores) and np.ptp(agreement) else np.nan}


def report(title: str, rows: dict) -> dict:
    """Print one table (rows: (size, arm) → the cells of each draw); the means by (size, arm)."""
    print(f"\n{title}\nlabels | config | " + " | ".join(METRICS))
    summary = {}
    for (size, arm), cells in rows.items():
        means = {metric: float(np.nanmean([cell[metric] for cell in cells])) for metric in METRICS}
        summary[size, arm] = means
        print(f"{size} | {arm} | " + " | ".join(f"{means[m]:.1f}" if m == "miou" else f"{means[m]:.2f}" for m in METRICS))
    return summary


def precision_change(summary: dict, prefix: str = "") -> str:
    """The summary line's pixel precision per label count, with nothing named → with everything else named."""
    return " ".join(f"{prefix}precision_{size}={summary[size, ARMS[0]]['pixel_precision']:.2f}->"
                    f"{summary[size, ARMS[1]]['pixel_precision']:.2f}" for size in dict.fromkeys(s for s, _ in summary))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.partial_labels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-images", type=int, default=80)
    parser.add_argument("--sizes", default="1,3,8", help="how many labels a project has, comma-separated")
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=0, help="also fine-tuned versions, on this many scenes")
    parser.add_argument("--train-sizes", default="3,8")
    parser.add_argument("--train-draws", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    args = parse_bench_arguments(parser, argv)
    clip = DEMO_CLIPS[args.clip]
    model = clip.model()
    scenes = world.test_scenes(args.test_images)
    images, truths = [image for image, _ in scenes], [truth for _, truth in scenes]
    rng = np.random.default_rng(0)
    zero_shot, tuned = defaultdict(list), defaultdict(list)
    train_sizes = {int(s) for s in args.train_sizes.split(",")} if args.train_images else set()
    for size in (int(s) for s in args.sizes.split(",")):
        for draw in range(args.draws):
            classes = sorted(rng.choice(len(world.NAMES), size, replace=False).tolist())
            labels = [world.NAMES[c] for c in classes]
            others = [name for name in world.NAMES if name not in labels]
            half = [others[i] for i in sorted(rng.choice(len(others), len(others) // 2, replace=False))]
            targets = configs(labels, others, half)
            for arm, target in targets.items():
                predictions = model.predictor().predict(images, target.vocabulary,
                                                        target.rules(Settings().region_rules()))
                zero_shot[size, arm].append(measure(predictions, truths, classes))
            if size in train_sizes and draw < args.train_draws:
                versions = fine_tuned(model, classes, targets, args.train_images, args.steps, clip.inference_size)
                for arm, (predictor, rules) in versions.items():
                    predictions = predictor.predict(images, targets[arm].vocabulary, rules)
                    tuned[size, arm].append(measure(predictions, truths, classes))
    print(f"{args.clip}, {args.test_images} demo scenes, as served; each cell the mean over the draws")
    line = precision_change(report(f"zero-shot, {args.draws} draws", zero_shot))
    if tuned:
        line += " " + precision_change(report(f"fine-tuned on {args.train_images} scenes annotated with the labels "
                                              f"alone, {args.train_draws} draws", tuned), "tuned_")
    print(f"\npartial_labels: clip={args.clip} {line}")


if __name__ == "__main__":
    main()
