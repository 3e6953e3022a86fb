"""What every segmentation control tag shares: its binding in the label config, and its regions."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

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
        score_threshold: regions scoring below it are left out.
    """

    tag: ClassVar[str]  # the label config's tag, e.g. "BrushLabels"
    result_type: ClassVar[str]  # the ``type`` of its results, e.g. "brushlabels"
    min_area: ClassVar[int] = 16  # predicted parts smaller than this many pixels are specks

    control: str
    image: str
    data_key: str
    vocabulary: Vocabulary
    score_threshold: float

    # ------------------------------------------------------------------ prediction → results
    def regions(self, prediction: SemanticPrediction) -> Iterator[tuple[int, str, float]]:
        """(vocabulary index, label, score) of each predicted label whose score passes the threshold."""
        for index, score in prediction.region_scores.items():
            if score >= self.score_threshold:
                yield index, self.vocabulary.labels[index], score

    def result(self, label: str, value: dict, score: float, height: int, width: int) -> dict:
        """One Label Studio result (a region) of this tag."""
        return {
            "id": uuid.uuid4().hex[:10],
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
