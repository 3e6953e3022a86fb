"""Accuracy on the synthetic world: does fine-tuning on base classes keep the novel ones?

    python -m bench.accuracy [--seeds 3] [--steps 300] [--train-images 200] [--test-images 80]

The demo CLIP is the backbone. Training annotations name only the 20 base classes
(novel pixels are unannotated) and the training vocabulary is the base classes, as
in the paper; evaluation uses the whole 30-class vocabulary. Prints mIoU (%) on base
and novel classes and their harmonic mean for zero-shot, plain fine-tuning, each
regulariser alone and both, as mean ± spread over seeds, then one summary line.
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from demo import world
from demo.train_clip import CONFIG, DENSE_METHOD, INFERENCE_SIZE, materialize
from model.clip import load_clip
from model.metrics import ConfusionMatrix
from model.predictor import Predictor
from model.segmenter import build_segmenter
from model.train import Sample, TrainConfig, finetune
from model.vocabulary import TextEncoder, Vocabulary

VARIANTS = {
    "plain fine-tuning": dict(diversify=False, distill=False),
    "+ diversification": dict(diversify=True, distill=False),
    "+ distillation": dict(diversify=False, distill=True),
    "+ both (GKC)": dict(diversify=True, distill=True),
}
BASE = [world.NAMES.index(n) for n in world.BASE]
NOVEL = [world.NAMES.index(n) for n in world.NOVEL]


def base_only_samples(count: int, seed: int) -> list[Sample]:
    """Scenes whose annotations name base classes only, indexed in the base vocabulary."""
    to_base = np.full(256, -1, np.int64)
    to_base[BASE] = np.arange(len(BASE))
    return [Sample(image, to_base[labels]) for image, labels in world.test_scenes(count, seed=seed)]


def evaluate(predictor: Predictor, scenes) -> dict[str, float]:
    confusion = ConfusionMatrix(len(world.NAMES))
    vocabulary = Vocabulary.from_labels(world.NAMES)
    for start in range(0, len(scenes), 16):
        chunk = scenes[start:start + 16]
        for (_, truth), prediction in zip(chunk, predictor.predict([image for image, _ in chunk], vocabulary)):
            confusion.update(truth, prediction.label_map)
    base, novel = confusion.miou(BASE), confusion.miou(NOVEL)
    return {"base": base, "novel": novel, "hmean": 2 * base * novel / (base + novel), "all": confusion.miou()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--test-images", type=int, default=80)
    parser.add_argument("--size", type=int, default=INFERENCE_SIZE)
    parser.add_argument("--unfreeze-blocks", type=int, default=0, help="also fine-tune the last N tower blocks")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    clip = load_clip(str(CONFIG), str(materialize()))
    encoder = TextEncoder(clip)
    test = world.test_scenes(args.test_images)
    train = base_only_samples(args.train_images, seed=777)
    base_vocabulary = Vocabulary.from_labels(world.BASE)

    def predictor_for(segmenter):
        return Predictor(segmenter, encoder, clip.mean, clip.std, inference_size=args.size)

    rows = {"zero-shot": [evaluate(predictor_for(build_segmenter(clip, dense_method=DENSE_METHOD)), test)]}
    for name, switches in VARIANTS.items():
        rows[name] = []
        for seed in range(args.seeds):
            started = time.time()
            segmenter = build_segmenter(clip, seed=seed, dense_method=DENSE_METHOD,
                                        unfreeze_blocks=args.unfreeze_blocks)
            finetune(segmenter, clip, encoder, train, base_vocabulary,
                     TrainConfig(steps=args.steps, size=args.size, seed=seed, lr=args.lr, **switches))
            rows[name].append(evaluate(predictor_for(segmenter), test))
            print(f"  {name}, seed {seed}: {rows[name][-1]} ({time.time() - started:.0f}s)", flush=True)

    tower = f"last {args.unfreeze_blocks} tower blocks trained" if args.unfreeze_blocks else "tower frozen"
    print(f"\nmIoU (%) on {args.test_images} test scenes; fine-tuned {args.steps} steps ({tower}) on "
          f"{args.train_images} base-only images; mean ± std over {args.seeds} seeds\n")
    print(f"| method | base | novel | harmonic mean |\n|---|---|---|---|")
    summary = {}
    for name, results in rows.items():
        cells = []
        for key in ("base", "novel", "hmean"):
            values = np.array([r[key] for r in results])
            summary[(name, key)] = values.mean()
            cells.append(f"{values.mean():.1f}" + (f" ± {values.std():.1f}" if len(values) > 1 else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\naccuracy: zero_shot_novel={summary[('zero-shot', 'novel')]:.1f} "
          f"plain_novel={summary[('plain fine-tuning', 'novel')]:.1f} "
          f"gkc_novel={summary[('+ both (GKC)', 'novel')]:.1f} gkc_base={summary[('+ both (GKC)', 'base')]:.1f} "
          f"zero_shot_base={summary[('zero-shot', 'base')]:.1f}")


if __name__ == "__main__":
    main()
