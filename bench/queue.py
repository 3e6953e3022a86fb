"""Pre-labeling through the job queue, with a real Label Studio and Redis on this machine.

    python -m bench.queue [--tasks 500] [--load-tasks 5000] [--skip-load]

1. **Scaling**: a project of ``--tasks`` demo scenes pre-labeled by ``backend.prelabel --queue``
   with 1 worker, then (a new project) with 2, each with its share of the cores (``OMP_NUM_THREADS``): images/s, and where the time goes, summed over the
   chunks (listing the chunk's tasks in Label Studio, predicting, waiting for uploads) and the
   queue's own share (the wall time no chunk was running on a worker).
2. **Load**: ``--load-tasks`` tasks enqueued, 2 workers, each killed with SIGKILL and replaced
   twice during the run; at the end every task must have exactly one prediction.

Every process (Label Studio, Redis, workers) is started here on 127.0.0.1 and stopped by PID.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rq.job import Job

from backend.label_studio_client import LabelStudioClient
from backend.prelabel import Prelabeler
from backend.rq_jobs import RQJobQueue
from backend.service import SegmentationService
from backend.settings import Settings
from demo import world
from demo.labelstudio import LabelStudio, ManagedProcess, backend_env, free_port
from demo.redis_server import RedisServer

LABELS = "".join(f'<Label value="{name}"/>' for name in world.NAMES)
CONFIG = f'<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">{LABELS}</BrushLabels></View>'
CHUNK = 16


class Setup:
    """Label Studio, Redis and workers under one work directory."""

    def __init__(self, work: Path):
        self.work = work
        self.label_studio = LabelStudio(work / "ls", port=free_port()).start()
        self.redis = RedisServer(work / "redis").start()
        self.workers: list[ManagedProcess] = []
        self.env = backend_env(work / "model_dir", self.label_studio, {
            "REDIS_URL": self.redis.url, "QUEUE_CHUNK_SIZE": str(CHUNK), "WORKER_HEARTBEAT_SECONDS": "5",
            "LOG_LEVEL": "WARNING"})

    def project(self, title: str, count: int) -> tuple[int, list[int]]:
        rng = np.random.default_rng(count)
        project = self.label_studio.create_project(title, CONFIG)
        for start in range(0, count, 500):
            self.label_studio.import_images(project, {f"{title}-{i:05d}.png": world.render_scene(rng)[0]
                                                      for i in range(start, min(count, start + 500))})
        return project, [t["id"] for t in self.label_studio.tasks(project)]

    def worker(self, threads: int) -> ManagedProcess:
        """A worker with ``threads`` torch threads (workers sharing a machine share its cores)."""
        worker = ManagedProcess([sys.executable, "-m", "backend.worker"], {**self.env, "OMP_NUM_THREADS": str(threads)},
                                self.work / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.redis.stop()
        self.label_studio.stop()

    def prelabeler(self, project: int) -> Prelabeler:
        """A ``prelabel --queue`` of ``project``, as the command makes it from the workers' settings."""
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            settings = Settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        client = LabelStudioClient(self.label_studio.url, self.label_studio.token).sdk
        return Prelabeler(client, SegmentationService(settings), project)

    def predictions(self, project: int) -> Counter:
        return Counter(len(t["predictions"]) for t in self.label_studio.tasks(project))


def scaling(setup: Setup, tasks: int) -> None:
    queue = RQJobQueue(setup.redis.url, chunk_size=CHUNK)
    print(f"\nscaling: {tasks} demo tasks (128 px), chunks of {CHUNK}, {os.cpu_count()} CPU cores\n\n"
          "| workers | images/s | wall s | listing s | predicting s | waiting for uploads s | queue's share |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for count in (1, 2):
        project, _ = setup.project(f"scaling-{count}", tasks)
        started = [setup.worker(max(1, os.cpu_count() // count)) for _ in range(count)]
        time.sleep(8)  # the workers load the model
        counts = setup.prelabeler(project).enqueue(queue, progress=False)
        jobs = [j for j in Job.fetch_many(queue.prelabel.finished_job_registry.get_job_ids(), connection=queue.connection)
                if j is not None and j.id.startswith(f"prelabel-{project}-")]
        results = [j.return_value() or {} for j in jobs]
        busy = sum((j.ended_at - j.started_at).total_seconds() for j in jobs)
        wall = counts["seconds"]
        print(f"| {count} | {counts['images_per_second']:.1f} | {wall:.0f} | "
              f"{sum(r.get('list_seconds', 0) for r in results):.0f} | "
              f"{sum(r.get('predict_seconds', 0) for r in results):.0f} | "
              f"{sum(r.get('upload_wait_seconds', 0) for r in results):.0f} | "
              f"{max(0.0, 1 - busy / (count * wall)):.0%} |", flush=True)
        assert setup.predictions(project) == Counter({1: tasks}), setup.predictions(project)
        for worker in started:
            worker.stop()


def load(setup: Setup, tasks: int) -> None:
    queue = RQJobQueue(setup.redis.url, chunk_size=CHUNK)
    project, ids = setup.project("load", tasks)
    prelabeler = setup.prelabeler(project)
    _, version = prelabeler._start()
    jobs = queue.enqueue_tasks(project, ids)
    threads = max(1, os.cpu_count() // 2)
    live = [setup.worker(threads), setup.worker(threads)]
    started, kills, finished = time.time(), 0, {}
    while (state := queue.progress(jobs, finished))["chunks_waiting"]:
        done = state["chunks_done"]
        if kills < 4 and done >= (kills // 2 + 1) * len(jobs) // 3:  # both workers, at a third and two thirds
            for index in range(len(live)):
                os.kill(live[index].pid, signal.SIGKILL)
                live[index].process.wait()
                live[index] = setup.worker(threads)
                kills += 1
        time.sleep(1)
    seconds = time.time() - started
    per_task = setup.predictions(project)
    print(f"\nload: {tasks} tasks in {len(jobs)} chunks, 2 workers, {kills} killed with SIGKILL mid-run and "
          f"replaced: {seconds:.0f} s ({tasks / seconds:.1f} images/s); chunks done {state['chunks_done']}, "
          f"failed {state['chunks_failed']}; tasks by number of predictions: {dict(sorted(per_task.items()))}; "
          f"model version {version}", flush=True)
    print(f"queue: load_tasks={tasks} exactly_one={per_task.get(1, 0)} none={per_task.get(0, 0)} "
          f"more={sum(v for k, v in per_task.items() if k > 1)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.queue", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--load-tasks", type=int, default=5000)
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as work:
        setup = Setup(Path(work))
        try:
            scaling(setup, args.tasks)
            if not args.skip_load:
                load(setup, args.load_tasks)
        finally:
            setup.stop()


if __name__ == "__main__":
    main()
