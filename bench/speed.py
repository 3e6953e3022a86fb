"""Speed and memory, side by side in one run: our one-pass segmenter vs the two-stage design.

    python -m bench.speed [--model ViT-B-16] [--size 448] [--images 5] [--masks 100]
                          [--photo 1920x1080] [--labels 20,150,847]

(a) ``fast``: a whole ``/predict`` request through the HTTP app (image decode, one tower
    pass, decoder, classification against cached text embeddings, RLE results);
(b) ``two-stage``: the same masks, then one CLIP image-encoder pass per masked crop
    (``--masks`` crops, Mask2Former's 100 queries) to classify them, as OVSeg/SimBaseline do;
(c) ``zero-shot``: the dense tower pass and classification only;
(d) ``bare``: one plain image-encoder forward at the same resolution: the floor of any
    one-pass design.
Weights are random (timing does not depend on them). Reports the median ms per image,
the peak resident memory added by each, and the text-encoder cost for 150 classes.

Then what users meet, on a photo of ``--photo`` pixels (a demo scene scaled up): the whole
/predict against the bare tower at the photo's inference shape, the share of post-processing
(label map and RLE), our RLE against label-studio-sdk's, a batch of 8 photos through the
pre-labeling path (images/s), and, with the demo model, /predict time and peak memory for
each vocabulary size of ``--labels``.
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
from model.build import SegmentationModel
from model.clip import load_clip
from model.config import ModelConfig
from model.predictor import SemanticPrediction
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
    parser.add_argument("--photo", default="1920x1080", help="WIDTHxHEIGHT of the photo-size measurements")
    parser.add_argument("--labels", default="20,150,847", help="vocabulary sizes of the label sweep (demo model)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from model.wordnet import wordnet

    model = SegmentationModel(load_clip(args.model, "random"), ModelConfig(inference_size=args.size, refine_boundaries=False))
    nouns = [s.lemma_names()[0].replace("_", " ") for s in list(wordnet().all_synsets("n"))[:20000:130]][:150]
    rows = {}
    for name, fn in designs(args, model, Vocabulary.from_labels(nouns[:args.classes])).items():
        rows[name] = measure(fn, args.images)
        print(f"  {name}: {rows[name][0]:.0f} ms", flush=True)
    report(args, rows, text_encoder_ms(model.clip, Vocabulary.from_labels(nouns)))
    width, height = (int(v) for v in args.photo.split("x"))
    picture = photo(width, height)
    photo_rows = photo_designs(args, model, Vocabulary.from_labels(nouns[:args.classes]), picture)
    sweep = label_sweep([int(n) for n in args.labels.split(",")], picture, args.images)
    report_photo(args, photo_rows, sweep)


def data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def brush_config(vocabulary: Vocabulary) -> str:
    labels = "".join(f'<Label value="{name}"/>' for name in vocabulary.labels)
    return f'<View><Image name="image" value="$image"/><BrushLabels name="m" toName="image">{labels}</BrushLabels></View>'


def client_for(model: SegmentationModel, settings: Settings):
    """The HTTP app's test client over a service serving ``model``."""
    service = SegmentationService(settings, model_loader=lambda _: model)
    service.start()
    service.runtime.model(wait=600)
    return create_app(settings, service).test_client()


def predict_call(client, images: list[np.ndarray], vocabulary: Vocabulary, http: bool = True):
    """A /predict of ``images`` as a timed call: through ``client`` (HTTP), or straight to its service (no
    request-size limit: batches of full-size photos, the pipeline ``backend.prelabel`` runs)."""
    payload = {"tasks": [{"id": i, "data": {"image": data_uri(image)}} for i, image in enumerate(images)],
               "label_config": brush_config(vocabulary)}
    service = client.application.config["service"]

    def call():
        if http:
            response = client.post("/predict", json=payload)
            assert response.status_code == 200, response.get_json()
            results = response.get_json()["results"]
        else:
            results = service.predict(payload)["results"]
        assert all("result" in r for r in results), results
    return call


def designs(args, model: SegmentationModel, vocabulary: Vocabulary) -> dict:
    """The timed calls, by design name, on one random image of args.size²."""

    image = np.random.default_rng(0).integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
    client = client_for(model, Settings(clip_model=args.model, clip_pretrained="random", inference_size=args.size))
    fast = predict_call(client, [image], vocabulary)
    predictor, text = model.predictor(), model.encoder.embed(vocabulary)
    # A fine-tuned version: the same pass plus the ensemble with the frozen classifier (half the labels seen).
    tuned_segmenter = model.segmenter()
    tuned_segmenter.trained_labels = vocabulary.labels[::2]
    tuned = model.predictor(tuned_segmenter)

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

    return {"bare": bare_forward(args.model, (args.size, args.size)), "zero-shot": lambda: predictor.logits([image], vocabulary),
            "fine-tuned": lambda: tuned.logits([image], vocabulary), "fast": fast, "two-stage": two_stage}


def bare_forward(model_name: str, shape: tuple[int, int], device: str = "cpu", bf16: bool = False):
    """One plain forward of the CLIP image tower at ``shape`` (in bfloat16 autocast if ``bf16``), as a timed
    call: the floor of any one-pass design."""
    import open_clip

    from model.clip import open_clip_name

    tower = open_clip.create_model(open_clip_name(model_name), pretrained=None,
                                   force_image_size=shape).visual.eval().to(device)
    batch = torch.randn(1, 3, *shape, device=device)

    def call():
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            tower(batch).float().cpu()  # to the host: a device's queue is done when the call returns
    return call


def photo(width: int, height: int) -> np.ndarray:
    """A demo-world scene scaled up to a photo's size (smooth regions and edges, as photos have)."""
    from demo import world

    return np.asarray(Image.fromarray(world.test_scenes(1, seed=3)[0][0]).resize((width, height), Image.BICUBIC))


def photo_designs(args, model: SegmentationModel, vocabulary: Vocabulary, picture: np.ndarray) -> dict:
    """(ms, MiB) of the photo-size rows, and the RLE speed-up over label-studio-sdk's."""
    from label_studio_sdk.converter.brush import mask2rle

    from backend.control_tags import BrushLabels

    client = client_for(model, Settings(clip_model=args.model, clip_pretrained="random", inference_size=args.size))
    predictor = model.predictor()
    logits = predictor.logits([picture], vocabulary)[0]
    target = BrushLabels("m", "image", "image", vocabulary)
    rules = Settings().region_rules()
    label_map = predictor.to_semantic(logits, *picture.shape[:2]).label_map
    prediction = SemanticPrediction(label_map, np.ones(label_map.shape, np.float32))
    assert prediction.region_scores  # computed once, outside the timed calls, as for the SDK's side
    rows = {
        "photo /predict": measure(predict_call(client, [picture], vocabulary), args.images),
        "photo bare": measure(bare_forward(args.model, predictor.inference_shape(*picture.shape[:2])), args.images),
        "photo post-processing": measure(lambda: target.build(predictor.semantic([picture], [logits], rules)[0]),
                                         args.images),
        "photo post-processing, unrefined": measure(
            lambda: target.build(predictor.to_semantic(logits, *picture.shape[:2], rules=rules)), args.images),
        "photo RLE, sdk": measure(lambda: [mask2rle((label_map == c).astype(np.uint8) * 255)
                                           for c in np.unique(label_map)], args.images),
        "photo RLE, ours": measure(lambda: target.build(prediction), args.images),
    }
    batch = predict_call(client, [picture] * 8, vocabulary, http=False)
    rows["photo batch of 8"] = measure(batch, max(1, args.images // 2))
    rows["regions"] = (len(np.unique(label_map)), 0.0)
    return rows


def label_sweep(counts: list[int], picture: np.ndarray, repeats: int) -> dict[int, tuple[float, float]]:
    """(ms, MiB of peak RSS added) of a /predict of ``picture`` with the demo model, per vocabulary size."""
    from demo import world
    from demo.train_clip import CONFIG, DENSE_METHOD, INFERENCE_SIZE, materialize
    from model.wordnet import wordnet

    demo = SegmentationModel(load_clip(str(CONFIG), str(materialize())),
                             ModelConfig(dense_method=DENSE_METHOD, inference_size=INFERENCE_SIZE,
                                         refine_boundaries=False))
    client = client_for(demo, Settings(clip_model=str(CONFIG), clip_pretrained=str(materialize()),
                                       inference_size=INFERENCE_SIZE, dense_method=DENSE_METHOD))
    nouns = [s.lemma_names()[0].replace("_", " ") for s in wordnet().all_synsets("n")]
    names = list(dict.fromkeys(world.NAMES + nouns))
    return {count: measure(predict_call(client, [picture], Vocabulary.from_labels(names[:count])), repeats)
            for count in counts}


def report_photo(args, rows: dict, sweep: dict[int, tuple[float, float]]) -> None:
    predict_ms, bare_ms = rows["photo /predict"][0], rows["photo bare"][0]
    post_ms = rows["photo post-processing"][0]
    rle_speedup = rows["photo RLE, sdk"][0] / rows["photo RLE, ours"][0]
    print(f"\n{args.model} at {args.size}, a {args.photo} photo, {args.classes} labels, median of {args.images}\n")
    print("| step | ms | peak RSS added (MiB) |\n|---|---|---|")
    for name in ("photo /predict", "photo bare", "photo post-processing", "photo post-processing, unrefined",
                 "photo RLE, sdk", "photo RLE, ours"):
        print(f"| {name} | {rows[name][0]:.1f} | {rows[name][1]:.0f} |")
    images_per_second = 8000 / rows["photo batch of 8"][0]
    print(f"\n/predict / bare tower = {predict_ms / bare_ms:.2f}x; post-processing {post_ms / predict_ms:.0%} of the "
          f"request; RLE {rle_speedup:.0f}x label-studio-sdk's ({rows['regions'][0]:.0f} regions); "
          f"batch of 8: {images_per_second:.2f} images/s")
    print("\ndemo model, the same photo, by vocabulary size:\n\n| labels | /predict ms | peak RSS added (MiB) |\n|---|---|---|")
    for count, (ms, mib) in sweep.items():
        print(f"| {count} | {ms:.0f} | {mib:.0f} |")
    low, high = min(sweep), max(sweep)
    print(f"speed: photo_ms={predict_ms:.0f} photo_over_bare={predict_ms / bare_ms:.2f} "
          f"post_share={post_ms / predict_ms:.2f} "
          f"refinement_share={(post_ms - rows['photo post-processing, unrefined'][0]) / predict_ms:.2f} rle_speedup={rle_speedup:.0f} images_per_s={images_per_second:.2f} "
          f"labels{high}_over_{low}={sweep[high][0] / sweep[low][0]:.2f} rss{high}_mib={sweep[high][1]:.0f}")


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
