"""Are the scores trustworthy? Calibration and task ranking on the synthetic world.

    python -m bench.calibration [--train-images 100] [--calibration-images 40] [--test-images 80]
                                [--test-world demo|shifted]

For the zero-shot model and for one fine-tuned on ``--train-images`` fully annotated scenes,
prints the pixel expected calibration error (ECE, %) on the test scenes (of the demo world, or of
:func:`demo.world.shifted_scenes`, never tuned on) before and after
temperature scaling (T fitted on held-out annotated images, and for the fine-tuned model on
its own training images, as the backend's training job does), and the Spearman correlation
between each task score the backend offers and the task's own mIoU. These read the unpruned,
unrefined predictions; the ECE is also read as pre-labels are served (pruned, refined, regions
checked), over the pixels they label; the fine-tuned model's with and without the confidence scale its
training fitted.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import spearmanr

from backend.settings import Settings
from backend.training import fit_serving_rules, train_config
from demo import world
from demo.train_clip import DEMO_CLIPS, parse_bench_arguments
from model import presence
from model.calibration import calibrate, expected_calibration_error
from model.config import RegionRules
from model.evaluation import ConfusionMatrix
from model.predictor import Predictor, SemanticPrediction
from model.task_scores import TASK_SCORES, task_score
from model.train import Sample, finetune
from model.vocabulary import Vocabulary


def task_miou(truth: np.ndarray, predicted: np.ndarray) -> float:
    """mIoU (%) of one image over the classes in its truth or its prediction."""
    return ConfusionMatrix(len(world.NAMES)).update(truth, predicted).miou()


def candidate_scores(prediction: SemanticPrediction) -> dict[str, float]:
    """Task-level scores of one prediction; higher = more trustworthy."""
    return {**{f"TASK_SCORE={kind}": task_score(prediction, kind) for kind in TASK_SCORES},
            "mean pixel confidence (not offered)": float(prediction.confidence.mean())}


def report(name: str, predictor: Predictor, vocabulary: Vocabulary, fit_sets: dict[str, list], test) -> dict:
    """ECE before and after calibration on each fit set; Spearman of task scores, calibrated on the last."""
    passes = predictor.passes([image for image, _ in test], vocabulary)
    results = {"temperature": {}, "ece": {}, "spearman": {}}
    print(f"\n{name}: pixel ECE (%) on {len(test)} test scenes")
    # "none": what is served before any annotation (zero-shot: the label-free temperature).
    for label, scenes in [("none", [])] + list(fit_sets.items()):
        calibration = calibrate(predictor, [i for i, _ in scenes], [t for _, t in scenes], vocabulary,
                                min_images=1) if scenes else {"temperature": predictor.temperature_for(vocabulary, passes)}
        temperature = calibration["temperature"]
        offsets = [presence.offsets(prior, predictor.presence_weight) for _, prior in passes]
        predictions = [Predictor.to_semantic(presence.shift(out, temperature, share), *truth.shape,
                                             prior=prior, presence=share)
                       for (out, prior), share, (_, truth) in zip(passes, offsets, test, strict=True)]
        ece = expected_calibration_error(np.concatenate([p.confidence.ravel() for p in predictions]),
                                         np.concatenate([(p.label_map == t).ravel()
                                                         for p, (_, t) in zip(predictions, test, strict=True)]))
        results["temperature"][label], results["ece"][label] = calibration["temperature"], ece
        print(f"  T fitted on {label:>26}: T = {calibration['temperature']:.3f}  ECE = {ece:.1f}")
    quality = [task_miou(t, p.label_map) for p, (_, t) in zip(predictions, test, strict=True)]
    print(f"  Spearman(task score, task mIoU), T = {temperature:.3f}:")
    for key in candidate_scores(predictions[0]):
        rho = spearmanr([candidate_scores(p)[key] for p in predictions], quality).statistic
        results["spearman"][key] = rho
        print(f"    {key:>36}: {rho:+.3f}")
    return results


def served_ece(predictor: Predictor, vocabulary: Vocabulary, rules: RegionRules, test, name: str = "as served") -> float:
    """Pixel ECE (%) of the pre-labels ``predictor`` serves as it stands (refined, pruned by ``rules``, regions
    checked), over the pixels they label: a pixel left unlabeled claims nothing."""
    refine, predictor.refine_boundaries = predictor.refine_boundaries, True
    predictions = predictor.predict([image for image, _ in test], vocabulary, rules)
    predictor.refine_boundaries = refine
    labeled = [p.label_map >= 0 for p in predictions]
    ece = expected_calibration_error(np.concatenate([p.confidence[m] for p, m in zip(predictions, labeled, strict=True)]),
                                     np.concatenate([(p.label_map == t)[m]
                                                     for p, m, (_, t) in zip(predictions, labeled, test, strict=True)]))
    print(f"  {name} (pruned, refined, regions checked; {np.mean([m.mean() for m in labeled]):.0%} of the pixels "
          f"labeled): ECE = {ece:.1f}")
    return ece


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=100)
    parser.add_argument("--calibration-images", type=int, default=40)
    parser.add_argument("--test-images", type=int, default=80)
    parser.add_argument("--test-world", choices=("demo", "shifted"), default="demo",
                        help="the test scenes' world (the annotated ones are the demo world's)")
    parser.add_argument("--steps", type=int, default=300)
    args = parse_bench_arguments(parser, argv)

    clip = DEMO_CLIPS[args.clip]
    model = clip.model(refine_boundaries=False)
    vocabulary = Vocabulary.from_labels(world.NAMES)
    train = world.test_scenes(args.train_images, seed=777)
    held_out = world.test_scenes(args.calibration_images, seed=778)
    test = (world.test_scenes if args.test_world == "demo" else world.shifted_scenes)(args.test_images)

    settings = Settings()
    zero_shot = report("zero-shot", model.predictor(), vocabulary, {"held-out annotated images": held_out}, test)
    # A fresh predictor: the report left the last fit set on its own, and zero-shot serves the label-free one.
    zero_shot["served_ece"] = served_ece(model.predictor(), vocabulary, settings.region_rules(), test)
    segmenter = model.segmenter()
    with torch.enable_grad():
        finetune(segmenter, model.clip, model.encoder, [Sample(image, labels) for image, labels in train], vocabulary,
                 train_config(settings, steps=args.steps, size=clip.inference_size))
    predictor = model.predictor(segmenter)
    tuned = report(f"fine-tuned on {args.train_images} annotated images", predictor, vocabulary,
                   {"held-out annotated images": held_out, "its training images": train}, test)
    refine, predictor.refine_boundaries = predictor.refine_boundaries, settings.refine_boundaries
    fitted = fit_serving_rules(predictor, [Sample(image, labels) for image, labels in train], vocabulary, settings)
    predictor.refine_boundaries = refine
    rules = settings.region_rules(fitted["min_region_score"], zero_shot=False)
    tuned["served_ece"] = served_ece(predictor, vocabulary, rules, test)
    predictor.confidence_scale = None
    tuned["served_ece_unscaled"] = served_ece(predictor, vocabulary, rules, test,
                                              "as served without its confidence scale")
    default = "TASK_SCORE=product"
    print(f"\ncalibration: clip={args.clip} world={args.test_world} zero_shot_ece={zero_shot['ece']['none']:.1f}->{zero_shot['ece']['held-out annotated images']:.1f} "
          f"tuned_ece={tuned['ece']['none']:.1f}->{tuned['ece']['its training images']:.1f} "
          f"served_ece_zero_shot={zero_shot['served_ece']:.1f} "
          f"served_ece_tuned={tuned['served_ece_unscaled']:.1f}->{tuned['served_ece']:.1f} "
          f"spearman_zero_shot={zero_shot['spearman'][default]:.2f} spearman_tuned={tuned['spearman'][default]:.2f}")


if __name__ == "__main__":
    main()
