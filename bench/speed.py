"""Speed and memory, side by side in one run: our one-pass segmenter vs the two-stage design.

    python -m bench.speed [--model ViT-B-16] [--size 448] [--images 5] [--masks 100]
                          [--photo 1920x1080] [--labels 20,150,847] [--sections designs,photo,runtimes]
                          [--compile]

``designs`` and ``photo`` run in float32 eager torch, like the bare forward they are measured against:
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

``runtimes``: the plain image tower at the photo's inference shape under eager torch fp32 and bf16,
int8 dynamic quantization, ``torch.compile`` (``--compile``), OpenVINO f32 and bf16, and ONNX Runtime
(those installed), with each output's difference from float32; then the whole /predict of the photo,
alone and in batches of 8 (images/s), under each ``PRECISION``/``RUNTIME`` the backend offers and under the
defaults (what ``auto`` chose on this machine), as ratios to the float32 bare tower and to the fastest bare
tower; and fine-tuning steps/s, the loop as it was (float32, each batch augmented in the step) against the
shipped one (``PRECISION=auto``, the next batch augmented in a thread).
"""
from __future__ import annotations

import argparse
import base64
import copy
import io
import statistics
import tempfile
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
from model.openvino_tower import resolve_runtime
from model.predictor import SemanticPrediction, uses_bf16
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
    parser.add_argument("--train-steps", type=int, default=3, help="runtimes: timed fine-tuning steps per loop")
    parser.add_argument("--compile", action="store_true", help="runtimes: also torch.compile (slow to compile)")
    parser.add_argument("--sections", default="designs,photo,runtimes",
                        help="which to run: designs (one image), photo (photo-size steps, label sweep), runtimes")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    torch.manual_seed(0)
    from model.wordnet import wordnet

    # The designs and the photo's steps compare like with like: float32 eager torch, as the bare forward.
    clip = load_clip(args.model, "random")
    model = SegmentationModel(clip, ModelConfig(inference_size=args.size, refine_boundaries=False, **REFERENCE))
    nouns = [s.lemma_names()[0].replace("_", " ") for s in list(wordnet().all_synsets("n"))[:20000:130]][:150]
    vocabulary = Vocabulary.from_labels(nouns[:args.classes])
    width, height = (int(v) for v in args.photo.split("x"))
    picture = photo(width, height)
    if "designs" in sections:
        rows = {}
        for name, fn in designs(args, model, vocabulary).items():
            rows[name] = measure(fn, args.images)
            print(f"  {name}: {rows[name][0]:.0f} ms", flush=True)
        report(args, rows, text_encoder_ms(model.clip, Vocabulary.from_labels(nouns)))
    if "photo" in sections:
        photo_rows = photo_designs(args, model, vocabulary, picture)
        sweep = label_sweep([int(n) for n in args.labels.split(",")], picture, args.images)
        report_photo(args, photo_rows, sweep)
    if "runtimes" in sections:
        report_runtimes(args, runtime_rows(args, clip, vocabulary, picture))


REFERENCE = {"precision": "fp32", "runtime": "torch"}


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
    client = client_for(model, Settings(clip_model=args.model, clip_pretrained="random", inference_size=args.size,
                                        **REFERENCE))
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


def photo(width: int, height: int, seed: int = 3) -> np.ndarray:
    """A demo-world scene scaled up to a photo's size (smooth regions and edges, as photos have)."""
    from demo import world

    return np.asarray(Image.fromarray(world.test_scenes(1, seed=seed)[0][0]).resize((width, height), Image.BICUBIC))


def photo_designs(args, model: SegmentationModel, vocabulary: Vocabulary, picture: np.ndarray) -> dict:
    """(ms, MiB) of the photo-size rows, and the RLE speed-up over label-studio-sdk's."""
    from label_studio_sdk.converter.brush import mask2rle

    from backend.control_tags import BrushLabels

    client = client_for(model, Settings(clip_model=args.model, clip_pretrained="random", inference_size=args.size,
                                        **REFERENCE))
    predictor = model.predictor()
    passes = predictor.calibrated([picture], vocabulary)
    logits = passes[0].scores
    target = BrushLabels("m", "image", "image", vocabulary)
    rules = Settings().region_rules()
    label_map = predictor.to_semantic(logits, *picture.shape[:2]).label_map
    prediction = SemanticPrediction(label_map, np.ones(label_map.shape, np.float32))
    assert prediction.region_scores  # computed once, outside the timed calls, as for the SDK's side
    rows = {
        "photo /predict": measure(predict_call(client, [picture], vocabulary), args.images),
        "photo bare": measure(bare_forward(args.model, predictor.inference_shape(*picture.shape[:2])), args.images),
        "photo post-processing": measure(lambda: target.build(predictor.semantic([picture], passes, rules, vocabulary)[0]),
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
                                         refine_boundaries=False, **REFERENCE))
    client = client_for(demo, Settings(clip_model=str(CONFIG), clip_pretrained=str(materialize()),
                                       inference_size=INFERENCE_SIZE, dense_method=DENSE_METHOD, **REFERENCE))
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


def tower_runtimes(model_name: str, shape: tuple[int, int], compile_too: bool) -> dict[str, tuple]:
    """The plain image tower at ``shape`` under each runtime that is installed: name → (timed call, its output).
    ``compile_too``: also ``torch.compile`` (about a minute to compile on 2 cores)."""
    import open_clip

    from model.clip import open_clip_name
    from model.config import openvino_installed

    tower = open_clip.create_model(open_clip_name(model_name), pretrained=None, force_image_size=shape).visual.eval()
    tower.requires_grad_(False)  # traced as served: the exports below follow the inference path
    batch = torch.randn(1, 3, *shape)

    def eager(module, bf16: bool = False):
        def call():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return module(batch).float()
        return call
    calls = {"torch fp32": eager(tower), "torch bf16": eager(tower, bf16=True),
             "torch int8 dynamic": eager(torch.ao.quantization.quantize_dynamic(
                 copy.deepcopy(tower), {torch.nn.Linear}, dtype=torch.qint8))}
    if openvino_installed():
        from model.openvino_tower import compile_for_cpu, openvino_module

        graph = openvino_module().convert_model(tower, example_input=batch)
        for hint in ("f32", "bf16"):
            compiled = compile_for_cpu(graph, bf16=hint == "bf16")
            calls[f"OpenVINO {hint}"] = lambda compiled=compiled: torch.from_numpy(
                compiled.create_infer_request().infer({0: batch.numpy()})[compiled.outputs[0]].copy())
    try:
        import onnxruntime

        path = Path(tempfile.mkdtemp()) / "tower.onnx"
        torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel has no ONNX operator
        try:
            torch.onnx.export(tower, (batch,), str(path), dynamo=False)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        calls["ONNX Runtime fp32"] = lambda: torch.from_numpy(session.run(None, {session.get_inputs()[0].name:
                                                                                  batch.numpy()})[0])
    except Exception as error:  # not installed, or the export failed: the row says so
        print(f"  ONNX Runtime: no row ({error.__class__.__name__}: {str(error)[:120]})")
    if compile_too:  # last: the other exports trace the plain module
        calls["torch.compile bf16"] = eager(torch.compile(tower), bf16=True)
    return {name: (call, call()) for name, call in calls.items()}


def training_samples(size: int, count: int) -> list:
    """``count`` annotated demo scenes scaled to 1.5×``size``, as photos are larger than the training crops."""
    from demo import world
    from model.train import Sample

    side = size * 3 // 2
    return [Sample(np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC)),
                   np.asarray(Image.fromarray(labels.astype(np.int32)).resize((side, side), Image.NEAREST)))
            for image, labels in world.test_scenes(count, seed=777)]


def training_steps_per_second(model: SegmentationModel, size: int, steps: int, batch: int,
                              precision: str = "auto", augment_in_step: bool = False) -> float:
    """Steps/s of fine-tuning ``model``'s segmenter as the training job does (the first step not counted).
    ``augment_in_step``: the loop as it was, each batch augmented in the step before it trains."""
    from demo import world
    from model.train import TrainConfig, _Trainer, finetune

    samples, vocabulary = training_samples(size, batch), Vocabulary.from_labels(world.NAMES)
    config = TrainConfig(steps=steps + 1, batch_size=batch, size=size, precision=precision)
    with torch.enable_grad():
        if augment_in_step:
            trainer = _Trainer(model.segmenter().train(), model.clip, model.encoder, samples, vocabulary, config)
            trainer.step(trainer.draw_batch())
            started = time.perf_counter()
            for _ in range(steps):
                trainer.step(trainer.draw_batch())
            return steps / (time.perf_counter() - started)
        stamps = []
        finetune(model.segmenter(), model.clip, model.encoder, samples, vocabulary, config,
                 progress=lambda step, _: stamps.append(time.perf_counter()))
    return steps / (stamps[-1] - stamps[0])


def runtime_rows(args, clip, vocabulary: Vocabulary, picture: np.ndarray) -> dict[str, tuple[float, float]]:
    """(ms, output difference from float32 torch in % of its range) of the bare tower under each runtime at the
    photo's inference shape; and (ms, images/s) of the whole /predict of the photo, alone and in batches of 8,
    under each PRECISION and RUNTIME the backend offers."""
    from model.config import openvino_installed

    rows = {}
    shape = SegmentationModel(clip, ModelConfig(inference_size=args.size, **REFERENCE)).predictor().inference_shape(
        *picture.shape[:2])  # the reference runtime: no tower conversion just to learn a shape
    towers = tower_runtimes(args.model, shape, args.compile)
    reference = towers["torch fp32"][1]
    for name, (call, output) in towers.items():
        difference = float((output - reference).abs().max() / (reference.max() - reference.min())) * 100
        rows[f"bare tower, {name}"] = (measure(call, args.images)[0], difference)
        print(f"  bare tower, {name}: {rows[f'bare tower, {name}'][0]:.0f} ms", flush=True)
    runtimes = ["torch"] + (["openvino"] if openvino_installed() else [])
    served = [(precision, runtime) for runtime in runtimes for precision in ("fp32", "bf16")] + [("auto", "auto")]
    cpu = torch.device("cpu")
    for precision, runtime in served:
        options = {"precision": precision, "runtime": runtime}
        model = SegmentationModel(clip, ModelConfig(inference_size=args.size, **options))
        client = client_for(model, Settings(clip_model=args.model, clip_pretrained="random",
                                            inference_size=args.size, **options))
        one = measure(predict_call(client, [picture], vocabulary), args.images)[0]
        eight = measure(predict_call(client, [picture] * 8, vocabulary, http=False), max(1, args.images // 2))[0]
        chosen = (f" (the defaults: {'bf16' if uses_bf16(precision, cpu) else 'fp32'} {resolve_runtime(runtime, cpu)})"
                  if precision == "auto" else "")
        rows[f"/predict, PRECISION={precision} RUNTIME={runtime}{chosen}"] = (one, 8000 / eight)
        print(f"  /predict {precision} {runtime}{chosen}: {one:.0f} ms, {8000 / eight:.2f} images/s", flush=True)
    before = SegmentationModel(clip, ModelConfig(inference_size=args.size, **REFERENCE))
    rows["training, fp32, augmented in the step (the loop before)"] = (
        training_steps_per_second(before, args.size, args.train_steps, 4, "fp32", augment_in_step=True), 0.0)
    rows["training, PRECISION=auto RUNTIME=auto, augmented in a thread"] = (
        training_steps_per_second(SegmentationModel(clip, ModelConfig(inference_size=args.size)), args.size,
                                  args.train_steps, 4), 0.0)
    rows["shape"] = shape
    return rows


def report_runtimes(args, rows: dict) -> None:
    shape = rows.pop("shape")
    tower = {k.removeprefix("bare tower, "): v for k, v in rows.items() if k.startswith("bare tower, ")}
    served = {k.removeprefix("/predict, "): v for k, v in rows.items() if k.startswith("/predict, ")}
    fp32, fastest = tower["torch fp32"][0], min(ms for ms, _ in tower.values())
    print(f"\n{args.model}, the bare image tower at {shape[0]}x{shape[1]} (a {args.photo} photo's inference shape), "
          f"{torch.get_num_threads()} threads, median of {args.images}\n")
    print("| runtime | ms | vs torch fp32 | output difference (% of range) |\n|---|---|---|---|")
    for name, (ms, difference) in tower.items():
        print(f"| {name} | {ms:.0f} | {fp32 / ms:.2f}× | {difference:.2f} |")
    print("\nthe whole /predict of the photo, 20 labels:\n\n| setting | ms | × fp32 bare tower | × fastest bare tower "
          "| batches of 8, images/s |\n|---|---|---|---|---|")
    for name, (ms, images_per_s) in served.items():
        print(f"| {name} | {ms:.0f} | {ms / fp32:.2f} | {ms / fastest:.2f} | {images_per_s:.2f} |")
    training = {k.removeprefix("training, "): v[0] for k, v in rows.items() if k.startswith("training, ")}
    print("\nfine-tuning, batches of 4 at the inference size, the tower frozen:\n\n| loop | steps/s |\n|---|---|")
    for name, steps_per_s in training.items():
        print(f"| {name} | {steps_per_s:.3f} |")
    before, now = training.values()
    best = min(served, key=lambda name: served[name][0])
    base = served["PRECISION=fp32 RUNTIME=torch"]
    default = next(ms for name, (ms, _) in served.items() if name.startswith("PRECISION=auto RUNTIME=auto"))
    print(f"runtimes: fastest_tower={min(tower, key=lambda n: tower[n][0]).replace(' ', '_')} best='{best}' "
          f"defaults_over_best={default / served[best][0]:.2f} "
          f"predict_over_fp32_bare={served[best][0] / fp32:.2f} predict_over_fastest_bare={served[best][0] / fastest:.2f} "
          f"batch_images_per_s={served[best][1]:.2f} batch_speedup={served[best][1] / base[1]:.2f} "
          f"training_speedup={now / before:.2f}")


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
