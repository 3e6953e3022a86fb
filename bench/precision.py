"""bfloat16 and OpenVINO against float32 torch on a demo CLIP: what ``PRECISION=auto`` and ``RUNTIME=auto``
change on a CPU with AMX or AVX512-BF16 that runs bfloat16 faster (``auto`` measures whether it does:
:func:`model.predictor.cpu_bf16_speedup`).

    python -m bench.precision [--clip demo-clip] [--test-images 80] [--train-images 100] [--steps 300]

For each setting (fp32 torch, bf16 torch, bf16 OpenVINO where installed), the zero-shot model and one
fine-tuned (in that precision and runtime, as the training job does: the frozen tower in the runtime, the rest
in torch) on ``--train-images`` annotated scenes, both served as the backend serves them (label-free
temperature zero-shot; temperature and presence weight fitted on the training images after
fine-tuning): mIoU, pixel ECE (%), Spearman(task score, task mIoU) on ``--test-images`` held-out
scenes, ms per image of the forward pass, and training steps/s. The last line holds the deltas.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from bench.calibration import task_miou
from demo import world
from demo.train_clip import DEMO_CLIPS, parse_bench_arguments
from model.calibration import calibrate, expected_calibration_error
from model.config import openvino_installed
from model.evaluation import ConfusionMatrix
from model.task_scores import task_score
from model.train import Sample, TrainConfig, finetune
from model.vocabulary import Vocabulary

REFERENCE = ("fp32", "torch")


def quality(predictor, vocabulary: Vocabulary, test) -> dict[str, float]:
    """mIoU, pixel ECE and the task-score ranking of ``predictor``'s served predictions on ``test``."""
    images, truths = [image for image, _ in test], [truth for _, truth in test]
    predictor.logits(images[:2], vocabulary)  # warm-up: the text embeddings, the first pass's allocations
    started = time.perf_counter()
    logits = predictor.logits(images, vocabulary)
    forward_ms = (time.perf_counter() - started) * 1000 / len(images)
    predictions = predictor.semantic(images, logits)
    confusion = ConfusionMatrix(len(world.NAMES))
    for truth, prediction in zip(truths, predictions, strict=True):
        confusion.update(truth, prediction.label_map)
    ece = expected_calibration_error(np.concatenate([p.confidence.ravel() for p in predictions]),
                                     np.concatenate([(p.label_map == t).ravel()
                                                     for p, t in zip(predictions, truths, strict=True)]))
    rho = spearmanr([task_score(p, "product") for p in predictions],
                    [task_miou(t, p.label_map) for p, t in zip(predictions, truths, strict=True)]).statistic
    return {"miou": confusion.miou(), "ece": ece, "spearman": float(rho), "forward_ms": forward_ms}


def fine_tuned(clip, precision: str, runtime: str, train, vocabulary: Vocabulary, steps: int):
    """A model fine-tuned on ``train`` in ``precision`` and calibrated on it, served under ``runtime`` as a training
    job serves it; and its training steps per second (the steps after the first)."""
    model = clip.model(refine_boundaries=False, precision=precision, runtime=runtime)
    segmenter, stamps = model.segmenter(), []
    with torch.enable_grad():
        finetune(segmenter, model.clip, model.encoder, [Sample(image, labels) for image, labels in train], vocabulary,
                 TrainConfig(steps=steps, size=clip.inference_size, precision=precision),
                 progress=lambda step, _: stamps.append(time.perf_counter()))
    predictor = model.predictor(segmenter)
    calibrate(predictor, [image for image, _ in train], [labels for _, labels in train], vocabulary)
    return predictor, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-images", type=int, default=80)
    parser.add_argument("--train-images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    args = parse_bench_arguments(parser, argv)
    clip, vocabulary = DEMO_CLIPS[args.clip], Vocabulary.from_labels(world.NAMES)
    test, train = world.test_scenes(args.test_images), world.test_scenes(args.train_images, seed=777)
    settings = [REFERENCE, ("bf16", "torch")] + ([("bf16", "openvino")] if openvino_installed() else [])
    rows = {}
    for precision, runtime in settings:
        zero_shot = clip.model(refine_boundaries=False, precision=precision, runtime=runtime).predictor()
        rows["zero-shot", precision, runtime] = quality(zero_shot, vocabulary, test)
        predictor, steps_per_s = fine_tuned(clip, precision, runtime, train, vocabulary, args.steps)
        rows["fine-tuned", precision, runtime] = {**quality(predictor, vocabulary, test), "steps_per_s": steps_per_s}
    print(f"\n{args.clip}, {len(test)} test scenes, fine-tuned on {len(train)} ({args.steps} steps), "
          f"{torch.get_num_threads()} threads\n")
    print("| model | precision | runtime | mIoU | ECE (%) | Spearman | forward ms / image | training steps/s |\n"
          "|---|---|---|---|---|---|---|---|")
    for (model, precision, runtime), row in rows.items():
        steps = f"{row['steps_per_s']:.2f}" if "steps_per_s" in row else "–"
        print(f"| {model} | {precision} | {runtime} | {row['miou']:.2f} | {row['ece']:.2f} | {row['spearman']:+.3f} | "
              f"{row['forward_ms']:.1f} | {steps} |")
    deltas = " ".join(f"{model}_{'_'.join(setting)}_{key}_delta={rows[(model, *setting)][key] - rows[(model, *REFERENCE)][key]:+.2f}"
                      for setting in settings[1:] for model in ("zero-shot", "fine-tuned")
                      for key in ("miou", "ece", "spearman"))
    speedups = " ".join(f"training_speedup_{'_'.join(setting)}="
                        f"{rows[('fine-tuned', *setting)]['steps_per_s'] / rows[('fine-tuned', *REFERENCE)]['steps_per_s']:.2f}"
                        for setting in settings[1:])
    print(f"precision: clip={args.clip} {deltas} {speedups}")


if __name__ == "__main__":
    main()
