"""Label config → its segmentation targets: control tags (:mod:`backend.control_tags`) bound to images."""
from __future__ import annotations

from functools import lru_cache

from label_studio_sdk.label_interface import LabelInterface

from backend.control_tags import CONTROL_TAGS, ControlTag, for_tag
from model.vocabulary import Vocabulary


class LabelConfigError(ValueError):
    """The label config can't be served by this backend; the message says why."""


# Bounds before work, each checked before what it would cost (measured on 2 cores): a config parses in
# about 1.2 µs per character (0.6 s at the bound); each new label costs a text-tower pass over its
# prompts once (2 ms per text on the demo CLIP, 190 ms per label on a ViT-B/16 in fp32: 3 minutes at
# the bound, then cached on disk); each vocabulary of an image costs its own image-tower pass.
MAX_LABEL_CONFIG_CHARS = 512 * 1024
MAX_LABELS = 1000  # labels of one control tag
MAX_CONTROL_TAGS = 16  # segmentation tags of one config


def _fraction(control, attribute: str) -> float | None:
    """A control tag's attribute that must be a number in [0, 1]; None when absent."""
    raw = control.attr.get(attribute)
    if raw is None or str(raw).strip() == "":
        return None
    where = f'{attribute}="{str(raw)[:40]}" on <{control.tag} name="{control.name}">'
    try:
        value = float(raw)
    except ValueError:
        raise LabelConfigError(f"{where} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise LabelConfigError(f"{where} must be between 0 and 1")
    return value


@lru_cache(maxsize=64)
def parse_targets(label_config: str) -> tuple[ControlTag, ...]:
    """Every segmentation control tag (``CONTROL_TAGS``) bound to an Image in ``label_config``.

    Raises:
        LabelConfigError: malformed XML, no segmentation tag, or a tag without labels.
    """
    if not label_config or not label_config.strip():
        raise LabelConfigError("the label config is empty")
    if len(label_config) > MAX_LABEL_CONFIG_CHARS:
        raise LabelConfigError(f"the label config has {len(label_config)} characters; at most "
                               f"{MAX_LABEL_CONFIG_CHARS} are served")
    try:
        interface = LabelInterface(label_config)
    except Exception as error:
        raise LabelConfigError(f"the label config can't be parsed: {error}") from None
    targets = []
    for control in interface.controls:
        cls = for_tag(control.tag)
        if cls is None:
            continue
        images = [obj for obj in control.objects if obj.tag == "Image"]
        if not images:
            continue
        labels = list(control.labels_attrs)
        if not labels:
            raise LabelConfigError(f"<{control.tag} name=\"{control.name}\"> has no <Label> values: the vocabulary is empty")
        # What else the images show: classified beside the labels, so a pixel of none of them is left unlabeled.
        others = [t.strip() for t in str(control.attr.get("model_background", "")).split(",") if t.strip()]
        if len(labels) + len(others) > MAX_LABELS:
            besides = f" and {len(others)} model_background names" if others else ""
            raise LabelConfigError(f"<{control.tag} name=\"{control.name[:40]}\"> has {len(labels)} labels{besides}; "
                                   f"at most {MAX_LABELS} are served")
        if len(targets) == MAX_CONTROL_TAGS:
            raise LabelConfigError(f"the label config has more than {MAX_CONTROL_TAGS} segmentation tags; each "
                                   "vocabulary costs its own image-tower pass")
        extra = {
            value: [t.strip() for t in label.attr.get("predicted_values", "").split(",") if t.strip()]
            for value, label in control.labels_attrs.items()
        }
        targets.append(cls(
            control=control.name,
            image=images[0].name,
            data_key=images[0].value_name,
            vocabulary=Vocabulary.from_labels(labels, extra, others),
            score_threshold=_fraction(control, "model_score_threshold"),
            min_region_area=_fraction(control, "model_min_region_area"),
        ))
    if not targets:
        raise LabelConfigError(
            f"the label config has no {' or '.join(c.tag for c in CONTROL_TAGS)} tag bound to an Image tag; "
            "this backend predicts semantic segmentation masks (see labeling_config/ for examples)"
        )
    return tuple(targets)


SMART_TAGS = ("KeyPointLabels", "RectangleLabels")  # the tools whose smart copies send clicks and boxes here


@lru_cache(maxsize=64)
def has_smart_tools(label_config: str) -> bool:
    """Whether an annotator of this config can click or draw boxes for the backend: a ``KeyPointLabels`` or
    ``RectangleLabels`` on an Image whose smart copy Label Studio makes (it does unless ``smart="false"``).
    Only then is an opened task's pass worth keeping for clicks (``label_config`` parsed by
    :func:`parse_targets` first)."""
    interface = LabelInterface(label_config)
    return any(control.tag in SMART_TAGS and str(control.attr.get("smart", "true")).lower() != "false"
               and any(obj.tag == "Image" for obj in control.objects) for control in interface.controls)
