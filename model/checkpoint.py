"""Segmenter checkpoints: only the trained parts plus the identity of the CLIP they sit on."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

FORMAT = "gkc-segmenter"
VERSION = 1


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path: str | Path, segmenter, clip_identity: str, **metadata) -> Path:
    """Write atomically: a temporary file in the same directory, fsync, then rename.

    A crash at any point leaves either the previous file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT, "version": VERSION, "clip": clip_identity, "created": time.time(),
        "state_dict": segmenter.trainable_state_dict(), "metadata": metadata,
    }
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, segmenter, clip_identity: str) -> dict:
    """Load trained parts into ``segmenter``; returns the checkpoint's metadata.

    Raises:
        CheckpointError: unreadable file, unknown format, or a checkpoint for another CLIP.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"can't read checkpoint {path}: {error}") from None
    if payload.get("format") != FORMAT or payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} is not a {FORMAT} v{VERSION} checkpoint")
    if payload["clip"] != clip_identity:
        raise CheckpointError(f"{path} was trained on CLIP {payload['clip']}, not {clip_identity}")
    missing = set(segmenter.trainable_state_dict()) - set(payload["state_dict"])
    if missing:
        raise CheckpointError(f"{path} lacks {sorted(missing)[:3]}...")
    segmenter.load_state_dict(payload["state_dict"], strict=False)
    return payload["metadata"]
