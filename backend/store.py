"""Per-project state in ``MODEL_DIR``: annotations, model versions, the label config.

One SQLite database (``MODEL_DIR/backend.sqlite``, WAL mode): every write is a
transaction, so a crash loses nothing that was acknowledged. Checkpoint files live in
``MODEL_DIR/projects/<project>/`` and are registered here only after they are complete.
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS annotations (
    project TEXT NOT NULL, annotation_id INTEGER NOT NULL, task_id INTEGER, task_data TEXT NOT NULL,
    result TEXT NOT NULL, updated REAL NOT NULL, PRIMARY KEY (project, annotation_id));
CREATE TABLE IF NOT EXISTS projects (
    project TEXT PRIMARY KEY, label_config TEXT, changes_since_training INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS versions (
    project TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, created REAL NOT NULL,
    summary TEXT NOT NULL, PRIMARY KEY (project, version));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_PROJECT_ID = re.compile(r"([0-9]{1,18})(\.[0-9]{1,30})?")  # ASCII digits: "²" is a digit to \d
_SET_UP = "set_up:"  # meta key prefix of the projects Label Studio's /setup has named
_ANNOTATE_NEXT = "annotate_next:"  # meta key prefix of each project's active-learning batch
_KEEP_VERSIONS = "keep_versions:"  # meta key prefix of how many model versions' predictions a renewal keeps
MAX_ID = 2**63 - 1  # SQLite's INTEGER; Label Studio's ids are 64-bit too


class ProjectIdError(ValueError):
    """A project id that is not Label Studio's (an integer); it never reaches the filesystem."""


def integer_id(value, what: str) -> int:
    """A task or annotation id as Label Studio sends it (an integer, or its ASCII digits), within 64 bits.

    Raises:
        ValueError: anything else, naming ``what`` and the value.
    """
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise ValueError(f"{what} id {str(value)[:20]!r} is not an integer id (0 to 2**63-1)")
    return value


def project_key(project) -> str:
    """Label Studio names a project ``12`` in webhooks and ``12.1700000000`` in /predict: keep the id.

    Returns "" when no project is named. Project ids become directory names, so anything but
    an integer (or Label Studio's ``<id>.<created_at>``) is refused.
    """
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or project == "":
        return ""
    if isinstance(project, int) and not isinstance(project, bool) and 0 <= project < 10**18:
        return str(project)
    match = _PROJECT_ID.fullmatch(project) if isinstance(project, str) else None
    if match is None:
        raise ProjectIdError(f"project id {str(project)[:40]!r} is not a Label Studio project id "
                             "(an integer such as 12, or \"12.1699999999\")")
    return str(int(match.group(1)))


@dataclass
class Version:
    project: str
    version: int
    path: Path
    created: float
    summary: dict

    @property
    def name(self) -> str:
        return f"v{self.version}"


class Store:
    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.model_dir / "backend.sqlite", timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    def project_dir(self, project: str) -> Path:
        if not (project.isascii() and project.isdigit()):  # project_key() made it; never a path
            raise ProjectIdError(f"project id {project[:40]!r} can't name a directory")
        return self.model_dir / "projects" / project

    # ------------------------------------------------------------------ annotations
    def upsert_annotation(self, project: str, annotation: dict, task: dict) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO annotations VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(project, annotation_id) DO UPDATE "
                "SET task_id=excluded.task_id, task_data=excluded.task_data, result=excluded.result, "
                "updated=excluded.updated",
                (project, int(annotation["id"]), task.get("id"), json.dumps(task.get("data") or {}),
                 json.dumps(annotation.get("result") or []), time.time()))
            self._count_change(db, project)

    def delete_annotations(self, project: str, annotation_ids: list[int]) -> None:
        """Delete these annotations in one transaction (each one stored counts as a change)."""
        with self._db() as db:
            deleted = db.executemany("DELETE FROM annotations WHERE project=? AND annotation_id=?",
                                     [(project, int(annotation_id)) for annotation_id in annotation_ids]).rowcount
            db.execute("INSERT INTO projects (project, changes_since_training) VALUES (?, ?) ON CONFLICT(project) "
                       "DO UPDATE SET changes_since_training = changes_since_training + excluded.changes_since_training",
                       (project, max(deleted, 0)))

    def replace_annotations(self, project: str, tasks: list[dict]) -> int:
        """Make the stored annotations exactly those in ``tasks`` (Label Studio's JSON export)."""
        rows = [(project, int(a["id"]), t.get("id"), json.dumps(t.get("data") or {}), json.dumps(a.get("result") or []),
                 time.time())
                for t in tasks for a in t.get("annotations") or [] if not a.get("was_cancelled")]
        with self._db() as db:
            db.execute("DELETE FROM annotations WHERE project=?", (project,))
            db.executemany("INSERT INTO annotations VALUES (?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def annotations(self, project: str) -> list[dict]:
        """Latest annotation per task: ``{"task_id", "data", "result"}``."""
        rows = self._db().execute(
            "SELECT task_id, task_data, result FROM annotations WHERE project=? ORDER BY updated", (project,))
        latest = {}
        for task_id, data, result in rows:
            latest[task_id] = {"task_id": task_id, "data": json.loads(data), "result": json.loads(result)}
        return list(latest.values())

    def annotation_counts(self) -> dict[str, dict[str, int]]:
        """Per project: stored annotations and annotation changes since the last training."""
        rows = self._db().execute(
            "SELECT p.project, (SELECT COUNT(*) FROM annotations a WHERE a.project = p.project), "
            "p.changes_since_training FROM projects p")
        return {project: {"stored": stored, "changes_since_training": changes} for project, stored, changes in rows}

    def _count_change(self, db: sqlite3.Connection, project: str) -> None:
        db.execute("INSERT INTO projects (project, changes_since_training) VALUES (?, 1) ON CONFLICT(project) "
                   "DO UPDATE SET changes_since_training = changes_since_training + 1", (project,))

    def changes_since_training(self, project: str) -> int:
        row = self._db().execute("SELECT changes_since_training FROM projects WHERE project=?", (project,)).fetchone()
        return row[0] if row else 0

    def reset_changes(self, project: str) -> None:
        with self._db() as db:
            db.execute("UPDATE projects SET changes_since_training=0 WHERE project=?", (project,))

    def set_label_config(self, project: str, label_config: str) -> None:
        with self._db() as db:
            db.execute("INSERT INTO projects (project, label_config) VALUES (?, ?) ON CONFLICT(project) "
                       "DO UPDATE SET label_config=excluded.label_config", (project, label_config))

    def label_config(self, project: str) -> str | None:
        row = self._db().execute("SELECT label_config FROM projects WHERE project=?", (project,)).fetchone()
        return row[0] if row else None

    def mark_set_up(self, project: str) -> None:
        """Label Studio's /setup named this project: it may be trained and handed to the queue's workers."""
        if not self.is_set_up(project):
            self.set_meta(_SET_UP + project, "1")

    def is_set_up(self, project: str) -> bool:
        return self.get_meta(_SET_UP + project) is not None

    def set_annotate_next(self, project: str, batch: int) -> None:
        """The batch of the project's active-learning order (``backend.prelabel --annotate-next``), which each
        training job renews with its new version; 0: no order."""
        self.set_meta(_ANNOTATE_NEXT + project, str(batch))

    def annotate_next(self, project: str) -> int:
        return int(self.get_meta(_ANNOTATE_NEXT + project) or 0)

    def set_keep_versions(self, project: str, count: int) -> None:
        """How many of the model's versions keep their predictions in the project after each renewal of its order
        (``backend.prelabel --keep-versions``); 0: every version."""
        self.set_meta(_KEEP_VERSIONS + project, str(count))

    def keep_versions(self, project: str) -> int:
        return int(self.get_meta(_KEEP_VERSIONS + project) or 0)

    # ------------------------------------------------------------------ service-wide facts
    def get_meta(self, key: str) -> str | None:
        row = self._db().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._db() as db:
            db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (key, value))

    # ------------------------------------------------------------------ versions
    def add_version(self, project: str, summary: dict, save: Callable[[int, Path], object]) -> Version:
        """Register the project's next version: ``save(number, path)`` writes its checkpoint (atomically),
        and only then is the version recorded. Numbers are taken under the database's write lock."""
        db = self._db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            (last,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM versions WHERE project=?", (project,)).fetchone()
            path = self.project_dir(project) / f"v{last + 1}.pt"
            save(last + 1, path)
            created = time.time()
            db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?)",
                       (project, last + 1, str(path), created, json.dumps(summary)))
        return Version(project, last + 1, path, created, summary)

    def versions(self, project: str | None = None) -> list[Version]:
        query = "SELECT project, version, path, created, summary FROM versions"
        rows = self._db().execute(query + (" WHERE project=?" if project else "") + " ORDER BY project, version",
                                  (project,) if project else ())
        return [Version(p, v, Path(path), c, json.loads(s)) for p, v, path, c, s in rows]
