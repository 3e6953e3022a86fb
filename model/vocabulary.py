"""Class names → prompt texts → CLIP text embeddings, cached in memory and on disk."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from model.files import atomic_write

log = logging.getLogger(__name__)

# A small prompt ensemble in the spirit of CLIP's ImageNet templates; words a scene parser needs.
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a rendering of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a photo of {}.",
)


# The vocabulary index of a pixel no label covers: unpredicted in a label map, unannotated in training.
UNLABELED = -1
# In a training crop, a pixel the annotation leaves unpainted where its tag names other things the images show
# (:attr:`Vocabulary.others`): it is one of them, whichever.
BACKGROUND = -2


class EmptyVocabulary(ValueError):
    pass


@dataclass(frozen=True)
class Vocabulary:
    """The labels a project segments, each with the texts that describe it.

    Attributes:
        labels: label values exactly as in the Label Studio config, in config order, then the ``others``.
        texts: per label, the texts whose embeddings are averaged (the label itself first,
            then its ``predicted_values``).
        others: how many of the last labels are other things the images show (a control tag's
            ``model_background``): classified beside the project's labels, so that a pixel of none of them
            has somewhere to go, and never served (:meth:`model.predictor.SemanticPrediction.served`).
    """

    labels: tuple[str, ...]
    texts: tuple[tuple[str, ...], ...] = field(default=())
    others: int = 0

    def __post_init__(self):
        if not self.labels:
            raise EmptyVocabulary("the vocabulary is empty: the label config defines no labels")
        if not self.texts:
            object.__setattr__(self, "texts", tuple((label,) for label in self.labels))
        if len(self.texts) != len(self.labels):
            raise ValueError("one tuple of texts per label is required")
        if not 0 <= self.others < len(self.labels):
            raise EmptyVocabulary("the vocabulary is empty: every label is another thing")

    @classmethod
    def from_labels(cls, labels, extra_texts: dict[str, list[str]] | None = None, others=()) -> "Vocabulary":
        """``others``: other things the images show (:attr:`others`); one that is also a label is the label."""
        extra_texts = extra_texts or {}
        labels = tuple(dict.fromkeys(labels))
        others = tuple(other for other in dict.fromkeys(others) if other not in labels)
        texts = tuple(tuple(dict.fromkeys([label, *extra_texts.get(label, [])])) for label in labels + others)
        return cls(labels + others, texts, len(others))

    @classmethod
    def merge(cls, vocabularies) -> "Vocabulary":
        """One vocabulary with every label of ``vocabularies``, in order of first appearance, then their other
        things that no vocabulary has as a label; a label found in several keeps all their texts."""
        labels: dict[str, list[str]] = {}
        others: dict[str, list[str]] = {}
        for vocabulary in vocabularies:
            served = len(vocabulary.served)
            for index, (label, label_texts) in enumerate(zip(vocabulary.labels, vocabulary.texts, strict=True)):
                (labels if index < served else others).setdefault(label, []).extend(label_texts)
        others = {other: texts for other, texts in others.items() if other not in labels}
        return cls(tuple(labels) + tuple(others),
                   tuple(tuple(dict.fromkeys(t)) for t in (*labels.values(), *others.values())), len(others))

    @property
    def served(self) -> tuple[str, ...]:
        """The project's labels: those a prediction may draw."""
        return self.labels[:len(self.labels) - self.others]

    @property
    def key(self) -> str:
        """A short stable hash of labels and texts (and how many are other things, where any are)."""
        payload = json.dumps([self.labels, self.texts, *([self.others] if self.others else [])])
        return hashlib.sha1(payload.encode()).hexdigest()[:10]

    def __len__(self) -> int:
        return len(self.labels)


class LRU(OrderedDict):
    """A dict that keeps its ``maxsize`` most recently used entries."""

    def __init__(self, maxsize: int):
        super().__init__()
        self.maxsize = maxsize

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)


class TextEncoder:
    """Embeds texts with a CLIP text tower through a prompt-template ensemble.

    Embeddings are cached in memory (the ``max_vocabularies`` most recently used vocabularies
    and the texts of about as many), and each vocabulary's are written to ``cache_dir`` so
    that a restarted service runs no text forward for it; that folder is kept under
    ``max_disk_bytes`` by deleting the least recently used files. The caches are optional: a
    failed write is logged and prediction goes on. ``forward_count`` counts text-tower
    forwards (tests use it to prove caching).
    """

    def __init__(self, clip, cache_dir: Path | None = None, templates=TEMPLATES, batch_size: int = 256,
                 max_vocabularies: int = 64, max_disk_bytes: int = 256 * 2**20):
        self.clip = clip
        self.templates = tuple(templates)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size
        self.max_disk_bytes = max_disk_bytes
        self.forward_count = 0
        self._memory = LRU(max_vocabularies * 256)  # text → (D,)
        self._classes = LRU(max_vocabularies)  # vocabulary key → (C, D)
        self._lock = threading.Lock()  # the memory caches
        self._disk_lock = threading.Lock()  # the disk cache's writes and trimming
        self._namespace = hashlib.sha1(json.dumps([clip.identity, self.templates]).encode()).hexdigest()[:10]

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        """(N, D) normalised template-ensembled embeddings; runs the text tower."""
        prompts = [template.format(text) for text in texts for template in self.templates]
        device = next(self.clip.model.parameters()).device
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.clip.tokenizer(prompts[start:start + self.batch_size]).to(device)
            chunks.append(F.normalize(self.clip.model.encode_text(tokens).float(), dim=-1))
            self.forward_count += 1
        per_prompt = torch.cat(chunks).view(len(texts), len(self.templates), -1)
        # Rows are cloned so that each cached text holds its own storage, not the whole batch's.
        return [row.clone() for row in F.normalize(per_prompt.mean(1), dim=-1).cpu()]

    def _disk_path(self, key: str) -> Path | None:
        return self.cache_dir / "text" / f"{self._namespace}-{key}.pt" if self.cache_dir else None

    def embed_texts(self, texts: list[str], cache_key: str | None = None) -> torch.Tensor:
        """Embeddings of ``texts`` (N, D), from memory, then disk (``cache_key``), then the text tower.

        The lock guards the caches alone, never the text tower: a large new vocabulary being encoded does
        not hold up requests whose vocabularies are cached.
        """
        with self._lock:
            found = {t: self._memory.get(t) for t in dict.fromkeys(texts)}
        missing = [t for t, embedding in found.items() if embedding is None]
        path = self._disk_path(cache_key) if cache_key else None
        if missing and path is not None and path.exists():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                found.update({t: stored[t] for t in missing if t in stored})
                os.utime(path)  # recently used: the disk cap deletes the least recently used first
            except Exception as error:  # a corrupt cache file is rebuilt, never fatal
                log.warning("ignoring unreadable text-embedding cache %s: %s", path.name, error)
            missing = [t for t, embedding in found.items() if embedding is None]
        if missing:
            log.info("encoding %d texts with the CLIP text tower", len(missing))
            found.update(zip(missing, self._encode(missing), strict=True))
            if path is not None:
                with self._disk_lock:
                    self._write_cache(path, found)
        with self._lock:
            for text, embedding in found.items():
                self._memory.put(text, embedding)
        return torch.stack([found[t] for t in texts])

    def _write_cache(self, path: Path, embeddings: dict[str, torch.Tensor]) -> None:
        """Write one vocabulary's file atomically, then trim the folder to ``max_disk_bytes``."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            torch.save(embeddings, buffer)
            atomic_write(path, buffer.getbuffer())
            files = sorted(path.parent.glob("*.pt"), key=lambda f: f.stat().st_mtime, reverse=True)
            total = 0
            for file in files:
                total += file.stat().st_size
                if total > self.max_disk_bytes and file != path:
                    file.unlink(missing_ok=True)
        except OSError as error:
            log.warning("text-embedding cache not written (%s); predictions are not affected",
                        error.strerror or error)

    def embed(self, vocabulary: Vocabulary) -> torch.Tensor:
        """Class embeddings (C, D): per label, the normalised mean over its texts."""
        with self._lock:
            cached = self._classes.get(vocabulary.key)
        if cached is not None:
            return cached
        flat = [t for texts in vocabulary.texts for t in texts]
        embeddings = self.embed_texts(flat, cache_key=vocabulary.key)
        out, start = [], 0
        for texts in vocabulary.texts:
            out.append(F.normalize(embeddings[start:start + len(texts)].mean(0), dim=-1))
            start += len(texts)
        classes = torch.stack(out)
        with self._lock:
            self._classes.put(vocabulary.key, classes)
        return classes
