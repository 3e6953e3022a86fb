"""Every GPU target in one command, for a session that is lent a device: run it first.

    python -m bench.gpu [--device cuda] [--repeats 10] [--batch 32] [--train-steps 10] [--quick]

On ``--device`` with ``PRECISION=auto`` and random weights (timing does not depend on them):
1. ViT-B-16 at 448: one 1920x1080 ``/predict`` through the HTTP app, median of ``--repeats``
   (target ≤ 60 ms), and ``--batch`` photos through the pre-labeling path (target ≥ 25 images/s);
2. ViT-L-14 at 672: one 1920x1080 ``/predict`` against the bare bf16 image tower at the same shape
   (target ≤ 1.5×);
3. ViT-L-14 fine-tuning, batch 8 at 672, the tower frozen as the training job runs it: steps/s.
Prints a table of target, figure and goal, then one ``gpu:`` line. ``--quick`` runs the same steps on
the CPU with the demo CLIP's architecture at 128 px and a 320x180 photo, so CI checks the harness
itself; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from bench.speed import bare_forward, client_for, measure, photo, predict_call, training_steps_per_second
from demo import world
from demo.train_clip import DEMO_CLIP
from model.build import SegmentationModel
from model.clip import load_clip
from model.config import ModelConfig
from model.predictor import uses_bf16
from model.vocabulary import Vocabulary


def served(name: str, size: int, device: str):
    """(model, HTTP test client) serving CLIP ``name`` with random weights at ``size`` on ``device``."""
    from backend.settings import Settings

    model = SegmentationModel(load_clip(name, "random", device=device),
                              ModelConfig(device=device, inference_size=size, refine_boundaries=False))
    return model, client_for(model, Settings(clip_model=name, clip_pretrained="random", device=device,
                                             inference_size=size, refine_boundaries=False))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="photos in the pre-labeling batch")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="the CPU, a tiny model: checks the harness only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    if args.quick:
        args.device, args.repeats, args.batch, args.train_steps = "cpu", 2, 4, 2
        small, large, (width, height) = (str(DEMO_CLIP.config), 128), (str(DEMO_CLIP.config), 160), (320, 180)
    else:
        small, large, (width, height) = ("ViT-B-16", 448), ("ViT-L-14", 672), (1920, 1080)
    bf16 = uses_bf16("auto", torch.device(args.device))
    picture = photo(width, height)
    vocabulary = Vocabulary.from_labels(world.NAMES[:20])
    started = time.perf_counter()

    _, client = served(*small, args.device)
    predict_ms = measure(predict_call(client, [picture], vocabulary), args.repeats)[0]
    batch_ms = measure(predict_call(client, [picture] * args.batch, vocabulary, http=False), 2)[0]
    images_per_s = args.batch * 1000 / batch_ms
    del client

    model, client = served(*large, args.device)
    large_ms = measure(predict_call(client, [picture], vocabulary), args.repeats)[0]
    shape = model.predictor().inference_shape(height, width)
    bare_ms = measure(bare_forward(large[0], shape, args.device, bf16), args.repeats)[0]
    del client
    steps_per_s = training_steps_per_second(model, large[1], args.train_steps, batch=8 if not args.quick else 2)

    name = {size: Path(clip).stem for clip, size in (small, large)}
    print(f"\n{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}, "
          f"{'bf16' if bf16 else 'fp32'} (PRECISION=auto), a {width}x{height} photo, 20 labels, "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print("| target | figure | goal |\n|---|---|---|")
    print(f"| /predict of one photo, {name[small[1]]} at {small[1]} | {predict_ms:.1f} ms | ≤ 60 ms |")
    print(f"| pre-labeling, batches of {args.batch} photos, {name[small[1]]} | {images_per_s:.1f} images/s | ≥ 25 |")
    print(f"| /predict of one photo, {name[large[1]]} at {large[1]} | {large_ms:.1f} ms | |")
    print(f"| bare {'bf16 ' if bf16 else ''}tower at {shape[0]}x{shape[1]} | {bare_ms:.1f} ms | |")
    print(f"| /predict / bare tower | {large_ms / bare_ms:.2f}× | ≤ 1.5× |")
    print(f"| fine-tuning {name[large[1]]}, batch {8 if not args.quick else 2} | {steps_per_s:.2f} steps/s | |")
    print(f"gpu: device={args.device} bf16={int(bf16)} predict_ms={predict_ms:.1f} images_per_s={images_per_s:.1f} "
          f"large_predict_ms={large_ms:.1f} large_over_bare={large_ms / bare_ms:.2f} train_steps_per_s={steps_per_s:.2f}")


if __name__ == "__main__":
    main()
