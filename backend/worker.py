"""A worker: takes pre-labeling chunks and training jobs from the job queue (RQ on Redis).

    REDIS_URL=redis://redis:6379/0 LABEL_STUDIO_URL=http://label-studio:8080 LABEL_STUDIO_API_KEY=<token> \\
        MODEL_DIR=/shared/model_dir python -m backend.worker

It reads the same settings as the service (model, weights, and a MODEL_DIR shared with it), loads
the model once and runs one job at a time in its own process, so every job finds the model, and
the text embeddings of earlier jobs, ready. A pre-labeling chunk predicts the tasks that have no
prediction of the served model version yet and posts them to Label Studio through its API. A
training job runs ``backend.training`` in a child process, as the service does on one machine
(the child stops if the worker dies), and registers the new version in the shared MODEL_DIR.

While a job runs the worker renews its heartbeat every ``WORKER_HEARTBEAT_SECONDS``. When a worker
dies, its job's heartbeat lapses within twice that, and another worker's maintenance retries the
chunk (``QUEUE_RETRIES`` times) or marks the training job failed. Losing Redis, the worker waits
for it and goes on.

A worker runs its own two job functions and nothing else (:class:`OwnJob`): jobs are JSON, a job naming
any other function, an instance or callbacks fails without importing anything, and a job that is not
JSON (RQ's pickle, say) is never read. Redis access still lets anyone enqueue those two jobs and read
their results: keep Redis on a private network, with a password (README: Security).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading
import time

import redis
from rq import SimpleWorker
from rq.exceptions import DeserializationError
from rq.job import Job

from backend.errors import ServiceError
from backend.jobs import TrainingJobs
from backend.labelstudio import LabelStudioClient, LabelStudioError
from backend.prelabel import Prelabeler
from backend.queue import PREDICT_CHUNK, PRELABEL_QUEUE, SERIALIZER, TRAIN_PROJECT, TRAINING_QUEUE, JobQueue
from backend.service import SegmentationService
from backend.settings import Settings
from backend.store import Store

log = logging.getLogger("backend.worker")


@dataclasses.dataclass
class Context:
    """What every job of this worker process uses, made once by :func:`main`."""

    settings: Settings
    service: SegmentationService
    client: object  # label_studio_sdk.LabelStudio


_context: Context | None = None


class TrainingFailed(RuntimeError):
    """A training job ended without a new version; the message is the job's own reason."""


def predict_chunk(project: int, task_ids: list[int]) -> dict:
    """Pre-label ``task_ids`` of Label Studio project ``project``: counts of predicted, skipped (already
    predicted by this model version) and failed tasks."""
    return Prelabeler(_context.client, _context.service, project, activate=False).run_tasks(task_ids)


def train_project(project: str, pull: bool) -> dict:
    """Train ``project`` as the service's training jobs do; its progress, or :class:`TrainingFailed`."""
    settings = _context.settings
    jobs = TrainingJobs(settings, Store(settings.model_dir), env={
        "LABEL_STUDIO_URL": settings.label_studio_url, "LABEL_STUDIO_API_KEY": settings.label_studio_api_key})
    jobs.request(project, pull)
    jobs.wait(project, timeout=float("inf"))
    status = jobs.status()[project]
    if status.get("state") != "finished":
        raise TrainingFailed(status.get("error") or "the training job did not finish")
    return {k: v for k, v in status.items() if k not in ("state", "queued")}


JOBS = {PREDICT_CHUNK: predict_chunk, TRAIN_PROJECT: train_project}


class ForeignJob(RuntimeError):
    """A job this worker does not run: another function, an instance method or callbacks."""


class OwnJob(Job):
    """An RQ job that can only be one of :data:`JOBS`: the function is looked up in that table, never
    imported by name, and callbacks named in Redis are never imported."""

    @property
    def func(self):
        if self.func_name not in JOBS or self.instance is not None:
            raise ForeignJob(f"job {self.id} names {str(self.func_name)[:80]!r}; this worker runs only "
                             f"{', '.join(JOBS)}")
        return JOBS[self.func_name]

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

    job_class = OwnJob

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
                except redis.RedisError as error:  # Redis away: the job goes on, the next beat retries
                    log.warning("heartbeat of job %s not sent: %s", job.id, error)

        thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        thread.start()
        try:
            return super().perform_job(job, queue)
        finally:
            done.set()
            thread.join()


def work(settings: Settings, queues: list[str], burst: bool = False) -> None:
    """Take jobs until stopped (or, with ``burst``, until the queues are empty); wait for Redis when it is away."""
    wait = 1.0
    while True:
        try:
            connection = JobQueue.from_settings(settings).connection
            beat = settings.worker_heartbeat_seconds
            # Idle, a worker waits on Redis for at most worker_ttl - 15 s before its maintenance (which
            # finds dead workers' jobs) may run again: as often as a heartbeat may lapse.
            worker = HeartbeatWorker(queues, connection=connection, maintenance_interval=2 * beat,
                                     worker_ttl=2 * beat + 15, serializer=SERIALIZER, job_class=OwnJob)
            worker.heartbeat_interval = beat
            worker.work(burst=burst, logging_level=settings.log_level, with_scheduler=False)
            return
        except (redis.ConnectionError, redis.TimeoutError) as error:
            log.warning("Redis at %s is not answering (%s); trying again in %.0fs", settings.redis_url, error, wait)
            time.sleep(wait)
            wait = min(30.0, wait * 2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backend.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queues", default=f"{PRELABEL_QUEUE},{TRAINING_QUEUE}",
                        help="the queues to take jobs from, in order of preference")
    parser.add_argument("--burst", action="store_true", help="stop once the queues are empty")
    args = parser.parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not settings.redis_url:
        sys.exit("worker: set REDIS_URL (e.g. redis://localhost:6379/0), the queue the service enqueues to")
    if not (settings.label_studio_url and settings.label_studio_api_key):
        sys.exit("worker: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: workers post predictions through "
                 "Label Studio's API")
    service = SegmentationService(settings)
    service.start()
    try:
        service.runtime.model(wait=3600)  # fail now, clearly, if the weights are missing
        client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key).sdk
    except (ServiceError, LabelStudioError) as error:
        sys.exit(f"worker: {error}")
    global _context  # the jobs are this module's own functions (JOBS), never looked up by import
    _context = Context(settings, service, client)
    work(settings, [q.strip() for q in args.queues.split(",") if q.strip()], args.burst)


if __name__ == "__main__":
    main()
