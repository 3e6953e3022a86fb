"""Label config → segmentation targets (control tag, image tag, vocabulary, threshold)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from label_studio_sdk.label_interface import LabelInterface

from model.vocabulary import Vocabulary

SEGMENTATION_TAGS = ("BrushLabels", "PolygonLabels")


class LabelConfigError(ValueError):
    """The label config can't be served by this backend; the message says why."""


@dataclass(frozen=True)
class Target:
    """One segmentation control tag bound to an image.

    Attributes:
        control: the control tag's name (``from_name`` in results).
        control_type: ``BrushLabels`` or ``PolygonLabels``.
        image: the Image tag's name (``to_name``).
        data_key: the task-data key holding the image (``$image`` → ``image``).
        vocabulary: the labels and their prompt texts.
        score_threshold: regions scoring below it are left out.
    """

    control: str
    control_type: str
    image: str
    data_key: str
    vocabulary: Vocabulary
    score_threshold: float


def _threshold(raw: str | None, control: str) -> float:
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise LabelConfigError(f"model_score_threshold={raw!r} on <{control}> is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise LabelConfigError(f"model_score_threshold={raw!r} on <{control}> must be between 0 and 1")
    return value


@lru_cache(maxsize=64)
def parse_targets(label_config: str) -> tuple[Target, ...]:
    """Every BrushLabels/PolygonLabels tag bound to an Image in ``label_config``.

    Raises:
        LabelConfigError: malformed XML, no segmentation tag, or a tag without labels.
    """
    if not label_config or not label_config.strip():
        raise LabelConfigError("the label config is empty")
    try:
        interface = LabelInterface(label_config)
    except Exception as error:
        raise LabelConfigError(f"the label config can't be parsed: {error}") from None
    targets = []
    for control in interface.controls:
        if control.tag not in SEGMENTATION_TAGS:
            continue
        images = [obj for obj in control.objects if obj.tag == "Image"]
        if not images:
            continue
        labels = list(control.labels_attrs)
        if not labels:
            raise LabelConfigError(f"<{control.tag} name=\"{control.name}\"> has no <Label> values: the vocabulary is empty")
        extra = {
            value: [t.strip() for t in label.attr.get("predicted_values", "").split(",") if t.strip()]
            for value, label in control.labels_attrs.items()
        }
        targets.append(Target(
            control=control.name,
            control_type=control.tag,
            image=images[0].name,
            data_key=images[0].value_name,
            vocabulary=Vocabulary.from_labels(labels, extra),
            score_threshold=_threshold(control.attr.get("model_score_threshold"), control.name),
        ))
    if not targets:
        raise LabelConfigError(
            "the label config has no BrushLabels or PolygonLabels tag bound to an Image tag; "
            "this backend predicts semantic segmentation masks (see labeling_config/ for examples)"
        )
    return tuple(targets)
