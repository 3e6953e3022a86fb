"""Segmenter checkpoints: only the trained parts, plus the identity of the model they were trained under
(:func:`model.config.model_identity`: the CLIP and the dense method that shape the decoder's features)."""
from __future__ import annotations

import io
import time
from pathlib import Path

import torch

from model.files import atomic_write

FORMAT = "gkc-segmenter"
VERSION = 1


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path: str | Path, segmenter, identity: str, **metadata) -> Path:
    """Write atomically and durably (:func:`model.files.atomic_write`); ``identity``: the model's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT, "version": VERSION, "identity": identity, "created": time.time(),
        "state_dict": segmenter.trainable_state_dict(), "metadata": metadata,
        "trained_labels": list(getattr(segmenter, "trained_labels", None) or []),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # serialised in memory: a full disk then fails as a plain OSError (ENOSPC)
    return atomic_write(path, buffer.getbuffer(), durable=True)


def load_checkpoint(path: str | Path, segmenter, identity: str) -> dict:
    """Load trained parts into ``segmenter``, whose model's identity is ``identity``; returns the checkpoint's
    metadata.

    Raises:
        CheckpointError: unreadable file, unknown format, or a checkpoint trained under another identity
            (another CLIP, or another dense method), naming both; the message names the file, not its folder
            (it may reach HTTP answers).
    """
    name = Path(path).name
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{name} is unreadable ({_first_line(error).replace(str(path), name)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{name} is not a {FORMAT} v{VERSION} checkpoint")
    trained_under = payload.get("identity") or f"{payload.get('clip')} (a dense method it does not name)"
    if trained_under != identity:
        raise CheckpointError(f"{name} was trained under {trained_under}, not {identity}: its decoder expects "
                              "other features")
    missing = set(segmenter.trainable_state_dict()) - set(payload["state_dict"])
    if missing:
        raise CheckpointError(f"{name} lacks {sorted(missing)[:3]}...")
    segmenter.load_state_dict(payload["state_dict"], strict=False)
    # Checkpoints from before the ensemble name their training labels in the metadata only.
    segmenter.trained_labels = tuple(payload.get("trained_labels") or payload["metadata"].get("classes") or ()) or None
    return payload["metadata"]


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{error.__class__.__name__}: {text[0][:120]}" if text else error.__class__.__name__
