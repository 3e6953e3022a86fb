"""Accuracy on the synthetic world: does fine-tuning on base classes keep the novel ones?

    python -m bench.accuracy [--seeds 3] [--steps 300] [--train-images 200] [--absent-images 100,200,400]

The demo CLIP is the backbone; evaluation uses the whole 30-class vocabulary on 80 test
scenes. Two scenarios:

* **unannotated** (the paper's): training scenes show every class, annotations name the 20
  base classes only, so novel objects sit in the unannotated parts of the images;
* **absent** (what a project meets when the corrected images never show some labels):
  training scenes are drawn from the base classes only and annotated completely, so nothing
  in training shows the novel classes. Run with 100, 200 and 400 corrected images.

Each trained model is evaluated three times: with the inference ensemble of the fine-tuned and
frozen classifiers (:class:`model.segmenter.Segmenter`) off and on (the ensemble costs no
training), and as a training job serves it, its temperature and presence weight fitted on the same
annotations (:func:`model.calibration.calibrate`). Prints mIoU (%) on base and novel classes and their harmonic mean as mean ± spread
over seeds, then one summary line.
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from backend.settings import Settings
from backend.training import restrict_to_annotated, train_config
from demo import world
from demo.train_clip import DEMO_CLIPS, add_clip_argument
from model.calibration import calibrate
from model.evaluation import ConfusionMatrix
from model.predictor import Predictor
from model.train import Sample, finetune
from model.vocabulary import Vocabulary

VARIANTS = {
    "plain fine-tuning": dict(diversify=False, distill=False),
    "+ diversification": dict(diversify=True, distill=False),
    "+ distillation": dict(diversify=False, distill=True),
    "+ both (GKC)": dict(diversify=True, distill=True),
}
VOCABULARY = Vocabulary.from_labels(world.NAMES)
BASE = [world.NAMES.index(n) for n in world.BASE]
NOVEL = [world.NAMES.index(n) for n in world.NOVEL]
ENSEMBLE = " + ensemble"
CALIBRATED = ", calibrated (as served)"


def base_only_samples(count: int, seed: int, absent: bool = False) -> list[Sample]:
    """Scenes whose annotations name base classes only, indexed in the whole vocabulary (as a project's are).

    ``absent``: the scenes themselves show base classes only (every pixel annotated).
    """
    base_only = np.full(256, -1, np.int64)
    base_only[BASE] = BASE
    scenes = world.test_scenes(count, seed=seed, classes=BASE if absent else None)
    return [Sample(image, base_only[labels]) for image, labels in scenes]


def evaluate(predictor: Predictor, scenes) -> dict[str, float]:
    confusion = ConfusionMatrix(len(world.NAMES))
    for start in range(0, len(scenes), 16):
        chunk = scenes[start:start + 16]
        for (_, truth), prediction in zip(chunk, predictor.predict([image for image, _ in chunk], VOCABULARY), strict=True):
            confusion.update(truth, prediction.label_map)
    base, novel = confusion.miou(BASE), confusion.miou(NOVEL)
    return {"base": base, "novel": novel, "hmean": 2 * base * novel / (base + novel), "all": confusion.miou()}


class Runner:
    """Trains and evaluates variants on one backbone; every result is kept by (scenario, row)."""

    def __init__(self, args):
        self.args = args
        clip = DEMO_CLIPS[args.clip]
        self.model = clip.model(inference_size=args.size or clip.inference_size, refine_boundaries=False)
        args.size = self.model.config.inference_size
        self.test = world.test_scenes(args.test_images)
        self.rows: dict[tuple[str, str], list[dict]] = {}

    def zero_shot(self) -> dict:
        return evaluate(self.model.predictor(), self.test)

    def train(self, scenario: str, name: str, samples: list[Sample], seed: int) -> None:
        """One fine-tuning run, evaluated without and with the ensemble."""
        started = time.time()
        segmenter = self.model.segmenter(seed=seed, unfreeze_blocks=self.args.unfreeze_blocks)
        trained_samples, trained = restrict_to_annotated(samples, VOCABULARY)
        finetune(segmenter, self.model.clip, self.model.encoder, trained_samples, trained,
                 train_config(Settings(), steps=self.args.steps, size=self.args.size, seed=seed, lr=self.args.lr,
                              **VARIANTS[name]))
        with_ensemble = evaluate(self.model.predictor(segmenter), self.test)
        # As a training job serves it: temperature and presence weight fitted on the same annotations, in the
        # vocabulary it serves (the rule it fits is left out: these figures are unpruned).
        predictor = self.model.predictor(segmenter, temperature=1.0)
        calibrate(predictor, [s.image for s in samples], [s.labels for s in samples], VOCABULARY)
        served = evaluate(predictor, self.test)
        segmenter.seen_weight = segmenter.unseen_weight = 0.0  # the fine-tuned classifier alone
        alone = evaluate(self.model.predictor(segmenter), self.test)
        self.rows.setdefault((scenario, name), []).append(alone)
        self.rows.setdefault((scenario, name + ENSEMBLE), []).append(with_ensemble)
        self.rows.setdefault((scenario, name + ENSEMBLE + CALIBRATED), []).append(served)
        print(f"  {scenario}, {name}, seed {seed}: alone {_short(alone)}, ensemble {_short(with_ensemble)}, "
              f"calibrated {_short(served)} ({time.time() - started:.0f}s)", flush=True)

    def table(self, scenario: str, title: str, zero_shot: dict) -> None:
        print(f"\n{title}\n\n| method | base | novel | harmonic mean |\n|---|---|---|---|")
        print("| zero-shot | " + " | ".join(f"{zero_shot[k]:.1f}" for k in ("base", "novel", "hmean")) + " |")
        for (row_scenario, name), results in self.rows.items():
            if row_scenario == scenario:
                print(f"| {name} | " + " | ".join(_cell([r[k] for r in results]) for k in ("base", "novel", "hmean"))
                      + " |")

    def mean(self, scenario: str, name: str, key: str) -> float:
        return float(np.mean([r[key] for r in self.rows[(scenario, name)]]))


def _short(result: dict) -> str:
    return f"base {result['base']:.1f} novel {result['novel']:.1f}"


def _cell(values: list[float]) -> str:
    values = np.asarray(values)
    return f"{values.mean():.1f}" + (f" ± {values.std():.1f}" if len(values) > 1 else "")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--absent-images", default="100,200,400", help="corrected images in the absent scenario")
    parser.add_argument("--ablation-images", type=int, default=200,
                        help="the absent-scenario size at which every variant runs (the others: plain and GKC)")
    parser.add_argument("--test-images", type=int, default=80)
    parser.add_argument("--size", type=int, default=0, help="the inference size (default: the CLIP's)")
    parser.add_argument("--absent-only", action="store_true", help="only the absent scenario")
    add_clip_argument(parser)
    parser.add_argument("--unfreeze-blocks", type=int, default=0, help="also fine-tune the last N tower blocks")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    runner = Runner(args)
    zero_shot = runner.zero_shot()
    unannotated = base_only_samples(args.train_images, seed=777)
    sizes = [int(n) for n in args.absent_images.split(",") if n]
    for seed in range(args.seeds):
        for name in () if args.absent_only else VARIANTS:
            runner.train("unannotated", name, unannotated, seed)
        for count in sizes:
            absent = base_only_samples(count, seed=777 + seed, absent=True)
            names = VARIANTS if count == args.ablation_images else ("plain fine-tuning", "+ both (GKC)")
            for name in names:
                runner.train(f"absent-{count}", name, absent, seed)

    tower = f"last {args.unfreeze_blocks} tower blocks trained" if args.unfreeze_blocks else "tower frozen"
    setting = f"{args.steps} steps ({tower}), mean ± std over {args.seeds} seeds, {args.test_images} test scenes"
    if not args.absent_only:
        runner.table("unannotated", f"mIoU (%), unannotated scenario: {args.train_images} images showing every "
                                    f"class, base classes annotated; {setting}", zero_shot)
    for count in sizes:
        runner.table(f"absent-{count}", f"mIoU (%), absent scenario: {count} images showing base classes only, "
                                        f"fully annotated; {setting}", zero_shot)
    gkc, plain = "+ both (GKC)", "plain fine-tuning"
    absent = f"absent-{sizes[-1]}"
    fields = [] if args.absent_only else [
        f"zero_shot_novel={zero_shot['novel']:.1f}", f"plain_novel={runner.mean('unannotated', plain, 'novel'):.1f}",
        f"gkc_novel={runner.mean('unannotated', gkc + ENSEMBLE, 'novel'):.1f}",
        f"gkc_base={runner.mean('unannotated', gkc + ENSEMBLE, 'base'):.1f}"]
    fields += [f"clip={args.clip}", f"zero_shot_base={zero_shot['base']:.1f}",
              f"absent_zero_shot_novel={zero_shot['novel']:.1f}",
              f"absent_plain_novel={runner.mean(absent, plain, 'novel'):.1f}",
              f"absent_gkc_novel={runner.mean(absent, gkc + ENSEMBLE, 'novel'):.1f}",
              f"absent_gkc_base={runner.mean(absent, gkc + ENSEMBLE, 'base'):.1f}",
              f"absent_served_novel={runner.mean(absent, gkc + ENSEMBLE + CALIBRATED, 'novel'):.1f}",
              f"absent_served_base={runner.mean(absent, gkc + ENSEMBLE + CALIBRATED, 'base'):.1f}"]
    fields += [f"absent{count}_gkc_novel={runner.mean(f'absent-{count}', gkc + ENSEMBLE, 'novel'):.1f}"
               for count in sizes]
    print("\naccuracy: " + " ".join(fields))


if __name__ == "__main__":
    main()
