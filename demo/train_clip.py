"""The demo CLIPs: rebuild one from scratch (render the world, train with ``open_clip_train``, pack the fixture).

    python -m demo.train_clip [--clip demo-clip] --samples 50000 --epochs 2

Each is an ordinary open_clip model (config ``demo/assets/<name>.json``) trained with
open_clip's own trainer on webdataset shards of square crops of world scenes, each
captioned with random WordNet synonyms of the concepts it shows. :data:`DEMO_CLIPS`
names them: ``demo-clip``, on which every default was chosen, and two that differ from
it and from each other in architecture, seed, caption wording, synonyms and rendering.
Those two stand for the CLIPs users bring: benchmarks report on them (``--clip``), and
nothing is ever chosen on them.

The shipped fixture (``demo/assets/<name>-weights.pt``) is the trained state dict
in float16 with the token-embedding table reduced to the rows of the tokens that
occurred in the captions; every other row never received a gradient and is stored
as zero. :meth:`DemoClip.materialize` expands it back into a plain open_clip checkpoint.
"""
from __future__ import annotations

import argparse
import glob
import io
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from demo import world
from model.files import atomic_write

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class DemoClip:
    """One demo CLIP: how it was trained, and how it is served.

    Attributes:
        name: the registry key, and the stem of its config and fixture in :data:`ASSETS`.
        seed: of the rendered training scenes and of training.
        caption_prefixes: the wordings its captions start with.
        synonyms: ``"all"`` WordNet lemmas of each concept, or ``"alternate"`` (the first and every other).
        crop: the training crops' side (the config's ``image_size``).
        scene_size: the side of the scenes the crops are cut from.
        camera: training scenes pass through :func:`demo.world.random_camera` (another rendering).
        inference_size: the short side it is served at (16 patches across).
        dense_method: how its tower's features are made text-aligned (measured on ``demo-clip``).
    """

    name: str
    seed: int
    caption_prefixes: tuple[str, ...]
    synonyms: str = "all"
    crop: int = 64
    scene_size: int = world.SCENE_SIZE
    camera: bool = False
    inference_size: int = 128
    dense_method: str = "maskclip"

    @property
    def config(self) -> Path:
        return ASSETS / f"{self.name}.json"

    @property
    def fixture(self) -> Path:
        return ASSETS / f"{self.name}-weights.pt"

    def checkpoint_path(self) -> Path:
        cache = Path(os.environ.get("GKC_CACHE", Path.home() / ".cache" / "gkc"))
        return cache / f"{self.name}.pt"

    def materialize(self) -> Path:
        """Expand the shipped fixture into a plain open_clip checkpoint file (idempotent)."""
        return materialize(self.checkpoint_path(), self.fixture)

    def model(self, **config):
        """This CLIP loaded as the backend serves it (``config``: :class:`model.config.ModelConfig` fields)."""
        from model.build import SegmentationModel
        from model.clip import load_clip
        from model.config import ModelConfig

        options = {"dense_method": self.dense_method, "inference_size": self.inference_size, **config}
        return SegmentationModel(load_clip(str(self.config), str(self.materialize())), ModelConfig(**options))

    def settings_env(self) -> dict[str, str]:
        """The backend settings that serve it (``TEMPERATURE`` stays the backend's: fitted without labels)."""
        return {"CLIP_MODEL": str(self.config), "CLIP_PRETRAINED": str(self.materialize()),
                "INFERENCE_SIZE": str(self.inference_size), "DENSE_METHOD": self.dense_method}


DEMO_CLIPS = {clip.name: clip for clip in (
    # Every default was chosen on this one.
    DemoClip("demo-clip", seed=0, caption_prefixes=(
        "a photo of", "a picture of", "an image of", "a rendering of", "a close-up photo of")),
    # Never tuned on: narrower and deeper, other wordings, half the synonyms.
    DemoClip("demo-clip-deep", seed=1, synonyms="alternate", caption_prefixes=(
        "a snapshot of", "a scene showing", "there is", "a view of", "an illustration of")),
    # Never tuned on: wider, 16-pixel patches, other wordings, scenes through a random camera.
    DemoClip("demo-clip-p16", seed=2, crop=96, scene_size=160, camera=True, inference_size=256,
             caption_prefixes=("a photograph of", "a drawing of", "look at", "a small image of", "a shot of")),
)}
DEMO_CLIP = DEMO_CLIPS["demo-clip"]


def add_clip_argument(parser) -> None:
    """A benchmark's ``--clip``: which demo CLIP it reports on (run it once per CLIP)."""
    parser.add_argument("--clip", choices=DEMO_CLIPS, default=DEMO_CLIP.name,
                        help="the demo CLIP to measure: demo-clip (defaults were chosen on it) or one never tuned on")


def parse_bench_arguments(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """A benchmark's arguments, with its ``--clip`` last; it then logs warnings alone and runs without gradients
    (its fine-tunings turn them on)."""
    add_clip_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    return args


# The demo CLIP's, kept for the modules that serve it alone.
CONFIG, FIXTURE, DENSE_METHOD, INFERENCE_SIZE = (DEMO_CLIP.config, DEMO_CLIP.fixture, DEMO_CLIP.dense_method,
                                                 DEMO_CLIP.inference_size)


def default_checkpoint_path() -> Path:
    return DEMO_CLIP.checkpoint_path()


def random_crop(rng, image, label_map, size):
    y, x = rng.integers(0, image.shape[0] - size + 1, 2)
    return image[y:y + size, x:x + size], label_map[y:y + size, x:x + size]


def caption_synonyms(clip: DemoClip) -> dict[int, list[str]]:
    synonyms = world.world_synonyms()
    if clip.synonyms == "alternate":
        return {c: names[::2] for c, names in synonyms.items()}
    return synonyms


def write_shards(clip: DemoClip, out_dir: Path, samples: int, per_shard: int = 5000) -> tuple[str, set[int]]:
    """Write webdataset shards of (png, txt); returns the brace pattern and the token ids used."""
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    synonyms = caption_synonyms(clip)
    rng = np.random.default_rng(clip.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[int] = set()
    shards = (samples + per_shard - 1) // per_shard
    index = 0
    for shard in range(shards):
        with tarfile.open(out_dir / f"{shard:06d}.tar", "w") as tar:
            while index < min(samples, (shard + 1) * per_shard):
                image, label_map = world.render_scene(rng, size=clip.scene_size)
                if clip.camera:
                    image = world.random_camera(rng, image)
                for _ in range(2):  # two crops per scene
                    crop, crop_labels = random_crop(rng, image, label_map, clip.crop)
                    text = world.caption(rng, crop_labels, synonyms)
                    text = clip.caption_prefixes[rng.integers(len(clip.caption_prefixes))] + text[len("a photo of"):]
                    used.update(int(t) for t in tokenizer([text])[0] if t)
                    png = io.BytesIO()
                    Image.fromarray(crop).save(png, format="PNG")
                    for ext, payload in (("png", png.getvalue()), ("txt", text.encode())):
                        info = tarfile.TarInfo(f"{index:08d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
                    index += 1
    return str(out_dir / f"{{000000..{shards - 1:06d}}}.tar"), used


def train(clip: DemoClip, samples: int, epochs: int, batch_size: int, lr: float, work: Path) -> tuple[Path, set[int]]:
    import open_clip
    from open_clip_train.main import main as open_clip_train_main

    pattern, used = write_shards(clip, work / "shards", samples)
    open_clip.add_model_config(clip.config)
    open_clip_train_main([
        "--train-data", pattern, "--dataset-type", "webdataset", "--train-num-samples", str(samples),
        "--model", clip.name, "--batch-size", str(batch_size), "--epochs", str(epochs), "--lr", str(lr),
        "--wd", "0.1", "--warmup", "100", "--workers", "1", "--precision", "fp32", "--seed", str(clip.seed),
        "--logs", str(work / "logs"), "--name", clip.name, "--save-frequency", str(epochs),
        "--report-to", "", "--log-every-n-steps", "20", "--device", "cpu",
    ])
    checkpoint = sorted(glob.glob(str(work / "logs" / clip.name / "checkpoints" / "epoch_*.pt")))[-1]
    return Path(checkpoint), used


def pack(checkpoint: Path, used_tokens: set[int], dest: Path) -> None:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    rows = torch.tensor(sorted(used_tokens), dtype=torch.long)
    embedding = state.pop("token_embedding.weight")
    packed = {
        "format": "gkc-demo-clip/1",
        "vocab_size": embedding.shape[0],
        "token_rows": rows,
        "token_embedding": embedding[rows].half(),
        "state_dict": {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
    }
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    atomic_write(dest, buffer.getbuffer())


def materialize(dest: Path | None = None, fixture: Path = FIXTURE) -> Path:
    """Expand a shipped fixture (default: the demo CLIP's) into a plain open_clip checkpoint file (idempotent)."""
    dest = Path(dest or default_checkpoint_path())
    if dest.exists() and dest.stat().st_mtime >= fixture.stat().st_mtime:
        return dest
    packed = torch.load(fixture, map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in packed["state_dict"].items()}
    embedding = torch.zeros(packed["vocab_size"], packed["token_embedding"].shape[1])
    embedding[packed["token_rows"]] = packed["token_embedding"].float()
    state["token_embedding.weight"] = embedding
    dest.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(dest, buffer.getbuffer())
    return dest


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo.train_clip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", choices=DEMO_CLIPS, default=DEMO_CLIP.name)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep shards and logs here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    clip = DEMO_CLIPS[args.clip]
    torch.manual_seed(clip.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        checkpoint, used = train(clip, args.samples, args.epochs, args.batch_size, args.lr, work)
        pack(checkpoint, used, clip.fixture)
    print(f"wrote {clip.fixture} ({clip.fixture.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
