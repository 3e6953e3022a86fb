"""Does the task score pick the images worth annotating? Lowest-scoring vs random, on the synthetic world.

    python -m bench.active_learning [--pool 200] [--annotate 20] [--random-draws 3] [--steps 300]

The zero-shot model pre-labels a pool of scenes; ``--annotate`` of them are annotated (from
ground truth, every class) either at random or by lowest task score in ``--rounds`` rounds
(annotate the lowest-scoring share, train, pre-label again with the new model, repeat); the
backend's training recipe fine-tunes on them; mIoU over all classes is measured on held-out
scenes. Same training seed for every model; the random arm is drawn ``--random-draws`` times.
"""
from __future__ import annotations

import argparse
import logging

import numpy as np

from backend.settings import Settings
from backend.training import restrict_to_annotated
from bench.accuracy import evaluate
from demo import world
from demo.train_clip import DEMO_CLIPS, add_clip_argument
from model.calibration import calibrate
from model.predictor import Predictor
from model.task_scores import TASK_SCORES, task_score
from model.train import Sample, TrainConfig, finetune
from model.vocabulary import Vocabulary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.active_learning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=200)
    parser.add_argument("--annotate", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="annotate, train, re-predict this many times")
    parser.add_argument("--score", choices=TASK_SCORES, default=Settings().task_score, help="the task score to rank by")
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--test-images", type=int, default=60)
    parser.add_argument("--steps", type=int, default=300)
    add_clip_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    # At the label-free temperature until calibrated; pre-labels pruned and refined as served.
    served = Settings()
    clip = DEMO_CLIPS[args.clip]
    model = clip.model(refine_boundaries=served.refine_boundaries)
    vocabulary = Vocabulary.from_labels(world.NAMES)
    pool, test = world.test_scenes(args.pool, seed=2024), world.test_scenes(args.test_images)

    zero_shot = model.predictor()

    def trained_on(indices) -> Predictor:
        samples, classes = restrict_to_annotated([Sample(*pool[i]) for i in indices], vocabulary)
        segmenter = model.segmenter()
        finetune(segmenter, model.clip, model.encoder, samples, classes, TrainConfig(steps=args.steps, size=clip.inference_size))
        predictor = model.predictor(segmenter)
        calibrate(predictor, [s.image for s in samples], [s.labels for s in samples], classes)  # as training jobs do
        return predictor

    print(f"zero-shot: mIoU {evaluate(zero_shot, test)['all']:.1f} on {args.test_images} held-out scenes")
    chosen, predictor = [], zero_shot
    for round_ in range(args.rounds):
        count = args.annotate * (round_ + 1) // args.rounds - len(chosen)
        scores = [task_score(p, args.score)
                  for p in predictor.predict([i for i, _ in pool], vocabulary, served.region_rules())]
        chosen += [int(i) for i in np.argsort(scores) if i not in chosen][:count]
        predictor = trained_on(chosen)
    lowest = evaluate(predictor, test)["all"]
    covered = len({int(c) for i in chosen for c in np.unique(pool[i][1])})
    print(f"{args.annotate} lowest-scoring by {args.score}, {args.rounds} round(s): mIoU {lowest:.1f} "
          f"({covered} of {len(world.NAMES)} classes annotated)", flush=True)
    draws = []
    for draw in range(args.random_draws):
        picked = np.random.default_rng(draw).choice(args.pool, args.annotate, replace=False)
        draws.append(evaluate(trained_on(picked), test)["all"])
        print(f"{args.annotate} random (draw {draw}): mIoU {draws[-1]:.1f}", flush=True)
    random = f"{np.mean(draws):.1f}±{np.std(draws):.1f}" if draws else "-"
    print(f"\nactive_learning: lowest={lowest:.1f} random={random}")


if __name__ == "__main__":
    main()
