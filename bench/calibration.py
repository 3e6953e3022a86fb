"""Are the scores trustworthy? Calibration and task ranking on the synthetic world.

    python -m bench.calibration [--train-images 100] [--calibration-images 40] [--test-images 80]

For the zero-shot model and for one fine-tuned on ``--train-images`` fully annotated scenes,
prints the pixel expected calibration error (ECE, %) on the test scenes before and after
temperature scaling (T fitted on held-out annotated images, and for the fine-tuned model on
its own training images, as the backend's training job does), and the Spearman correlation
between each task score the backend offers and the task's own mIoU.
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from scipy.stats import spearmanr

from backend.settings import Settings
from backend.training import train_config
from demo import world
from demo.train_clip import DEMO_CLIPS, add_clip_argument
from model import presence
from model.calibration import calibrate, expected_calibration_error
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=100)
    parser.add_argument("--calibration-images", type=int, default=40)
    parser.add_argument("--test-images", type=int, default=80)
    parser.add_argument("--steps", type=int, default=300)
    add_clip_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)

    clip = DEMO_CLIPS[args.clip]
    model = clip.model(refine_boundaries=False)
    vocabulary = Vocabulary.from_labels(world.NAMES)
    train = world.test_scenes(args.train_images, seed=777)
    held_out = world.test_scenes(args.calibration_images, seed=778)
    test = world.test_scenes(args.test_images)

    zero_shot = report("zero-shot", model.predictor(), vocabulary,
                       {"held-out annotated images": held_out}, test)
    segmenter = model.segmenter()
    with torch.enable_grad():
        finetune(segmenter, model.clip, model.encoder, [Sample(image, labels) for image, labels in train], vocabulary,
                 train_config(Settings(), steps=args.steps, size=clip.inference_size))
    tuned = report(f"fine-tuned on {args.train_images} annotated images", model.predictor(segmenter), vocabulary,
                   {"held-out annotated images": held_out, "its training images": train}, test)
    default = "TASK_SCORE=product"
    print(f"\ncalibration: clip={args.clip} zero_shot_ece={zero_shot['ece']['none']:.1f}->{zero_shot['ece']['held-out annotated images']:.1f} "
          f"tuned_ece={tuned['ece']['none']:.1f}->{tuned['ece']['its training images']:.1f} "
          f"spearman_zero_shot={zero_shot['spearman'][default]:.2f} spearman_tuned={tuned['spearman'][default]:.2f}")


if __name__ == "__main__":
    main()
