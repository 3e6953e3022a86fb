"""Class names → prompt texts → CLIP text embeddings, cached in memory and on disk."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

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


class EmptyVocabulary(ValueError):
    pass


@dataclass(frozen=True)
class Vocabulary:
    """The labels a project segments, each with the texts that describe it.

    Attributes:
        labels: label values exactly as in the Label Studio config, in config order.
        texts: per label, the texts whose embeddings are averaged (the label itself first,
            then its ``predicted_values``).
    """

    labels: tuple[str, ...]
    texts: tuple[tuple[str, ...], ...] = field(default=())

    def __post_init__(self):
        if not self.labels:
            raise EmptyVocabulary("the vocabulary is empty: the label config defines no labels")
        if not self.texts:
            object.__setattr__(self, "texts", tuple((label,) for label in self.labels))
        if len(self.texts) != len(self.labels):
            raise ValueError("one tuple of texts per label is required")

    @classmethod
    def from_labels(cls, labels, extra_texts: dict[str, list[str]] | None = None) -> "Vocabulary":
        extra_texts = extra_texts or {}
        labels = tuple(dict.fromkeys(labels))
        texts = tuple(tuple(dict.fromkeys([label, *extra_texts.get(label, [])])) for label in labels)
        return cls(labels, texts)

    @property
    def key(self) -> str:
        """A short stable hash of labels and texts."""
        payload = json.dumps([self.labels, self.texts])
        return hashlib.sha1(payload.encode()).hexdigest()[:10]

    def __len__(self) -> int:
        return len(self.labels)


class TextEncoder:
    """Embeds texts with a CLIP text tower through a prompt-template ensemble.

    Every text's embedding is cached in memory; each vocabulary's embeddings are also
    written to ``cache_dir`` so that a restarted service runs no text forward for it.
    ``forward_count`` counts text-tower forwards (tests use it to prove caching).
    """

    def __init__(self, clip, cache_dir: Path | None = None, templates=TEMPLATES, batch_size: int = 256):
        self.clip = clip
        self.templates = tuple(templates)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size
        self.forward_count = 0
        self._memory: dict[str, torch.Tensor] = {}
        self._classes: dict[str, torch.Tensor] = {}  # vocabulary key → (C, D)
        self._lock = threading.Lock()
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
        return F.normalize(per_prompt.mean(1), dim=-1).cpu()

    def _disk_path(self, key: str) -> Path | None:
        return self.cache_dir / "text" / f"{self._namespace}-{key}.pt" if self.cache_dir else None

    def embed_texts(self, texts: list[str], cache_key: str | None = None) -> torch.Tensor:
        """Embeddings of ``texts`` (N, D), from memory, then disk (``cache_key``), then the text tower."""
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._memory]
            path = self._disk_path(cache_key) if cache_key else None
            if missing and path is not None and path.exists():
                try:
                    self._memory.update(torch.load(path, map_location="cpu", weights_only=True))
                except Exception as error:  # a corrupt cache file is rebuilt, never fatal
                    log.warning("ignoring unreadable text-embedding cache %s: %s", path, error)
                missing = [t for t in missing if t not in self._memory]
            if missing:
                log.info("encoding %d texts with the CLIP text tower", len(missing))
                self._memory.update(zip(missing, self._encode(missing)))
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")
                    torch.save({t: self._memory[t] for t in dict.fromkeys(texts)}, tmp)
                    os.replace(tmp, path)
            return torch.stack([self._memory[t] for t in texts])

    def embed(self, vocabulary: Vocabulary) -> torch.Tensor:
        """Class embeddings (C, D): per label, the normalised mean over its texts."""
        if vocabulary.key in self._classes:
            return self._classes[vocabulary.key]
        flat = [t for texts in vocabulary.texts for t in texts]
        embeddings = self.embed_texts(flat, cache_key=vocabulary.key)
        out, start = [], 0
        for texts in vocabulary.texts:
            out.append(F.normalize(embeddings[start:start + len(texts)].mean(0), dim=-1))
            start += len(texts)
        self._classes[vocabulary.key] = torch.stack(out)
        return self._classes[vocabulary.key]
