"""What the service needs of training jobs and of a job queue; two implementations each way:

* :class:`backend.local_training.LocalTrainingJobs`: child processes of the service, on one machine
  (no ``REDIS_URL``);
* :class:`backend.rq_jobs.QueuedTrainingJobs` over :class:`backend.rq_jobs.RQJobQueue`: jobs on RQ, taken
  by workers (``python -m backend.worker``). Redis and RQ are imported there and nowhere else.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from backend.settings import Settings
from backend.store import Store


class QueueUnavailable(RuntimeError):
    """The job queue did not answer (in time); the message says why."""


@runtime_checkable
class TrainingJobs(Protocol):
    """Training jobs, one at a time per project; requests for a project with a job waiting coalesce."""

    def request(self, project: str, pull: bool = False, env: dict | None = None) -> str:
        """Ask for a job: "started", "queued", "already queued" or "refused: <why>". ``pull``: its annotations
        come from Label Studio's API; ``env``: the project's Label Studio address and token."""

    def status(self) -> dict[str, dict]:
        """Each project's latest job: its ``state`` and progress, or its result or error. Never waits long."""

    def wait(self, project: str, timeout: float = 600) -> None:
        """Until the project has no job running or waiting (tests, command line)."""

    def shutdown(self) -> None:
        """Stop what this process runs (its jobs register nothing)."""


@runtime_checkable
class JobQueue(Protocol):
    """Pre-labeling chunks and training jobs for workers elsewhere."""

    chunk_size: int

    @property
    def answering(self) -> bool:
        """Whether the queue answered its last call (a /predict hands nothing over when it did not)."""

    @property
    def error(self) -> str | None:
        """Why its last call failed."""

    def enqueue_tasks(self, project: int, task_ids: list[int]) -> list[str]:
        """Enqueue the tasks in chunks; the chunks' ids. Raises :class:`QueueUnavailable`."""

    def progress(self, job_ids: list[str], finished: dict[str, dict] | None = None) -> dict[str, int]:
        """Chunks done, failed and waiting, their predicted, skipped and failed tasks, and the workers taking chunks."""

    def enqueue_training(self, project: str, pull: bool) -> str:
        """A training job for the project: "queued" or "already queued". Raises :class:`QueueUnavailable`."""

    def training_status(self) -> dict[str, dict]:
        """Each project's latest training job, read now. Raises :class:`QueueUnavailable`."""


def job_queue(settings: Settings) -> JobQueue | None:
    """The queue ``REDIS_URL`` names, or None without one (everything runs in this process)."""
    if not settings.redis_url:
        return None
    from backend.rq_jobs import RQJobQueue

    return RQJobQueue.from_settings(settings)


def training_jobs(settings: Settings, store: Store, queue: JobQueue | None,
                  on_end: Callable[[str], None] | None = None) -> TrainingJobs:
    """Training on the queue's workers when there is a queue, else in child processes of this one."""
    if queue is not None:
        from backend.rq_jobs import QueuedTrainingJobs

        return QueuedTrainingJobs(queue)
    from backend.local_training import LocalTrainingJobs

    return LocalTrainingJobs(settings, store, on_end=on_end)
