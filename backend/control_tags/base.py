"""What every segmentation control tag shares: its binding in the label config, and its regions."""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from model.config import RegionRules
from model.predictor import SemanticPrediction
from model.vocabulary import Vocabulary


class AnnotationError(ValueError):
    """An annotation this backend can't learn from; the message says which region and why."""


@dataclass(frozen=True)
class ControlTag:
    """One segmentation control tag of a label config, bound to an Image tag.

    A subclass per tag (see :mod:`backend.control_tags`) knows the three things that differ
    between tags: whether a config's tag is its own (:attr:`tag`), how a prediction becomes
    Label Studio results (:meth:`build`), and how a result becomes a mask again (:meth:`mask`,
    checked first by :meth:`check`).

    Attributes:
        control: the control tag's name (``from_name`` in results).
        image: the Image tag's name (``to_name``).
        data_key: the task-data key holding the image (``$image`` → ``image``).
        vocabulary: the labels and their prompt texts.
        score_threshold: the tag's ``model_score_threshold``: its regions' least score (None: the
            backend's ``MIN_REGION_SCORE``).
        min_region_area: the tag's ``model_min_region_area``: its regions' least share of the image
            (None: the backend's ``MIN_REGION_AREA``).
    """

    tag: ClassVar[str]  # the label config's tag, e.g. "BrushLabels"
    result_type: ClassVar[str]  # the ``type`` of its results, e.g. "brushlabels"
    min_area: ClassVar[int] = 16  # predicted parts smaller than this many pixels are specks

    control: str
    image: str
    data_key: str
    vocabulary: Vocabulary
    score_threshold: float | None = None
    min_region_area: float | None = None

    def rules(self, defaults: RegionRules) -> RegionRules:
        """The pruning this tag's predictions get: its own attributes, else ``defaults``."""
        if self.score_threshold is not None:  # the tag's own threshold holds for every label
            defaults = dataclasses.replace(defaults, min_score=self.score_threshold, unscored=())
        if self.min_region_area is not None:
            defaults = dataclasses.replace(defaults, min_area=self.min_region_area)
        return defaults

    # ------------------------------------------------------------------ prediction → results
    def regions(self, prediction: SemanticPrediction) -> Iterator[tuple[int, str, float]]:
        """(vocabulary index, label, score) of each predicted label scoring at least the tag's own threshold
        (a prediction pruned by :meth:`rules`, as the service makes, has none under it left)."""
        for index, score in prediction.region_scores.items():
            if score >= (self.score_threshold or 0.0):
                yield index, self.vocabulary.labels[index], score

    def result(self, label: str, value: dict, score: float, height: int, width: int, part: int = 0) -> dict:
        """One Label Studio result (a region) of this tag: the ``part``-th region of ``label``.

        Its id is the same in every answer for this tag, label and part. The editor's "accept" of a click's
        suggestion then replaces the pre-label's region of that label instead of adding a second one beside it
        (Label Studio keeps a prediction's result ids as its regions' ids, and an accepted suggestion whose id
        is a region's takes that region's place)."""
        return {
            "id": hashlib.sha1(f"{self.control}\0{label}\0{part}".encode()).hexdigest()[:10],
            "from_name": self.control,
            "to_name": self.image,
            "type": self.result_type,
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {**value, self.result_type: [label]},
            "score": round(score, 4),
        }

    def build(self, prediction: SemanticPrediction) -> list[dict]:
        """The prediction as this tag's results."""
        raise NotImplementedError

    # ------------------------------------------------------------------ results → masks
    @classmethod
    def check(cls, value: dict, height: int, width: int) -> None:
        """Raise :class:`AnnotationError` unless ``value`` (of a result declaring height × width)
        can be turned into a mask."""
        raise NotImplementedError

    @classmethod
    def mask(cls, result: dict, height: int, width: int) -> np.ndarray | None:
        """The (height, width) bool mask of one of this tag's results; None when it holds no region."""
        raise NotImplementedError
