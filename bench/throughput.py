"""Whole-project pre-labeling, end to end: the ``prelabel`` command's loop (``backend.prelabel.Prelabeler``).

    python -m bench.throughput [--images 16] [--batch 8] [--photo 1920x1080] [--model ViT-B-16] [--size 448]

The project's tasks point at JPEG photos (a demo scene scaled up) on an HTTP server on 127.0.0.1, fetched
as from a Label Studio's storage; Label Studio's API (the task list, the project, the uploads) is an
in-memory stand-in, so the figure is the backend's own: listing, fetching and decoding, the pass, the
regions, the RLE results, and the uploads that overlap the next batch. Weights are random (timing does not
depend on them). Reports images/s under ``PRECISION=fp32 RUNTIME=torch`` (the loop before bf16 and
OpenVINO) and under the defaults, and their ratio.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import logging
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from backend.prelabel import Prelabeler
from backend.service import SegmentationService
from backend.settings import Settings
from bench.speed import brush_config, photo
from demo import world
from model.build import SegmentationModel
from model.clip import load_clip
from model.config import ModelConfig
from model.vocabulary import Vocabulary


class StandInLabelStudio:
    """Label Studio's API as the pre-labeler calls it, in memory: one project whose tasks read image URLs.
    Every listing shows the tasks without predictions, so each run predicts them all."""

    def __init__(self, label_config: str, urls: list[str]):
        self.uploaded: list[dict] = []
        project = SimpleNamespace(label_config=label_config, model_version="")
        self.tasks = SimpleNamespace(list=lambda **_: iter(
            SimpleNamespace(id=i + 1, data={"image": url}, predictions_model_versions="") for i, url in enumerate(urls)))
        self.projects = SimpleNamespace(get=lambda id: project, update=lambda id, model_version: None,
                                        import_predictions=lambda id, request, request_options: self.uploaded.extend(request))


def serve_directory(folder: Path) -> http.server.ThreadingHTTPServer:
    """A file server on 127.0.0.1 (a free port), answering in a thread; ``shutdown()`` it when done."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def images_per_second(clip, options: dict, urls: list[str], args, vocabulary: Vocabulary) -> float:
    """The pre-labeler's images/s over ``urls`` with the model and settings of ``options``, after a warm-up
    run (the first pass converts and compiles a tower)."""
    model = SegmentationModel(clip, ModelConfig(inference_size=args.size, **options))
    settings = Settings(clip_model=args.model, clip_pretrained="random", inference_size=args.size,
                        allowed_image_hosts=("127.0.0.1",), **options)
    service = SegmentationService(settings, model_loader=lambda _: model)
    service.start()
    try:
        service.runtime.model(wait=600)
        config = brush_config(vocabulary)
        Prelabeler(StandInLabelStudio(config, urls[:2]), service, 1, batch_size=args.batch).run(progress=False)
        label_studio = StandInLabelStudio(config, urls)
        counts = Prelabeler(label_studio, service, 1, batch_size=args.batch).run(progress=False)
    finally:
        service.shutdown()
    assert counts["predicted"] == len(urls) == len(label_studio.uploaded) and not counts["failed"], counts
    return counts["images_per_second"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="tasks in the project")
    parser.add_argument("--batch", type=int, default=8, help="the pre-labeler's batch size")
    parser.add_argument("--photo", default="1920x1080", help="WIDTHxHEIGHT of the photos")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--settings", default="fp32/torch,auto/auto",
                        help="PRECISION/RUNTIME pairs to run, the first the reference")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    width, height = (int(v) for v in args.photo.split("x"))
    vocabulary = Vocabulary.from_labels(world.NAMES[:20])
    clip = load_clip(args.model, "random")
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.images):  # different photos: no cache may serve one for another
            Image.fromarray(photo(width, height, seed=index)).save(Path(folder) / f"{index}.jpg", quality=90)
        server = serve_directory(Path(folder))
        try:
            urls = [f"http://127.0.0.1:{server.server_port}/{index}.jpg" for index in range(args.images)]
            rates = {}
            for setting in args.settings.split(","):
                precision, runtime = setting.split("/")
                rates[setting] = images_per_second(clip, {"precision": precision, "runtime": runtime}, urls, args,
                                                   vocabulary)
                print(f"  {setting}: {rates[setting]:.2f} images/s", flush=True)
        finally:
            server.shutdown()
    reference = next(iter(rates.values()))
    print(f"\nthe prelabel command's loop, {args.images} photos of {args.photo} (JPEG over HTTP), batches of "
          f"{args.batch}, {args.model} at {args.size} px, 20 labels, {torch.get_num_threads()} threads\n\n"
          "| PRECISION/RUNTIME | images/s | × the first |\n|---|---|---|")
    for setting, rate in rates.items():
        print(f"| {setting} | {rate:.2f} | {rate / reference:.2f} |")
    print("throughput: " + " ".join(f"{k.replace('/', '_')}={v:.2f}" for k, v in rates.items()))


if __name__ == "__main__":
    main()
