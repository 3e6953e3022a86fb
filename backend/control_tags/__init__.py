"""The segmentation control tags this backend serves, one module each.

Adding a tag is one module: a :class:`ControlTag` subclass listed in ``CONTROL_TAGS``.
The registry below serves label-config parsing, prediction and training alike.
"""
from __future__ import annotations

from backend.control_tags.base import AnnotationError, ControlTag
from backend.control_tags.brush_labels import BrushLabels
from backend.control_tags.polygon_labels import PolygonLabels

CONTROL_TAGS: tuple[type[ControlTag], ...] = (BrushLabels, PolygonLabels)
_BY_TAG = {cls.tag: cls for cls in CONTROL_TAGS}
_BY_RESULT_TYPE = {cls.result_type: cls for cls in CONTROL_TAGS}


def for_tag(tag: str) -> type[ControlTag] | None:
    """The class serving a label config's tag (e.g. ``BrushLabels``), or None."""
    return _BY_TAG.get(tag)


def for_result_type(result_type) -> type[ControlTag] | None:
    """The class whose results have this ``type`` (e.g. ``brushlabels``), or None."""
    return _BY_RESULT_TYPE.get(result_type) if isinstance(result_type, str) else None


__all__ = ["CONTROL_TAGS", "AnnotationError", "BrushLabels", "ControlTag", "PolygonLabels", "for_result_type",
           "for_tag"]
