"""Text diversification: candidate names per class, filtered per region by the frozen CLIP.

Candidates are the WordNet lemmas of the class name's first noun senses plus the label's
``predicted_values``. WordNet mixes senses ("mouse": the animal, the device), so for
each annotated region the frozen CLIP compares the region's embedding with the
candidates' text embeddings, and only names with softmax probability ≥ ``threshold``
(0.1 in the GKC paper's code) are kept for that region. The class name itself is
always kept.
"""
from __future__ import annotations

import logging
from functools import lru_cache

import torch

from model.vocabulary import Vocabulary

log = logging.getLogger(__name__)


@lru_cache(maxsize=4096)
def _wordnet_synonyms(label: str) -> tuple[str, ...]:
    from model.wordnet import WordNetMissing, noun_synonyms

    try:
        return tuple(noun_synonyms(label))
    except WordNetMissing as error:
        log.warning("text diversification without WordNet: %s", error)
        return (label,)


def candidate_names(vocabulary: Vocabulary) -> list[list[str]]:
    """Per class: its name, its prompt texts, then WordNet lemmas (deduplicated, case-insensitively)."""
    out = []
    for label, texts in zip(vocabulary.labels, vocabulary.texts, strict=True):
        names, seen = [], set()
        for name in (*texts, *_wordnet_synonyms(label)):
            if name.lower() not in seen:
                seen.add(name.lower())
                names.append(name)
        out.append(names)
    return out


def filter_synonyms(region_embedding: torch.Tensor, candidate_text: torch.Tensor, logit_scale: float,
                    threshold: float = 0.1) -> list[int]:
    """Indices of the candidates fitting one region; candidate 0 (the class name) is always kept.

    Args:
        region_embedding: (D,) normalised frozen-CLIP embedding of the region's masked crop.
        candidate_text: (K, D) normalised text embeddings of the class's candidate names.
        logit_scale: CLIP's temperature.
        threshold: minimum softmax probability over the K candidates.
    """
    probabilities = (logit_scale * candidate_text @ region_embedding).softmax(0)
    return sorted({0, *torch.nonzero(probabilities >= threshold).flatten().tolist()})
