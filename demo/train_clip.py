"""Rebuild the demo CLIP from scratch: render the world, train with ``open_clip_train``, pack the fixture.

    python -m demo.train_clip --samples 50000 --epochs 2

The model is an ordinary open_clip model (config ``demo/assets/demo-clip.json``)
trained with open_clip's own trainer on webdataset shards of 64x64 crops of world
scenes, each captioned with random WordNet synonyms of the concepts it shows.

The shipped fixture (``demo/assets/demo-clip-weights.pt``) is the trained state dict
in float16 with the token-embedding table reduced to the rows of the tokens that
occurred in the captions; every other row never received a gradient and is stored
as zero. :func:`materialize` expands it back into a plain open_clip checkpoint.
"""
from __future__ import annotations

import argparse
import glob
import io
import logging
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from demo import world
from model.files import atomic_write

ASSETS = Path(__file__).resolve().parent / "assets"
CONFIG = ASSETS / "demo-clip.json"
FIXTURE = ASSETS / "demo-clip-weights.pt"
MODEL_NAME = "demo-clip"
# Measured on the demo world (README): MaskCLIP's value-only last block beats ClearCLIP on this small CLIP.
DENSE_METHOD = "maskclip"
INFERENCE_SIZE = 128
ZERO_SHOT_TEMPERATURE = 1.6  # fitted on held-out demo scenes by bench.calibration
CROP = 64
# Prompt wordings used in captions; the vocabulary's template ensemble uses the same words.
CAPTION_PREFIXES = ("a photo of", "a picture of", "an image of", "a rendering of", "a close-up photo of")


def default_checkpoint_path() -> Path:
    cache = Path(os.environ.get("GKC_CACHE", Path.home() / ".cache" / "gkc"))
    return cache / "demo-clip.pt"


def random_crop(rng, image, label_map, size=CROP):
    y, x = rng.integers(0, image.shape[0] - size + 1, 2)
    return image[y:y + size, x:x + size], label_map[y:y + size, x:x + size]


def write_shards(out_dir: Path, samples: int, seed: int, per_shard: int = 5000) -> tuple[str, set[int]]:
    """Write webdataset shards of (png, txt); returns the brace pattern and the token ids used."""
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    synonyms = world.world_synonyms()
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[int] = set()
    shards = (samples + per_shard - 1) // per_shard
    index = 0
    for shard in range(shards):
        with tarfile.open(out_dir / f"{shard:06d}.tar", "w") as tar:
            for _ in range(min(per_shard, samples - index)):
                image, label_map = world.render_scene(rng)
                for _ in range(2):  # two crops per scene
                    crop, crop_labels = random_crop(rng, image, label_map)
                    text = world.caption(rng, crop_labels, synonyms)
                    text = CAPTION_PREFIXES[rng.integers(len(CAPTION_PREFIXES))] + text[len("a photo of"):]
                    used.update(int(t) for t in tokenizer([text])[0] if t)
                    png = io.BytesIO()
                    Image.fromarray(crop).save(png, format="PNG")
                    for ext, payload in (("png", png.getvalue()), ("txt", text.encode())):
                        info = tarfile.TarInfo(f"{index:08d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
                    index += 1
                    if index >= samples:
                        break
                if index >= samples:
                    break
    return str(out_dir / f"{{000000..{shards - 1:06d}}}.tar"), used


def train(samples: int, epochs: int, batch_size: int, lr: float, seed: int, work: Path) -> tuple[Path, set[int]]:
    import open_clip
    from open_clip_train.main import main as open_clip_train_main

    pattern, used = write_shards(work / "shards", samples, seed)
    open_clip.add_model_config(CONFIG)
    open_clip_train_main([
        "--train-data", pattern, "--dataset-type", "webdataset", "--train-num-samples", str(samples),
        "--model", MODEL_NAME, "--batch-size", str(batch_size), "--epochs", str(epochs), "--lr", str(lr),
        "--wd", "0.1", "--warmup", "100", "--workers", "1", "--precision", "fp32", "--seed", str(seed),
        "--logs", str(work / "logs"), "--name", "demo", "--save-frequency", str(epochs),
        "--report-to", "", "--log-every-n-steps", "20", "--device", "cpu",
    ])
    checkpoint = sorted(glob.glob(str(work / "logs" / "demo" / "checkpoints" / "epoch_*.pt")))[-1]
    return Path(checkpoint), used


def pack(checkpoint: Path, used_tokens: set[int], dest: Path = FIXTURE) -> None:
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
    """Expand the shipped fixture into a plain open_clip checkpoint file (idempotent)."""
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep shards and logs here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        checkpoint, used = train(args.samples, args.epochs, args.batch_size, args.lr, args.seed, work)
        pack(checkpoint, used)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
