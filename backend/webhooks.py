"""Label Studio's webhooks: annotations stored (validated first) and deleted, training started.

Webhooks are unauthenticated unless basic auth is set, so everything they bring is checked and
bounded before it is kept: a label config is parsed before it is stored, annotations are validated,
a deletion names at most :data:`MAX_DELETED_ANNOTATIONS` ids, and training is only for projects
Label Studio set up (:class:`backend.projects.Projects`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from backend.annotations import AnnotationError, validate_results
from backend.errors import ServiceError
from backend.label_config import LabelConfigError, parse_targets
from backend.payloads import id_of, json_object, label_config_of, project_of
from backend.projects import Projects
from backend.prometheus import Metrics
from backend.settings import Settings
from backend.store import Store

log = logging.getLogger(__name__)

# Label Studio's webhook actions (webhooks/models.py): others are counted as "other".
WEBHOOK_ACTIONS = {"PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED", "TASKS_CREATED", "TASKS_DELETED",
                   "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED",
                   "ANNOTATIONS_DELETED", "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED",
                   "START_TRAINING"}
MAX_DELETED_ANNOTATIONS = 100_000  # ids in one deletion event (deleted in one transaction)


@dataclass
class WebhookHandler:
    settings: Settings
    store: Store
    projects: Projects
    metrics: Metrics

    def handle(self, payload: dict) -> dict:
        """Store annotation events and start training; answers at once (Label Studio waits ~1 s)."""
        action = payload.get("action")
        if not action or not isinstance(action, str):
            raise ServiceError("webhook payload without an 'action'")
        project_info = json_object(payload, "project")
        annotation = json_object(payload, "annotation")
        task = json_object(payload, "task")
        project = project_of(project_info or task.get("project") or annotation.get("project"))
        answer = {"status": "ok", "action": action, "project": project}
        label_config = label_config_of(project_info) if project_info else ""
        if label_config:
            answer["label_config"] = self._keep_config(project, label_config)
        self.metrics.webhook(action, known=action in WEBHOOK_ACTIONS)
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            self._store_annotation(action, project, annotation, task, answer)
        elif action in ("ANNOTATION_DELETED", "ANNOTATIONS_DELETED"):
            self._delete_annotations(action, project, payload.get("annotations") or [annotation])
        elif action == "START_TRAINING":
            if not project:
                raise ServiceError("START_TRAINING without a project")
            # The event carries no annotations: the job pulls them from Label Studio's API.
            answer["training"] = self.projects.train(project, pull=True)
        else:
            answer["status"] = "ignored"
        log.info("webhook %s for project %s: %s", action, project or "?", answer["status"])
        return answer

    def _keep_config(self, project: str, label_config: str) -> str:
        """Store the event's label config if it parses (the event is answered either way)."""
        try:
            parse_targets(label_config)
        except LabelConfigError as error:
            return f"not stored: {error}"
        self.projects.remember_config(project, label_config)
        return "stored"

    def _store_annotation(self, action: str, project: str, annotation: dict, task: dict, answer: dict) -> None:
        """Validate and store a created or updated annotation; start training when enough changed."""
        if not project or "id" not in annotation:
            raise ServiceError(f"{action} without a project or an annotation id")
        annotation = {**annotation, "id": id_of(annotation.get("id"), "annotation")}
        if task.get("id") is not None:
            task = {**task, "id": id_of(task["id"], "task")}
        if not isinstance(task.get("data", {}), dict):
            raise ServiceError(f"{action}: the task's 'data' must be an object")
        if annotation.get("was_cancelled"):
            # A skipped task says nothing of its image: stored, its empty result would read "none of the labels is
            # here" where the tag names other things (backend.training.build_samples).
            self.store.delete_annotations(project, [annotation["id"]])
            answer["annotation"] = "not stored: the task was skipped"
            return
        try:
            validate_results(annotation.get("result") or [], self.settings.max_image_pixels)
        except AnnotationError as error:
            raise ServiceError(f"{action}: annotation {annotation['id']} of task {str(task.get('id'))[:20]}: "
                               f"{error}; nothing was stored") from None
        self.store.upsert_annotation(project, annotation, task)
        threshold = self.settings.train_after_annotations
        if threshold and self.store.changes_since_training(project) >= threshold:
            answer["training"] = self.projects.train(project, pull=False)

    def _delete_annotations(self, action: str, project: str, deleted) -> None:
        if not isinstance(deleted, list) or not all(isinstance(a, dict) for a in deleted):
            raise ServiceError(f"{action}: 'annotations' must be a list of objects")
        if len(deleted) > MAX_DELETED_ANNOTATIONS:
            raise ServiceError(f"{action} names {len(deleted)} annotations; at most {MAX_DELETED_ANNOTATIONS} "
                               "in one event")
        ids = [id_of(a.get("id"), "annotation") for a in deleted if "id" in a]  # all checked before any is deleted
        self.store.delete_annotations(project, ids)
