"""Which tasks should annotators do next? Each pick of a batch, fine-tuned on, on the synthetic world.

    python -m bench.active_learning [--clip NAME] [--pools uniform,long-tailed] [--budgets 10,20,50]
                                    [--rounds 1,2] [--arms random,lowest,stream,acquire] [--random-draws 5]
                                    [--seeds 1]

A pool of scenes (``uniform``: every concept alike; ``long-tailed``: :func:`demo.world.long_tailed_scenes`)
is pre-labeled as served; a budget of tasks is annotated (from ground truth, every label) in 1 or 2
rounds (annotate, train as the backend does, ``TRAIN_PASTE`` included, pre-label again, pick the rest), then the model is
measured on held-out scenes where every concept is alike: mIoU over all labels, mIoU of the rarest
third of the pool's labels, and the labels the picked tasks cover. Arms:

* ``random``: a random page (``--random-draws`` draws, one round);
* ``lowest``: the lowest task scores (the "Prediction score" column, sorted ascending);
* ``stream``: the backend's order, the *Annotate next* tab (``prelabel --annotate-next``): Label Studio's
  uncertainty-sampling rule over our clusters (the least-solved cluster, then the lowest stream score,
  :func:`model.task_scores.stream_score`: ``projects/functions/next_task.py``);
* ``typical`` / ``uncertain``: :func:`model.acquisition.acquire` always typical-first / never;
* ``acquire``: :func:`model.acquisition.acquire` with its switch from typical-first (``--typical-below``);
* ``oracle``: the ground truth's labels, covered greedily with the rarity weight of
  :func:`model.acquisition.label_rarity` (no backend can pick so: a bound on what covering labels gives).
* ``rare-oracle``: the same, the pool's rarest third of the labels first (what picking for the rarest third can
  give at most).
* ``herding`` / ``herding-doubt``: MaxHerding (Bae et al., ECCV 2024), :func:`max_herding` over the served
  features; ``herding-doubt`` weighs each task's coverage gain by its doubt, one minus its stream score.
* ``probcover``: ProbCover (Yehuda et al., NeurIPS 2022), :func:`prob_cover` over the served features.

The clustered arms run once per k-means seed (``--seeds``); a row gives their mean and spread, as random's
draws do.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

import numpy as np
import torch

from backend.settings import Settings
from backend.training import fit_served_confidence, restrict_to_annotated, train_config
from demo import world
from demo.train_clip import DEMO_CLIPS, add_clip_argument
from model.acquisition import (
    Pool,
    TaskView,
    acquire,
    cluster_tasks,
    kmeans,
    label_rarity,
    label_stream,
    pairwise_distances,
    unit_rows,
)
from model.calibration import calibrate
from model.evaluation import ConfusionMatrix
from model.predictor import Predictor
from model.task_scores import task_score
from model.train import Sample, finetune
from model.vocabulary import Vocabulary

POOLS = {"uniform": lambda count: world.test_scenes(count, seed=2024), "long-tailed": world.long_tailed_scenes}
ARMS = ("random", "lowest", "stream", "typical", "uncertain", "acquire", "oracle", "rare-oracle", "herding",
        "herding-doubt", "probcover")
UNSEEDED = ("lowest", "oracle", "rare-oracle", "herding", "herding-doubt")  # no clusters, so one run each
PURITY = 0.95  # ProbCover's ball radius: the largest whose balls stay this pure (the paper's value)


class Loop:
    """One CLIP and pool: pre-label, pick, annotate from ground truth, fine-tune, measure."""

    def __init__(self, clip: str, scenes: list, test: list, steps: int, features: str = "labels"):
        self.clip = DEMO_CLIPS[clip]
        self.model = self.clip.model(refine_boundaries=Settings().refine_boundaries)
        self.scenes, self.test, self.steps = scenes, test, steps
        self.vocabulary = Vocabulary.from_labels(world.NAMES)
        self.rules, self.tuned_rules = Settings().region_rules(), Settings().region_rules(zero_shot=False)
        shows = np.array([[c in np.unique(labels) for c in range(len(world.NAMES))] for _, labels in scenes])
        self.shows = shows  # (N, C) the ground truth's labels per task
        self.rare = [int(c) for c in np.argsort(shows.sum(0), kind="stable")[:len(world.NAMES) // 3]]
        # "labels": the pass's image-level label probabilities, as served; "embedding": the CLIP's image embedding.
        self.features = self._embeddings() if features == "embedding" else None
        self.log_features = features == "log-labels"
        self.zero_shot = self.model.predictor()

    def _embeddings(self) -> np.ndarray:
        """(N, D) the frozen CLIP's global image embedding, from the tower pass the predictor makes."""
        predictor, out = self.model.predictor(), []
        with torch.no_grad():
            for image, _ in self.scenes:
                tensor = predictor._to_tensor(image, predictor.inference_shape(*image.shape[:2]))
                out.append(predictor.segmenter._embed(tensor[None])[2][0].float().numpy())
        return np.stack(out)

    def trained_on(self, indices: list[int]) -> Predictor:
        samples = [Sample(*self.scenes[i]) for i in indices]
        segmenter = self.model.segmenter()
        finetune(segmenter, self.model.clip, self.model.encoder, *restrict_to_annotated(samples, self.vocabulary),
                 train_config(Settings(), steps=self.steps, size=self.clip.inference_size))
        predictor = self.model.predictor(segmenter)
        # As training jobs do: in the whole vocabulary (their region rule is left out: min_score 0 here).
        calibrate(predictor, [s.image for s in samples], [s.labels for s in samples], self.vocabulary)
        fit_served_confidence(predictor, samples, self.vocabulary, Settings())
        return predictor

    def pool(self, predictor: Predictor, chosen: list[int]) -> tuple[Pool, np.ndarray]:
        """What the acquisition knows after ``predictor`` pre-labeled every task (as the backend does), and the
        task scores."""
        images = [image for image, _ in self.scenes]
        passes = predictor.calibrated(images, self.vocabulary)
        rules = self.rules if predictor is self.zero_shot else self.tuned_rules
        predictions = predictor.semantic(images, passes, rules, self.vocabulary)
        views = [TaskView.of(p, calibrated.prior.numpy()) for p, calibrated in zip(predictions, passes, strict=True)]
        pool = Pool.of(views, np.isin(np.arange(len(self.scenes)), chosen))
        if self.features is not None:
            pool = dataclasses.replace(pool, features=self.features)
        elif self.log_features:
            log = np.log(np.maximum(pool.features, 1e-30))
            pool = dataclasses.replace(pool, features=log - log.mean(1, keepdims=True))
        return pool, np.array([task_score(p, Settings().task_score) for p in predictions])

    def pick(self, arm: str, predictor: Predictor, chosen: list[int], count: int, typical_below: int,
             seed: int = 0) -> list[int]:
        pool, scores = self.pool(predictor, chosen)
        counts = self.shows[chosen].sum(0) if chosen else np.zeros(len(world.NAMES))
        if arm == "lowest":
            return [int(i) for i in np.argsort(scores) if i not in chosen][:count]
        if arm in ("oracle", "rare-oracle"):
            return self.covering(chosen, count, rare_first=arm == "rare-oracle")
        if arm in ("herding", "herding-doubt"):
            return max_herding(pool.features, pool.annotated, count,
                               1 - pool.stream_scores if arm == "herding-doubt" else None)
        if arm == "probcover":
            return prob_cover(pool.features, pool.annotated, count, seed)
        below = {"typical": 10 ** 9, "uncertain": 0}.get(arm, typical_below)
        if arm == "stream":
            return label_stream(cluster_tasks(pool, count, seed), pool.stream_scores, pool.annotated, count)
        return acquire(pool, count, counts, below, seed).order[:count]

    def covering(self, chosen: list[int], count: int, rare_first: bool = False) -> list[int]:
        """``count`` tasks, each showing the most of the labels the picks so far show least (ground truth);
        ``rare_first``: a label of the pool's rarest third outweighs any number of the others."""
        counts, picked = self.shows[chosen].sum(0).astype(float), []
        boost = np.ones(len(world.NAMES))
        if rare_first:
            boost[self.rare] = 1 + 100 * len(world.NAMES)
        for _ in range(count):
            gain = self.shows @ (label_rarity(counts) * boost)
            gain[chosen + picked] = -1
            picked.append(int(gain.argmax()))
            counts += self.shows[picked[-1]]
        return picked

    def run(self, arm: str, budget: int, rounds: int, typical_below: int, draw: int = 0) -> dict:
        """One pick of ``budget`` tasks trained on and measured; ``draw`` seeds random's page or the clusters."""
        chosen, predictor = [], self.zero_shot
        if arm == "random":
            chosen = [int(i) for i in np.random.default_rng(draw).choice(len(self.scenes), budget, replace=False)]
            predictor = self.trained_on(chosen)
        else:
            for round_ in range(rounds):
                count = budget * (round_ + 1) // rounds - len(chosen)
                chosen += self.pick(arm, predictor, chosen, count, typical_below, draw)
                predictor = self.trained_on(chosen)
        return {**self.measure(predictor), "covered": int(self.shows[chosen].any(0).sum())}

    def measure(self, predictor: Predictor) -> dict:
        confusion = ConfusionMatrix(len(world.NAMES))
        for start in range(0, len(self.test), 16):
            chunk = self.test[start:start + 16]
            for (_, truth), p in zip(chunk, predictor.predict([i for i, _ in chunk], self.vocabulary), strict=True):
                confusion.update(truth, p.label_map)
        return {"miou": confusion.miou(), "rare": confusion.miou(self.rare)}


def max_herding(features: np.ndarray, annotated: np.ndarray, count: int, weights: np.ndarray | None = None) -> list[int]:
    """``count`` tasks, each the one that most raises the pool's kernel coverage ``sum_i max_s k(x_i, x_s)`` over the
    tasks annotated and picked (features (N, D), L2-normalised; a Gaussian kernel whose bandwidth is the median
    distance between tasks, so no constant), its gain times its ``weights`` (N,) if given."""
    distance = pairwise_distances(unit_rows(features))
    bandwidth = np.median(distance[np.triu_indices(len(distance), 1)])
    kernel = np.exp(-distance ** 2 / (2 * max(bandwidth, 1e-12) ** 2))
    taken = np.asarray(annotated, bool).copy()
    cover = kernel[:, taken].max(1) if taken.any() else np.zeros(len(kernel))
    picked = []
    for _ in range(min(count, int((~taken).sum()))):
        gain = np.maximum(kernel - cover[:, None], 0).sum(0) * (1 if weights is None else weights)
        gain[taken] = -np.inf
        picked.append(int(gain.argmax()))
        taken[picked[-1]] = True
        cover = np.maximum(cover, kernel[:, picked[-1]])
    return picked


def prob_cover(features: np.ndarray, annotated: np.ndarray, count: int, seed: int = 0) -> list[int]:
    """``count`` tasks, each the one whose ball of radius delta holds the most tasks no ball of a task annotated or
    picked holds yet (the most of them if every task is covered). delta is the largest radius whose balls hold only
    tasks of their centre's k-means cluster (as many clusters as labels) for :data:`PURITY` of the tasks."""
    x = unit_rows(features)
    distance = pairwise_distances(x)
    clusters = kmeans(x, x.shape[1], seed)
    # A ball is pure while its radius is under the distance to the nearest task of another cluster.
    pure_up_to = np.where(clusters[:, None] != clusters[None], distance, np.inf).min(1)
    ball = distance <= np.quantile(pure_up_to, 1 - PURITY)  # ball[i, j]: task j lies in task i's ball
    taken = np.asarray(annotated, bool).copy()
    covered = ball[taken].any(0)
    picked = []
    for _ in range(min(count, int((~taken).sum()))):
        gain = (ball & ~covered).sum(1) if not covered.all() else ball.sum(1)
        gain = np.where(taken, -1, gain)
        picked.append(int(gain.argmax()))
        taken[picked[-1]] = True
        covered |= ball[picked[-1]]
    return picked


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.active_learning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", default="uniform,long-tailed")
    parser.add_argument("--pool-size", type=int, default=200)
    parser.add_argument("--budgets", default="10,20,50")
    parser.add_argument("--rounds", default="1,2", help="annotate, train, re-predict this many times")
    parser.add_argument("--arms", default="random,lowest,stream,acquire")
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1, help="k-means seeds of each clustered arm")
    parser.add_argument("--typical-below", type=int, default=30,
                        help="acquire: typical-first while fewer tasks than this are annotated")
    parser.add_argument("--test-images", type=int, default=60)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--features", choices=("labels", "log-labels", "embedding"), default="labels",
                        help="what tasks are clustered on: the image-level label probabilities (served) or the "
                             "CLIP's image embedding")
    parser.add_argument("--json", help="write every result here")
    add_clip_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    test, results = world.test_scenes(args.test_images), []
    for pool_name in args.pools.split(","):
        loop = Loop(args.clip, POOLS[pool_name](args.pool_size), test, args.steps, args.features)
        zero = loop.measure(loop.zero_shot)
        print(f"\n{pool_name} pool, {args.clip}: zero-shot mIoU {zero['miou']:.1f}, rarest third {zero['rare']:.1f}")
        for budget in map(int, args.budgets.split(",")):
            for arm in args.arms.split(","):
                for rounds in ([1] if arm == "random" else map(int, args.rounds.split(","))):
                    draws = range(args.random_draws if arm == "random" else 1 if arm in UNSEEDED else args.seeds)
                    started = time.time()
                    runs = [loop.run(arm, budget, rounds, args.typical_below, draw) for draw in draws]
                    row = {"clip": args.clip, "pool": pool_name, "budget": budget, "arm": arm, "rounds": rounds,
                           **{k: float(np.mean([r[k] for r in runs])) for k in ("miou", "rare", "covered")},
                           "miou_std": float(np.std([r["miou"] for r in runs])), "runs": runs}
                    results.append(row)
                    spread = f"±{row['miou_std']:.1f}" if len(runs) > 1 else ""
                    print(f"{pool_name:11s} {budget:3d} {arm:9s} {rounds} round(s): mIoU {row['miou']:5.1f}"
                          f"{spread:6s} rarest third {row['rare']:5.1f}"
                          f"  labels {row['covered']:4.1f}  ({time.time() - started:.0f}s)", flush=True)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
