"""The job queue with a real Redis (started and stopped by PID) and a real Label Studio: workers that die,
a Redis that restarts, training on a worker, "Retrieve predictions" past its time budget, prelabel --queue."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from backend.rq_jobs import RQJobQueue
from backend.store import Store, project_key
from demo import world
from demo.labelstudio import (
    LABEL_STUDIO_BIN,
    ROOT,
    LabelStudio,
    ManagedProcess,
    backend_env,
    free_port,
    is_running,
    start_backend,
)
from demo.redis_server import RedisServer

pytestmark = [pytest.mark.labelstudio,
              pytest.mark.skipif(not LABEL_STUDIO_BIN.exists(), reason="Label Studio not installed (make setup-ls)")]

LABELS = "".join(f'<Label value="{name}"/>' for name in world.NAMES)
CONFIG = f'<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">{LABELS}</BrushLabels></View>'
HEARTBEAT = 2  # seconds: a dead worker's job is found within about three times this


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    server = LabelStudio(tmp_path_factory.mktemp("queue-ls") / "ls", port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture()
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture()
def workers(tmp_path, label_studio, redis_server):
    """start() → a new worker process; every one is stopped at the end."""
    started = []

    def start(**env) -> ManagedProcess:
        environment = backend_env(tmp_path / "model_dir", label_studio, {
            "REDIS_URL": redis_server.url, "WORKER_HEARTBEAT_SECONDS": str(HEARTBEAT), "QUEUE_CHUNK_SIZE": "8",
            "QUEUE_RETRIES": "5", **env})
        worker = ManagedProcess([sys.executable, "-m", "backend.worker"], environment,
                                tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker
    yield start
    for number, worker in enumerate(started):
        worker.stop()
        print(f"--- worker {number} (pytest shows this when the test failed):\n"  # its own words
              f"{worker.log.read_text(errors='replace')[-4000:]}")


def project_of(label_studio, title: str, count: int, size: int = 128) -> tuple[int, list[int]]:
    """A project of ``count`` demo scenes at ``size`` px: (its id, its task ids)."""
    rng = np.random.default_rng(count)
    images = {f"{title}-{i:04d}.png": np.asarray(Image.fromarray(world.render_scene(rng)[0]).resize((size, size)))
              for i in range(count)}
    project = label_studio.create_project(title, CONFIG)
    label_studio.import_images(project, images)
    return project, [t["id"] for t in label_studio.tasks(project)]


def predictions_per_task(label_studio, project: int) -> Counter:
    return Counter({t["id"]: len(t["predictions"]) for t in label_studio.tasks(project)})


def wait_until(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return value


def queue_of(redis_server, chunk_size: int = 8) -> RQJobQueue:
    return RQJobQueue(redis_server.url, chunk_size=chunk_size, chunk_timeout=600, retries=5)


def test_a_worker_killed_mid_chunk_loses_nothing_and_predicts_nothing_twice(label_studio, redis_server, workers):
    project, ids = project_of(label_studio, "killed", 48, size=512)
    queue = queue_of(redis_server, chunk_size=48)
    (job,) = queue.enqueue_tasks(project, ids)
    first = workers(PREDICT_BATCH_SIZE="4")
    done = wait_until(lambda: sum(predictions_per_task(label_studio, project).values()), 300,
                      "the first predictions", poll=0.2)
    os.kill(first.pid, signal.SIGKILL)  # mid-chunk: some of its tasks are posted, the rest are not
    first.process.wait()
    assert 0 < done < len(ids)
    workers(PREDICT_BATCH_SIZE="4")
    wait_until(lambda: queue.progress([job])["chunks_done"], 300, "the retried chunk")
    assert predictions_per_task(label_studio, project) == Counter({i: 1 for i in ids})
    counts = queue.progress([job])
    assert counts["skipped"] >= done and counts["predicted"] + counts["skipped"] == len(ids)


def test_redis_restarted_mid_run_resumes(label_studio, redis_server, workers):
    project, ids = project_of(label_studio, "restart", 40, size=384)
    queue = queue_of(redis_server)
    jobs = queue.enqueue_tasks(project, ids)
    workers()
    done = wait_until(lambda: sum(predictions_per_task(label_studio, project).values()), 300,
                      "the first predictions", poll=0.2)
    redis_server.restart(down_seconds=3)
    assert done < len(ids)  # mid-run
    queue = queue_of(redis_server)
    wait_until(lambda: queue.progress(jobs)["chunks_waiting"] == 0, 300, "every chunk")
    assert queue.progress(jobs)["chunks_failed"] == 0
    assert predictions_per_task(label_studio, project) == Counter({i: 1 for i in ids})


def test_a_training_job_whose_worker_dies_is_failed_and_changes_nothing(tmp_path, label_studio, redis_server,
                                                                         workers):
    project, ids = project_of(label_studio, "training", 12)
    scenes = world.test_scenes(12)
    for task, (_, truth) in zip(ids, scenes, strict=True):
        label_studio.api("POST", f"/api/tasks/{task}/annotations", json={"result": _brush_results(truth)})
    queue = queue_of(redis_server)
    key = project_key(project)
    assert queue.enqueue_training(key, pull=True) == "queued"
    assert queue.enqueue_training(key, pull=True) == "already queued"
    worker = workers(TRAIN_STEPS="2000")
    progress = tmp_path / "model_dir" / "projects" / key / "job.json"
    wait_until(lambda: progress.exists() and json.loads(progress.read_text()).get("state") == "training", 300,
               "the training to start")
    # The service reads the job's progress from the queue, as it reads a local job's.
    running = wait_until(lambda: queue.training_status().get(key, {}).get("phase") == "training"
                         and queue.training_status()[key], 60, "the queue to show the job's progress")
    assert running["state"] == "running" and running["steps"] == 2000 and "pid" not in running
    child = json.loads(progress.read_text())["pid"]
    os.kill(worker.pid, signal.SIGKILL)
    worker.process.wait()
    wait_until(lambda: not is_running(child), 60, "the training process to stop with its worker")
    workers()  # its maintenance finds the dead worker's job
    status = wait_until(lambda: queue.training_status().get(key, {}).get("state") == "failed"
                        and queue.training_status()[key], 120, "the job to be marked failed")
    assert "error" in status
    assert Store(tmp_path / "model_dir").versions(key) == []


def test_retrieve_predictions_past_the_budget_answers_in_time_and_workers_post_the_rest(
        tmp_path, label_studio, redis_server, workers):
    project, ids = project_of(label_studio, "budget", 40, size=512)
    backend_port = free_port()
    backend = start_backend(backend_port, tmp_path / "model_dir", label_studio, {
        "REDIS_URL": redis_server.url, "PREDICT_BUDGET_SECONDS": "2", "PREDICT_BATCH_SIZE": "4",
        "QUEUE_CHUNK_SIZE": "8"})
    try:
        label_studio.connect_backend(project, f"http://127.0.0.1:{backend_port}")
        started = time.time()
        answer = label_studio.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                                  json={"selectedItems": {"all": True, "excluded": []}})
        answered = time.time() - started
        print(f"Label Studio answered the action after {answered:.1f} s: {answer}")
        stored = predictions_per_task(label_studio, project)
        assert 0 < sum(stored.values()) < len(ids)  # answered within the budget; the rest were handed over
        workers()
        wait_until(lambda: set(predictions_per_task(label_studio, project).values()) == {1}, 300,
                   "the workers' predictions")
        assert predictions_per_task(label_studio, project) == Counter({i: 1 for i in ids})
        assert answered < 30
    finally:
        backend.stop()


def test_prelabel_queue_says_when_no_worker_takes_its_chunks_follows_them_and_resumes(
        tmp_path, label_studio, redis_server, workers):
    project, ids = project_of(label_studio, "cli", 30)
    env = backend_env(tmp_path / "model_dir", None, {"REDIS_URL": redis_server.url, "QUEUE_CHUNK_SIZE": "8"})
    command = [sys.executable, "-m", "backend.prelabel", "--url", label_studio.url, "--token", label_studio.token,
               "--project", str(project), "--queue", "--no-progress"]
    log = tmp_path / "prelabel.log"
    with open(log, "w") as stderr:
        first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            wait_until(lambda: "no worker takes them" in log.read_text(), 120, "the no-worker warning")
            assert first.poll() is None, log.read_text()[-2000:]  # it goes on waiting for a worker
            workers()
            stdout, _ = first.communicate(timeout=600)
        finally:
            first.kill()
    assert first.returncode == 0, log.read_text()[-2000:]
    counts = json.loads(stdout.strip().splitlines()[-1])
    assert counts["predicted"] == len(ids) and counts["chunks"] == 4 and counts["failed"] == 0
    again = json.loads(subprocess.run([*command, "--keep-versions", "1"], env=env, cwd=ROOT, capture_output=True,
                                      text=True, timeout=600).stdout.strip().splitlines()[-1])
    assert again["skipped"] == len(ids) and again["chunks"] == 0
    assert again["versions_deleted"] == {}  # the model's one version is this run's
    assert predictions_per_task(label_studio, project) == Counter({i: 1 for i in ids})


def _brush_results(truth: np.ndarray) -> list[dict]:
    from label_studio_sdk.converter.brush import mask2rle

    return [{"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": truth.shape[1],
             "original_height": truth.shape[0], "image_rotation": 0,
             "value": {"format": "rle", "rle": mask2rle((truth == c).astype(np.uint8) * 255),
                       "brushlabels": [world.NAMES[c]]}} for c in np.unique(truth)]
