"""Speed and memory, side by side in one run: our one-pass segmenter vs the two-stage design.

    python -m bench.speed [--model ViT-B-16] [--size 448] [--images 5] [--masks 100]

(a) ``fast``: a whole ``/predict`` request through the HTTP app (image decode, one tower
    pass, decoder, classification against cached text embeddings, RLE results);
(b) ``two-stage``: the same masks, then one CLIP image-encoder pass per masked crop
    (``--masks`` crops, Mask2Former's 100 queries) to classify them, as OVSeg/SimBaseline do;
(c) ``zero-shot``: the dense tower pass and classification only;
(d) ``bare``: one plain image-encoder forward at the same resolution: the floor of any
    one-pass design.
Weights are random (timing does not depend on them). Reports the median ms per image,
the peak resident memory added by each, and the text-encoder cost for 150 classes.
"""
from __future__ import annotations

import argparse
import base64
import io
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend.app import create_app
from backend.service import SegmentationService
from backend.settings import Settings
from model.build import ModelConfig, SegmentationModel
from model.clip import load_clip
from model.train import masked_crop, teacher_embeddings
from model.vocabulary import TextEncoder, Vocabulary


def _rss_peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def measure(fn, repeats: int) -> tuple[float, float]:
    """(median ms, MiB of peak RSS above the RSS before) over ``repeats`` calls after one warm-up."""
    fn()
    _rss_peak_reset()
    before = _rss_kib("VmRSS")
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(0, _rss_kib("VmHWM") - before) / 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--images", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--classes", type=int, default=20, help="vocabulary size of the timed requests")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from model.wordnet import wordnet

    model = SegmentationModel(load_clip(args.model, "random"), ModelConfig(inference_size=args.size))
    nouns = [s.lemma_names()[0].replace("_", " ") for s in list(wordnet().all_synsets("n"))[:20000:130]][:150]
    rows = {}
    for name, fn in designs(args, model, Vocabulary.from_labels(nouns[:args.classes])).items():
        rows[name] = measure(fn, args.images)
        print(f"  {name}: {rows[name][0]:.0f} ms", flush=True)
    report(args, rows, text_encoder_ms(model.clip, Vocabulary.from_labels(nouns)))


def designs(args, model: SegmentationModel, vocabulary: Vocabulary) -> dict:
    """The timed calls, by design name, on one random image of args.size²."""
    import open_clip

    image = np.random.default_rng(0).integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    labels = "".join(f'<Label value="{name}"/>' for name in vocabulary.labels)
    label_config = f'<View><Image name="image" value="$image"/><BrushLabels name="m" toName="image">{labels}</BrushLabels></View>'
    settings = Settings(clip_model=args.model, clip_pretrained="random", inference_size=args.size)
    service = SegmentationService(settings, model_loader=lambda _: model)
    service.start()
    client = create_app(settings, service).test_client()
    payload = {"tasks": [{"id": 1, "data": {"image": uri}}], "label_config": label_config}
    predictor, text = model.predictor(), model.encoder.embed(vocabulary)
    # A fine-tuned version: the same pass plus the ensemble with the frozen classifier (half the labels seen).
    tuned_segmenter = model.segmenter()
    tuned_segmenter.trained_labels = vocabulary.labels[::2]
    tuned = model.predictor(tuned_segmenter)

    def fast():
        response = client.post("/predict", json=payload)
        assert response.status_code == 200, response.get_json()

    def two_stage():
        prediction = predictor.predict([image], vocabulary)[0]
        # The masks a query decoder would propose: our classes' masks, topped up with random blobs.
        masks = [prediction.label_map == c for c in np.unique(prediction.label_map)]
        rng = np.random.default_rng(0)
        while len(masks) < args.masks:
            y, x = rng.integers(0, args.size - 64, 2)
            blob = np.zeros(image.shape[:2], bool)
            blob[y:y + 64, x:x + 64] = True
            masks.append(blob)
        crops = [masked_crop(image, mask, model.clip.image_size) for mask in masks[:args.masks]]
        region = teacher_embeddings(model.clip, crops, batch_size=args.masks)
        (region @ text.T).argmax(1)

    bare_model = open_clip.create_model(args.model, pretrained=None, force_image_size=args.size).visual.eval()
    bare_input = torch.randn(1, 3, args.size, args.size)

    def bare():
        with torch.no_grad():
            bare_model(bare_input)

    return {"bare": bare, "zero-shot": lambda: predictor.logits([image], vocabulary),
            "fine-tuned": lambda: tuned.logits([image], vocabulary), "fast": fast, "two-stage": two_stage}


def text_encoder_ms(clip, vocabulary: Vocabulary) -> tuple[float, float, str]:
    """(cold ms, cached ms, what was embedded) for ``vocabulary`` with a fresh text encoder."""
    encoder = TextEncoder(clip)
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        encoder.embed(vocabulary)
        timings.append((time.perf_counter() - started) * 1000)
    return timings[0], timings[1], f"{len(vocabulary)} classes × {len(encoder.templates)} templates"


def report(args, rows: dict, text_timing: tuple[float, float, str]) -> None:
    print(f"\n{args.model}, {args.size}x{args.size}, CPU threads {torch.get_num_threads()}, "
          f"{args.classes} classes, median of {args.images}\n")
    print("| design | ms / image | × bare forward | peak RSS added (MiB) |\n|---|---|---|---|")
    labels = {"fast": "ours: whole /predict request", "zero-shot": "ours: dense zero-shot pass only",
              "fine-tuned": "ours: a fine-tuned version's pass (with the ensemble)",
              "two-stage": f"two-stage: + CLIP pass per mask ({args.masks} masks)", "bare": "bare image-encoder forward"}
    for name in ("fast", "zero-shot", "fine-tuned", "two-stage", "bare"):
        ms, mib = rows[name]
        print(f"| {labels[name]} | {ms:.0f} | {ms / rows['bare'][0]:.2f} | {mib:.0f} |")
    cold_ms, warm_ms, embedded = text_timing
    print(f"\ntext encoder, {embedded}: cold {cold_ms:.0f} ms, cached {warm_ms:.2f} ms")
    print(f"two-stage / fast = {rows['two-stage'][0] / rows['fast'][0]:.1f}x; "
          f"fast / bare = {rows['fast'][0] / rows['bare'][0]:.2f}x")
    print(f"speed: fast_ms={rows['fast'][0]:.0f} two_stage_ms={rows['two-stage'][0]:.0f} bare_ms={rows['bare'][0]:.0f} "
          f"fine_tuned_over_zero_shot={rows['fine-tuned'][0] / rows['zero-shot'][0]:.2f}")


if __name__ == "__main__":
    main()
