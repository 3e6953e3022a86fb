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

A worker runs its own two job functions and nothing else (:class:`backend.rq_jobs.OwnJob`): jobs are JSON, a job naming
any other function, an instance or callbacks fails without importing anything, and a job that is not
JSON (RQ's pickle, say) is never read. Redis access still lets anyone enqueue those two jobs and read
their results: keep Redis on a private network, with a password (README: Security).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from backend.errors import ServiceError
from backend.label_studio_client import LabelStudioClient, LabelStudioError
from backend.local_training import LocalTrainingJobs
from backend.prelabel import Prelabeler
from backend.rq_jobs import PREDICT_CHUNK, PRELABEL_QUEUE, TRAIN_PROJECT, TRAINING_QUEUE, report_progress, run_worker
from backend.service import SegmentationService
from backend.settings import Settings
from backend.store import Store

log = logging.getLogger("backend.worker")

PROGRESS_SECONDS = 2.0  # how often a training job's progress (phase, step, loss) is copied to its queue job


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
    jobs = LocalTrainingJobs(settings, Store(settings.model_dir), env={
        "LABEL_STUDIO_URL": settings.label_studio_url, "LABEL_STUDIO_API_KEY": settings.label_studio_api_key})
    jobs.request(project, pull)
    while True:  # the job's progress goes on its queue job, where the service's /health reads it
        try:
            jobs.wait(project, timeout=PROGRESS_SECONDS)
            break
        except TimeoutError:
            report_progress(jobs.status().get(project, {}))
    status = jobs.status()[project]
    if status.get("state") != "finished":
        raise TrainingFailed(status.get("error") or "the training job did not finish")
    return {k: v for k, v in status.items() if k not in ("state", "queued")}


JOBS = {PREDICT_CHUNK: predict_chunk, TRAIN_PROJECT: train_project}


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
    run_worker(settings, [q.strip() for q in args.queues.split(",") if q.strip()], JOBS, args.burst)


if __name__ == "__main__":
    main()
