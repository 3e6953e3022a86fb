"""Training jobs on this machine, in child processes: at most MAX_TRAINING_JOBS at once, one per project,
requests coalesced.

A request for a project whose job runs, or while the cap is reached, joins a first-come
queue (one entry per project); when a job ends the next queued project starts and sees
every annotation that arrived meanwhile. A job that crashes, is killed or is stopped with
the service is reported (``state: failed``, with the child's own last words) and changes
nothing the service serves: only a finished job registers a new version.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from backend.settings import Settings
from backend.store import Store

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
FAILURE_PREFIX = "training failed: "  # the child's last line when it fails (backend.training.main)


class LocalTrainingJobs:
    """:class:`backend.jobs.TrainingJobs` in child processes of this one; ``on_end(outcome)`` is called as each
    job ends ("finished" or "failed")."""

    def __init__(self, settings: Settings, store: Store, env: dict | None = None,
                 on_end: Callable[[str], None] | None = None):
        self.settings = settings
        self.store = store
        self.env = env or {}
        self._on_end = on_end
        self._lock = threading.Lock()
        self._running: dict[str, subprocess.Popen] = {}
        self._queue: dict[str, tuple[bool, dict]] = {}  # project → (pull annotations first, env); order = turn
        self._last: dict[str, dict] = {}
        self._stopping = False

    def request(self, project: str, pull: bool = False, env: dict | None = None) -> str:
        """Start a job for ``project`` now, or queue one (after its running job, or for a free slot).

        ``env``: the project's own environment for its job (its Label Studio address and token).
        """
        with self._lock:
            if self._stopping:
                return "refused: the service is stopping"
            if project in self._running or project in self._queue or \
                    len(self._running) >= self.settings.max_training_jobs:
                earlier_pull, earlier_env = self._queue.get(project, (False, {}))
                self._queue[project] = (earlier_pull or pull, env or earlier_env)
                return "queued"
            self._start(project, pull, env or {})
            return "started"

    def _start_queued(self) -> None:
        """Start queued projects while slots are free (caller holds the lock)."""
        for project in list(self._queue):
            if self._stopping or len(self._running) >= self.settings.max_training_jobs:
                return
            if project not in self._running:
                self._start(project, *self._queue.pop(project))

    def _start(self, project: str, pull: bool, env: dict) -> None:
        args = [sys.executable, "-m", "backend.training", "--project", project] + (["--pull"] if pull else [])
        directory = self.store.project_dir(project)
        directory.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings.to_env(), **self.env, **env, "GKC_JOB_OF_SERVICE": str(os.getpid())}
        process = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        self._running[project] = process
        log.info("project %s: training job started (pid %d)", project, process.pid)
        threading.Thread(target=self._watch, args=(project, process), daemon=True).start()

    def _watch(self, project: str, process: subprocess.Popen) -> None:
        tail = self._copy_output(project, process)
        code = process.wait()
        progress = self._progress(project)
        with self._lock:
            del self._running[project]
            if code == 0:
                self._last[project] = {"state": "finished", "finished": time.time(), **progress}
                log.info("project %s: training job finished: %s", project, progress.get("version"))
            else:
                error = _failure(code, tail, progress, self._stopping)
                self._last[project] = {"state": "failed", "finished": time.time(), "error": error}
                log.error("project %s: training job failed: %s (see its training.log)", project, error)
            self._start_queued()
            outcome = self._last[project]["state"]
        if self._on_end is not None:
            self._on_end(outcome)

    def _copy_output(self, project: str, process: subprocess.Popen) -> collections.deque:
        """Copy the child's output to ``training.log`` as it comes; keep its last lines in memory,
        so a failure is reported in the child's own words even when the disk is full."""
        tail: collections.deque = collections.deque(maxlen=20)
        try:
            log_file = open(self.store.project_dir(project) / "training.log", "ab")  # noqa: SIM115 (may be dropped mid-loop)
        except OSError as error:
            log.warning("project %s: training.log can't be opened (%s)", project, error.strerror)
            log_file = None
        for line in process.stdout:
            tail.append(line.decode(errors="replace").rstrip())
            try:
                if log_file is not None:
                    log_file.write(line)
                    log_file.flush()
            except OSError:
                log_file = None  # keep reading, or the child would block on a full pipe
        if log_file is not None:
            with contextlib.suppress(OSError):
                log_file.close()
        return tail

    def _progress(self, project: str) -> dict:
        try:
            return json.loads((self.store.project_dir(project) / "job.json").read_text())
        except (OSError, ValueError):
            return {}

    def running(self, project: str) -> subprocess.Popen | None:
        return self._running.get(project)

    def status(self) -> dict:
        with self._lock:
            projects = set(self._running) | set(self._last) | set(self._queue)
            out = {}
            for project in sorted(projects):
                if project in self._running:
                    progress = self._progress(project)
                    # The job's own state is its phase while it works (preparing, training, calibrating,
                    # pre-labeling); once it has written its end (finished or failed), it is only exiting.
                    phase = progress.get("state")
                    entry = {**progress, "state": "running", "pid": self._running[project].pid,
                             **({"phase": phase} if phase not in (None, "finished", "failed") else {})}
                else:
                    entry = dict(self._last.get(project, {}))
                entry["queued"] = project in self._queue
                if project in self._queue and project not in self._running:
                    entry.setdefault("state", "queued")
                out[project] = entry
            return out

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every job and forget the queue: children get SIGTERM, then SIGKILL after ``timeout``.

        A stopped job registers nothing; its annotations stay stored, so the next training
        request sees them all.
        """
        with self._lock:
            self._stopping = True
            self._queue.clear()
            processes = list(self._running.values())
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if processes:
            log.info("stopped %d training job(s)", len(processes))

    def wait(self, project: str, timeout: float = 600) -> None:
        """Block until the project has no running or queued job (tests, command line)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                if project not in self._running and project not in self._queue:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"training for project {project} still running after {timeout}s")


def _failure(code: int, tail, progress: dict, stopping: bool) -> str:
    """Why a job failed, in words: the child's own report if it made one."""
    if stopping:
        return "stopped with the service before it finished"
    for line in reversed(tail):
        if line.startswith(FAILURE_PREFIX):
            return line[len(FAILURE_PREFIX):]
    if progress.get("state") == "failed" and progress.get("error"):
        return progress["error"]
    last = next((line for line in reversed(tail) if line.strip()), "")
    return f"the training process exited with code {code}" + (f": {last[-300:]}" if last else "")
