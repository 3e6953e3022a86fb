"""Training jobs in child processes: one per project at a time, requests coalesced.

A request while the project's job runs sets a ``pending`` flag; when the job ends, one
more job starts and sees every annotation that arrived meanwhile. A job that crashes or
is killed is reported (``state: failed``) and changes nothing the service serves: only a
finished job registers a new version.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from backend.settings import Settings
from backend.store import Store

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


class TrainingJobs:
    def __init__(self, settings: Settings, store: Store, env: dict | None = None):
        self.settings = settings
        self.store = store
        self.env = env or {}
        self._lock = threading.Lock()
        self._running: dict[str, subprocess.Popen] = {}
        self._pending: dict[str, bool] = {}  # project → pull annotations first
        self._last: dict[str, dict] = {}

    def configure(self, **env: str) -> None:
        """Environment for later jobs (e.g. the Label Studio URL and token learnt from /setup)."""
        self.env.update({k: v for k, v in env.items() if v})

    def request(self, project: str, pull: bool = False) -> str:
        """Start a job for ``project`` now, or queue one after the running job."""
        with self._lock:
            if project in self._running:
                self._pending[project] = self._pending.get(project, False) or pull
                return "queued"
            self._start(project, pull)
            return "started"

    def _start(self, project: str, pull: bool) -> None:
        args = [sys.executable, "-m", "backend.training", "--project", project] + (["--pull"] if pull else [])
        directory = self.store.project_dir(project)
        directory.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings.to_env(), **self.env}
        log_file = open(directory / "training.log", "ab")
        process = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        log_file.close()
        self._running[project] = process
        log.info("project %s: training job started (pid %d)", project, process.pid)
        threading.Thread(target=self._watch, args=(project, process), daemon=True).start()

    def _watch(self, project: str, process: subprocess.Popen) -> None:
        code = process.wait()
        progress = self._progress(project)
        with self._lock:
            del self._running[project]
            if code == 0:
                self._last[project] = {"state": "finished", "finished": time.time(), **progress}
                log.info("project %s: training job finished: %s", project, progress.get("version"))
            else:
                error = progress.get("error") or f"the training process exited with code {code}"
                self._last[project] = {"state": "failed", "finished": time.time(), "error": error}
                log.error("project %s: training job failed: %s (see %s)", project, error,
                          self.store.project_dir(project) / "training.log")
            if project in self._pending:
                self._start(project, self._pending.pop(project))

    def _progress(self, project: str) -> dict:
        try:
            return json.loads((self.store.project_dir(project) / "job.json").read_text())
        except (OSError, ValueError):
            return {}

    def running(self, project: str) -> subprocess.Popen | None:
        return self._running.get(project)

    def status(self) -> dict:
        with self._lock:
            projects = set(self._running) | set(self._last) | set(self._pending)
            out = {}
            for project in sorted(projects):
                if project in self._running:
                    entry = {**self._progress(project), "state": "running", "pid": self._running[project].pid}
                else:
                    entry = dict(self._last.get(project, {}))
                entry["queued"] = project in self._pending
                out[project] = entry
            return out

    def wait(self, project: str, timeout: float = 600) -> None:
        """Block until the project has no running or queued job (tests, command line)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                if project not in self._running and project not in self._pending:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"training for project {project} still running after {timeout}s")
