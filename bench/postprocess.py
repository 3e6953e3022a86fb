"""Our post-processing against the full computation it replaces.

    python -m bench.postprocess [--scenes 60]

(1) On demo-world scenes (at 128 px, at 512 px, and at 512 px with an 847-label vocabulary):
    argmax agreement and mIoU of ``model.upsample`` (top-k labels per tile) against every
    label upsampled at full size, then the softmax.
(2) On a 1920x1080 photo (a demo scene scaled up; the inference size 448): both paths' time
    for 20 and 847 labels, their agreement and the mean confidence difference.
bfloat16 against float32 is ``bench.precision``'s.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from demo import world
from demo.train_clip import CONFIG, DENSE_METHOD, INFERENCE_SIZE, materialize
from model.build import SegmentationModel
from model.clip import load_clip
from model.config import ModelConfig
from model.evaluation import ConfusionMatrix
from model.predictor import Predictor
from model.vocabulary import Vocabulary


def full_softmax(logits: torch.Tensor, height: int, width: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """What post-processing computed before: every label upsampled at full size, then the softmax."""
    probability, label = (F.interpolate(logits[None], size=(height, width), mode="bilinear")[0]
                          / temperature).softmax(0).max(0)
    return label.numpy(), probability.numpy()


def big_vocabulary(size: int = 847) -> list[str]:
    """The demo world's labels topped up with WordNet nouns to ``size`` (ADE20K-full has 847)."""
    from model.wordnet import wordnet

    nouns = [s.lemma_names()[0].replace("_", " ") for s in list(wordnet().all_synsets("n"))[::90]]
    return list(dict.fromkeys(world.NAMES + nouns))[:size]


def demo_world(model: SegmentationModel, count: int) -> dict[str, tuple[float, float, float]]:
    """Per setting: (agreement, mIoU of the full computation, mIoU of ours)."""
    predictor, scenes, out = model.predictor(), world.test_scenes(count, seed=777), {}
    for name, labels, side in (("30 labels, 128 px", world.NAMES, 128), ("30 labels, 512 px", world.NAMES, 512),
                               ("847 labels, 512 px", big_vocabulary(), 512)):
        vocabulary = Vocabulary.from_labels(labels)
        full, ours, agree, pixels = ConfusionMatrix(len(world.NAMES)), ConfusionMatrix(len(world.NAMES)), 0, 0
        for image, truth in scenes:
            if side != image.shape[0]:
                image = np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))
                truth = np.asarray(Image.fromarray(truth).resize((side, side), Image.NEAREST))
            logits = predictor.logits([image], vocabulary)[0]
            reference, _ = full_softmax(logits, side, side, 1.0)  # the logits are calibrated already
            label_map = Predictor.to_semantic(logits, side, side).label_map
            full.update(truth, reference)
            ours.update(truth, label_map)
            agree, pixels = agree + int((label_map == reference).sum()), pixels + label_map.size
        out[name] = (agree / pixels, full.miou(), ours.miou())
    return out


def photo(clip) -> dict[int, tuple[float, float, float, float]]:
    """Per label count: (full ms, ours ms, agreement, mean |confidence difference|) on a 1920x1080 photo."""
    predictor = SegmentationModel(clip, ModelConfig(dense_method=DENSE_METHOD, inference_size=448,
                                                                 refine_boundaries=False)).predictor()
    picture = np.asarray(Image.fromarray(world.test_scenes(1, seed=3)[0][0]).resize((1920, 1080), Image.BICUBIC))
    out = {}
    for labels in (list(world.NAMES[:20]), big_vocabulary()):
        logits = predictor.logits([picture], Vocabulary.from_labels(labels))[0]
        started = time.perf_counter()
        label, probability = full_softmax(logits, 1080, 1920, 1.0)
        full_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        ours = Predictor.to_semantic(logits, 1080, 1920)
        ours_ms = (time.perf_counter() - started) * 1000
        same = ours.label_map == label
        out[len(labels)] = (full_ms, ours_ms, float(same.mean()),
                            float(np.abs(ours.confidence - probability)[same].mean()))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.postprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=60)
    args = parser.parse_args(argv)
    clip = load_clip(str(CONFIG), str(materialize()))
    model = SegmentationModel(clip, ModelConfig(dense_method=DENSE_METHOD, inference_size=INFERENCE_SIZE,
                                                refine_boundaries=False))
    print(f"demo world, {args.scenes} scenes: | setting | argmax agreement | mIoU full | mIoU ours |")
    settings = demo_world(model, args.scenes)
    for name, (agreement, full, ours) in settings.items():
        print(f"| {name} | {agreement:.3%} | {full:.2f} | {ours:.2f} |")
    print("\n1920x1080 photo: | labels | full ms | ours ms | agreement | mean |confidence difference| |")
    photos = photo(clip)
    for count, (full_ms, ours_ms, agreement, difference) in photos.items():
        print(f"| {count} | {full_ms:.0f} | {ours_ms:.0f} | {agreement:.3%} | {difference:.4f} |")
    agreement, full, ours = settings["847 labels, 512 px"]
    big = max(photos)
    print(f"postprocess: agreement847={agreement:.4f} miou847_delta={ours - full:+.2f} "
          f"speedup847={photos[big][0] / photos[big][1]:.0f}")


if __name__ == "__main__":
    main()
