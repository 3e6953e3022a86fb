"""Pre-labeling and training on a job queue (RQ on Redis), taken by workers (``python -m backend.worker``).

Without ``REDIS_URL`` nothing here runs: the backend predicts in its requests and trains in its
own child processes, as on one machine. With it:

* a /predict that can't finish within ``PREDICT_BUDGET_SECONDS`` answers what it has done and
  enqueues the rest in chunks (the service, :meth:`RQJobQueue.enqueue_tasks`);
* ``backend.prelabel --queue`` enqueues a whole project in chunks and follows them;
* training requests become jobs (:class:`QueuedTrainingJobs`).

A chunk is a list of task ids of one Label Studio project. Its worker predicts the tasks that have
no prediction of its model version yet and posts them to Label Studio, so a chunk may run twice
(a worker killed mid-chunk: RQ retries it once the worker's heartbeat has lapsed) and no task is
predicted twice. Job ids are made from the project and the task ids: enqueueing a chunk that is
still waiting or running adds nothing.

Whoever can write to this Redis chooses what the workers run, so jobs are JSON (RQ's pickle would run
code as it is read) and workers run only the functions they are given (:func:`run_worker`,
:class:`OwnJob`). The service waits on Redis for at most ``REDIS_TIMEOUT_SECONDS`` per call and never
retries: a hung Redis costs a training request that long, and /health and /predict nothing
(:class:`QueuedTrainingJobs`). This module is the only one that imports Redis or RQ.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import ClassVar

import redis
from redis import Redis, RedisError
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry, SimpleWorker, get_current_job, worker_registration
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.jobs import JobQueue, QueueUnavailable
from backend.settings import Settings

log = logging.getLogger(__name__)

PRELABEL_QUEUE = "gkc-prelabel"
TRAINING_QUEUE = "gkc-training"
WAITING = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
# The jobs workers run (backend.worker.JOBS), by the names they are enqueued under.
PREDICT_CHUNK = "backend.worker.predict_chunk"
TRAIN_PROJECT = "backend.worker.train_project"
SERIALIZER = JSONSerializer


class RQJobQueue:
    """:class:`backend.jobs.JobQueue` on the RQ queues of one Redis, as the service and ``prelabel`` use them."""

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
        self._error: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "RQJobQueue":
        return cls(settings.redis_url, settings.queue_chunk_size, settings.queue_chunk_timeout,
                   settings.queue_retries, timeout=settings.redis_timeout_seconds)

    @property
    def answering(self) -> bool:
        return self._error is None

    @property
    def error(self) -> str | None:
        return self._error

    def _call(self, call: Callable, *args):
        """``call(*args)``, remembering whether Redis answered; :class:`QueueUnavailable` when it did not."""
        try:
            value = call(*args)
        except RedisError as error:
            self._error = f"{error.__class__.__name__}: {error}"[:200]
            raise QueueUnavailable(self._error) from None
        self._error = None
        return value

    # ------------------------------------------------------------------ pre-labeling
    def enqueue_tasks(self, project: int, task_ids: list[int]) -> list[str]:
        """Enqueue ``task_ids`` of Label Studio project ``project`` in chunks; the chunks' job ids (a chunk
        already waiting or running under the same id is not enqueued again)."""
        return self._call(self._enqueue_chunks, project, task_ids)

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
        """How many of the chunks are done (their counts summed), failed for good, or still waiting, and how
        many workers take pre-labeling chunks now. ``finished``: the results of chunks already seen done, kept
        there so that a caller polling the same chunks fetches each result once."""
        return self._call(self._progress, job_ids, {} if finished is None else finished)

    def _progress(self, job_ids: list[str], finished: dict[str, dict]) -> dict[str, int]:
        counts = {"chunks_done": 0, "chunks_failed": 0, "chunks_waiting": 0, "predicted": 0, "skipped": 0,
                  "failed": 0, "workers": self._live_workers()}
        pending = [job_id for job_id in job_ids if job_id not in finished]
        jobs = Job.fetch_many(pending, connection=self.connection, serializer=SERIALIZER)
        for job_id, job in zip(pending, jobs, strict=True):
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

    def _live_workers(self) -> int:
        """Workers registered on the pre-labeling queue whose key has not expired: a killed worker stays
        in the queue's set until a living one cleans it, but its key lapses after its ``worker_ttl``."""
        keys = worker_registration.get_keys(queue=self.prelabel)
        return self.connection.exists(*keys) if keys else 0

    def _status(self, job_id: str):
        try:
            return Job.fetch(job_id, connection=self.connection, serializer=SERIALIZER).get_status(refresh=False)
        except NoSuchJobError:
            return None

    # ------------------------------------------------------------------ training
    def enqueue_training(self, project: str, pull: bool) -> str:
        """A training job for ``project``: "queued", or "already queued" when one still waits to start
        (it will see every annotation stored meanwhile)."""
        return self._call(self._enqueue_training, project, pull)

    def _enqueue_training(self, project: str, pull: bool) -> str:
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
        return self._call(self._training_status)

    def _training_status(self) -> dict[str, dict]:
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
            if status == JobStatus.STARTED:  # the worker's copy of its job's progress (phase, step, loss)
                entry.update({k: v for k, v in job.meta.get("progress", {}).items()
                              if k not in ("state", "queued", "pid")})
            elif status == JobStatus.FINISHED:
                entry.update(job.return_value() or {})
            elif status == JobStatus.FAILED:
                result = job.latest_result()
                error = (result.exc_string or "").strip().splitlines()[-1][:500] if result else "failed"
                entry["error"] = ("its worker stopped before it finished; nothing was registered"
                                  if "AbandonedJobError" in error else error.removeprefix("backend.worker.TrainingFailed: "))
            out[project] = entry
        return out


def report_progress(progress: dict) -> None:
    """In a worker's job: keep ``progress`` with the job, where :meth:`RQJobQueue.training_status` reads it. A write
    Redis refuses is left for the next one (the job goes on)."""
    job = get_current_job()
    if job is None:
        return
    job.meta["progress"] = progress
    try:
        job.save_meta()
    except RedisError as error:
        log.warning("job %s: progress not written to the queue: %s", job.id, error)


def _training_key(project: str) -> str:
    return f"gkc:training:{project}"


class QueuedTrainingJobs:
    """:class:`backend.jobs.TrainingJobs` over the queue: training runs on a worker.

    :meth:`status` answers at once from the last status read from the queue, and reads it again in the
    background when it is older than ``max_age`` seconds: /health and /metrics never wait on Redis.
    """

    def __init__(self, queue: JobQueue, max_age: float = 2.0):
        self.queue = queue
        self.max_age = max_age
        self._lock = threading.Lock()
        self._status: dict = {}
        self._read_at = float("-inf")
        self._reading = False

    def request(self, project: str, pull: bool = False, env: dict | None = None) -> str:
        """Queue a training job; workers take Label Studio's address and token from their own environment."""
        try:
            return self.queue.enqueue_training(project, pull)
        except QueueUnavailable as error:
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
            status = self.queue.training_status()
        except QueueUnavailable as error:
            status = None
            log.warning("training status unknown: the job queue is not answering (%s)", error)
        with self._lock:
            if status is not None:
                self._status = status
            self._read_at, self._reading = time.monotonic(), False

    def shutdown(self) -> None:
        pass  # jobs belong to the workers

    def wait(self, project: str, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while self.status().get(project, {}).get("state") in ("queued", "running"):
            if time.time() > deadline:
                raise TimeoutError(f"training for project {project} still running after {timeout}s")
            time.sleep(0.5)


# ---------------------------------------------------------------------------------------------- workers
class ForeignJob(RuntimeError):
    """A job this worker does not run: another function, an instance method or callbacks."""


class OwnJob(Job):
    """An RQ job that can only be one of :attr:`functions`: the function is looked up in that table, never
    imported by name, and callbacks named in Redis are never imported."""

    functions: ClassVar[dict[str, Callable]] = {}

    @property
    def func(self):
        if self.func_name not in self.functions or self.instance is not None:
            raise ForeignJob(f"job {self.id} names {str(self.func_name)[:80]!r}; this worker runs only "
                             f"{', '.join(self.functions)}")
        return self.functions[self.func_name]

    @property
    def success_callback(self):
        return self._refuse_callback(self._success_callback_name)

    @property
    def failure_callback(self):
        return self._refuse_callback(self._failure_callback_name)

    @property
    def stopped_callback(self):
        return self._refuse_callback(self._stopped_callback_name)

    def _refuse_callback(self, name: str | None) -> None:
        if name:
            log.error("job %s names the callback %r; callbacks are never run", self.id, str(name)[:80])


class HeartbeatWorker(SimpleWorker):
    """An RQ worker that runs jobs in its own process (the model stays loaded) and keeps each job's
    heartbeat while it runs, so that a dead worker's job is found within :attr:`heartbeat_ttl`."""

    heartbeat_interval = 30

    @property
    def heartbeat_ttl(self) -> int:
        return 2 * self.heartbeat_interval

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.heartbeat_ttl

    def perform_job(self, job: Job, queue) -> bool:
        try:
            job.func_name  # noqa: B018 (reads the job's data: a job that is not JSON is refused here)
        except DeserializationError:
            log.error("job %s is not a JSON job of this backend; it is not run", job.id)
            self.handle_job_failure(job, queue, exc_string="not a JSON job of this backend; refused")
            return False
        done = threading.Event()

        def beat():
            while not done.wait(self.heartbeat_interval):
                try:
                    self.maintain_heartbeats(job)
                except RedisError as error:  # Redis away: the job goes on, the next beat retries
                    log.warning("heartbeat of job %s not sent: %s", job.id, error)

        thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        thread.start()
        try:
            return super().perform_job(job, queue)
        finally:
            done.set()
            thread.join()


def run_worker(settings: Settings, queues: list[str], functions: dict[str, Callable], burst: bool = False) -> None:
    """Take jobs (those of ``functions`` alone) until stopped, or with ``burst`` until the queues are empty;
    wait for Redis when it is away."""
    job_class = type("WorkerJob", (OwnJob,), {"functions": dict(functions)})
    wait = 1.0
    while True:
        try:
            connection = RQJobQueue.from_settings(settings).connection
            beat = settings.worker_heartbeat_seconds
            # Idle, a worker waits on Redis for at most worker_ttl - 15 s before its maintenance (which
            # finds dead workers' jobs) may run again: as often as a heartbeat may lapse.
            worker = HeartbeatWorker(queues, connection=connection, maintenance_interval=2 * beat,
                                     worker_ttl=2 * beat + 15, serializer=SERIALIZER, job_class=job_class)
            worker.heartbeat_interval = beat
            worker.work(burst=burst, logging_level=settings.log_level, with_scheduler=False)
            return
        except (redis.ConnectionError, redis.TimeoutError) as error:
            log.warning("Redis at %s is not answering (%s); trying again in %.0fs", settings.redis_url, error, wait)
            time.sleep(wait)
            wait = min(30.0, wait * 2)
