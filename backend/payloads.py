"""Reading Label Studio's ML-backend payloads: each malformed part is a :class:`ServiceError` (a 400) in words."""
from __future__ import annotations

from backend.control_tags import ControlTag
from backend.errors import ServiceError
from backend.label_config import LabelConfigError, parse_targets
from backend.store import ProjectIdError, integer_id, project_key


def json_object(payload: dict, key: str) -> dict:
    """``payload[key]`` as a JSON object ({} when absent)."""
    value = payload.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ServiceError(f"'{key}' must be a JSON object, not {type(value).__name__}")
    return value


def label_config_of(payload: dict) -> str:
    """The label config a payload carries (``schema`` or ``label_config``; "" when none)."""
    value = payload.get("schema") or payload.get("label_config") or ""
    if not isinstance(value, str):
        raise ServiceError(f"the label config ('schema' or 'label_config') must be a string, not {type(value).__name__}")
    return value


def project_of(value) -> str:
    """The project key (:func:`backend.store.project_key`) of a payload's project id or object."""
    try:
        return project_key(value)
    except ProjectIdError as error:
        raise ServiceError(str(error)) from None


def id_of(value, what: str) -> int:
    """A task or annotation id (:func:`backend.store.integer_id`)."""
    try:
        return integer_id(value, what)
    except ValueError as error:
        raise ServiceError(str(error)) from None


def targets_of(label_config: str) -> tuple[ControlTag, ...]:
    """The label config's segmentation targets (:func:`backend.label_config.parse_targets`)."""
    try:
        return parse_targets(label_config)
    except LabelConfigError as error:
        raise ServiceError(str(error), 400) from None


def task_name(task: dict) -> str:
    """How an error names a task: ``task 7``."""
    return f"task {str(task.get('id'))[:20]}"
