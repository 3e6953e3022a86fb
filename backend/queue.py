"""Pre-labeling and training on a job queue (RQ on Redis), taken by workers (``python -m backend.worker``).

Without ``REDIS_URL`` nothing here runs: the backend predicts in its requests and trains in its
own child processes, as on one machine. With it:

* a /predict that can't finish within ``PREDICT_BUDGET_SECONDS`` answers what it has done and
  enqueues the rest in chunks (the service, :meth:`JobQueue.enqueue_tasks`);
* ``backend.prelabel --queue`` enqueues a whole project in chunks and follows them;
* training requests become jobs (:class:`QueuedTrainingJobs`).

A chunk is a list of task ids of one Label Studio project. Its worker predicts the tasks that have
no prediction of its model version yet and posts them to Label Studio, so a chunk may run twice
(a worker killed mid-chunk: RQ retries it once the worker's heartbeat has lapsed) and no task is
predicted twice. Job ids are made from the project and the task ids: enqueueing a chunk that is
still waiting or running adds nothing.

Whoever can write to this Redis chooses what the workers run, so jobs are JSON (RQ's pickle would run
code as it is read) and workers run only their own two functions (:mod:`backend.worker`). The service
waits on Redis for at most ``REDIS_TIMEOUT_SECONDS`` per call and never retries: a hung Redis costs a
training request that long, and /health and /predict nothing (:class:`QueuedTrainingJobs`).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid

from redis import Redis, RedisError
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.settings import Settings

log = logging.getLogger(__name__)

PRELABEL_QUEUE = "gkc-prelabel"
TRAINING_QUEUE = "gkc-training"
WAITING = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
# The jobs workers run (backend.worker.JOBS), by the names they are enqueued under.
PREDICT_CHUNK = "backend.worker.predict_chunk"
TRAIN_PROJECT = "backend.worker.train_project"
SERIALIZER = JSONSerializer


class QueueUnavailable(RuntimeError):
    """Redis did not answer (in time); the message says why."""


class JobQueue:
    """The queues of one Redis, as the service and the ``prelabel`` command use them."""

    def __init__(self, redis_url: str, chunk_size: int = 16, chunk_timeout: int = 1800, retries: int = 3,
                 training_timeout: int = 6 * 3600, timeout: float = 2.0):
        # One try per call, ``timeout`` seconds at most (a worker's RQ widens it for its blocking waits).
        self.connection = Redis.from_url(redis_url, health_check_interval=30, socket_timeout=timeout,
                                         socket_connect_timeout=timeout, retry=RedisRetry(NoBackoff(), 0))
        self.prelabel = Queue(PRELABEL_QUEUE, connection=self.connection, serializer=SERIALIZER)
        self.training = Queue(TRAINING_QUEUE, connection=self.connection, serializer=SERIALIZER)
        self.chunk_size = chunk_size
        self.chunk_timeout = chunk_timeout
        self.retries = retries
        self.training_timeout = training_timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> "JobQueue | None":
        """The queue ``REDIS_URL`` names, or None without one (everything runs in this process)."""
        if not settings.redis_url:
            return None
        return cls(settings.redis_url, settings.queue_chunk_size, settings.queue_chunk_timeout,
                   settings.queue_retries, timeout=settings.redis_timeout_seconds)

    # ------------------------------------------------------------------ pre-labeling
    def enqueue_tasks(self, project: int, task_ids: list[int]) -> list[str]:
        """Enqueue ``task_ids`` of Label Studio project ``project`` in chunks; the chunks' job ids (a chunk
        already waiting or running under the same id is not enqueued again).

        Raises:
            QueueUnavailable: Redis did not answer.
        """
        try:
            return self._enqueue_chunks(project, task_ids)
        except RedisError as error:
            raise QueueUnavailable(f"{error.__class__.__name__}: {error}"[:200]) from None

    def _enqueue_chunks(self, project: int, task_ids: list[int]) -> list[str]:
        ids = []
        for start in range(0, len(task_ids), self.chunk_size):
            chunk = [int(t) for t in task_ids[start:start + self.chunk_size]]
            digest = hashlib.sha1(",".join(map(str, chunk)).encode()).hexdigest()[:16]
            job_id = f"prelabel-{project}-{digest}"
            if self._status(job_id) not in WAITING:
                self.prelabel.enqueue(PREDICT_CHUNK, project, chunk, job_id=job_id,
                                      job_timeout=self.chunk_timeout, retry=Retry(max=self.retries),
                                      result_ttl=7 * 24 * 3600, failure_ttl=7 * 24 * 3600,
                                      description=f"pre-label {len(chunk)} tasks of project {project}")
            ids.append(job_id)
        return ids

    def progress(self, job_ids: list[str], finished: dict[str, dict] | None = None) -> dict[str, int]:
        """How many of the chunks are done (their counts summed), failed for good, or still waiting.
        ``finished``: the results of chunks already seen done, kept there so that a caller polling the
        same chunks fetches each result once."""
        finished = {} if finished is None else finished
        counts = {"chunks_done": 0, "chunks_failed": 0, "chunks_waiting": 0, "predicted": 0, "skipped": 0,
                  "failed": 0}
        pending = [job_id for job_id in job_ids if job_id not in finished]
        for job_id, job in zip(pending, Job.fetch_many(pending, connection=self.connection, serializer=SERIALIZER), strict=True):
            status = job.get_status(refresh=False) if job is not None else None
            if status == JobStatus.FINISHED:
                finished[job_id] = job.return_value() or {}
            elif status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, None):
                counts["chunks_failed"] += 1
            else:
                counts["chunks_waiting"] += 1
        for job_id in job_ids:
            if job_id in finished:
                counts["chunks_done"] += 1
                for key in ("predicted", "skipped", "failed"):
                    counts[key] += finished[job_id].get(key, 0)
        return counts

    def _status(self, job_id: str):
        try:
            return Job.fetch(job_id, connection=self.connection, serializer=SERIALIZER).get_status(refresh=False)
        except NoSuchJobError:
            return None

    # ------------------------------------------------------------------ training
    def enqueue_training(self, project: str, pull: bool) -> str:
        """A training job for ``project``: "queued", or "already queued" when one still waits to start
        (it will see every annotation stored meanwhile)."""
        latest = self.connection.get(_training_key(project))
        if latest and self._status(latest.decode()) == JobStatus.QUEUED:
            return "already queued"
        job_id = f"training-{project}-{uuid.uuid4().hex[:8]}"
        # No retry: a job whose worker dies is reported failed and registers nothing.
        self.training.enqueue(TRAIN_PROJECT, project, pull, job_id=job_id,
                              job_timeout=self.training_timeout, result_ttl=30 * 24 * 3600,
                              failure_ttl=30 * 24 * 3600, description=f"train project {project}")
        self.connection.set(_training_key(project), job_id)
        return "queued"

    def training_status(self) -> dict[str, dict]:
        """Each project's latest training job: its state, and its result or error."""
        out = {}
        for key in self.connection.scan_iter("gkc:training:*"):
            project = key.decode().split(":", 2)[2]
            try:
                job = Job.fetch(self.connection.get(key).decode(), connection=self.connection, serializer=SERIALIZER)
            except (NoSuchJobError, AttributeError):
                continue
            status = job.get_status(refresh=False)
            state = {JobStatus.STARTED: "running", JobStatus.FINISHED: "finished"}.get(status)
            entry = {"state": state or (status.value if status else "unknown"),
                     "job": job.id, "queued": status == JobStatus.QUEUED}
            if status == JobStatus.FINISHED:
                entry.update(job.return_value() or {})
            elif status == JobStatus.FAILED:
                result = job.latest_result()
                error = (result.exc_string or "").strip().splitlines()[-1][:500] if result else "failed"
                entry["error"] = ("its worker stopped before it finished; nothing was registered"
                                  if "AbandonedJobError" in error else error.removeprefix("backend.worker.TrainingFailed: "))
            out[project] = entry
        return out


def _training_key(project: str) -> str:
    return f"gkc:training:{project}"


class QueuedTrainingJobs:
    """:class:`backend.jobs.TrainingJobs`' interface over the queue: training runs on a worker.

    :meth:`status` answers at once from the last status read from Redis, and reads it again in the
    background when it is older than ``max_age`` seconds: /health and /metrics never wait on Redis.
    """

    def __init__(self, queue: JobQueue, max_age: float = 2.0):
        self.queue = queue
        self.max_age = max_age
        self._lock = threading.Lock()
        self._status: dict = {}
        self._read_at = float("-inf")
        self._reading = False
        self.error: str | None = None  # why the last read failed (None: Redis answered)

    def request(self, project: str, pull: bool = False, env: dict | None = None) -> str:
        """Queue a training job; workers take Label Studio's address and token from their own environment."""
        try:
            return self.queue.enqueue_training(project, pull)
        except RedisError as error:
            log.error("project %s: training not queued: %s", project, error)
            return "refused: the job queue (REDIS_URL) is not answering"

    def status(self) -> dict:
        with self._lock:
            if not self._reading and time.monotonic() - self._read_at > self.max_age:
                self._reading = True
                threading.Thread(target=self._read, name="queue-status", daemon=True).start()
            return self._status

    def _read(self) -> None:
        try:
            status, error = self.queue.training_status(), None
        except RedisError as failure:
            status, error = None, f"{failure.__class__.__name__}: {failure}"[:200]
            log.warning("training status unknown: the job queue is not answering (%s)", error)
        with self._lock:
            if status is not None:
                self._status = status
            self.error, self._read_at, self._reading = error, time.monotonic(), False

    @property
    def answering(self) -> bool:
        """Whether Redis answered the last status read (a /predict hands nothing over when it did not)."""
        return self.error is None

    def running(self, project: str):
        return None  # on a worker, not here

    def shutdown(self) -> None:
        pass  # jobs belong to the workers

    def wait(self, project: str, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while self.status().get(project, {}).get("state") in ("queued", "running"):
            if time.time() > deadline:
                raise TimeoutError(f"training for project {project} still running after {timeout}s")
            time.sleep(0.5)
