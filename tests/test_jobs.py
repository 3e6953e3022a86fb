"""Training jobs and the job queue behind their interfaces (backend.jobs): both implementations satisfy them."""
import subprocess
import sys

from backend.jobs import JobQueue, TrainingJobs, job_queue, training_jobs
from backend.local_training import LocalTrainingJobs
from backend.rq_jobs import QueuedTrainingJobs, RQJobQueue
from backend.settings import Settings
from backend.store import Store
from backend.training import write_progress


def test_local_and_queued_training_jobs_satisfy_the_interface(tmp_path):
    settings = Settings(model_dir=tmp_path)
    store = Store(tmp_path)
    local = training_jobs(settings, store, None)
    assert isinstance(local, LocalTrainingJobs) and isinstance(local, TrainingJobs)
    queue = RQJobQueue("redis://127.0.0.1:9/0")  # nothing is asked of it here
    assert isinstance(queue, JobQueue) and queue.answering
    queued = training_jobs(settings, store, queue)
    assert isinstance(queued, QueuedTrainingJobs) and isinstance(queued, TrainingJobs)
    assert job_queue(settings) is None and isinstance(job_queue(Settings(model_dir=tmp_path, redis_url=queue_url())),
                                                      RQJobQueue)


def test_a_queue_that_does_not_answer_is_refused_in_words_and_remembered():
    queue = RQJobQueue(queue_url(), timeout=0.5)
    queued = QueuedTrainingJobs(queue)
    assert queued.request("3").startswith("refused: the job queue")
    assert not queue.answering and "Error" in queue.error


def test_a_running_job_shows_its_phase_until_it_has_written_its_end(tmp_path):
    store = Store(tmp_path)
    jobs = LocalTrainingJobs(Settings(model_dir=tmp_path), store)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        jobs._running["4"] = child  # a job's process, still alive
        store.project_dir("4").mkdir(parents=True)
        for written, phase in (("pre-labeling", "pre-labeling"), ("finished", None)):
            write_progress(store.project_dir("4") / "job.json", state=written, version=3)
            status = jobs.status()["4"]
            assert (status["state"], status.get("phase"), status["version"]) == ("running", phase, 3)
    finally:
        child.kill()
        child.wait()


def queue_url() -> str:
    return "redis://127.0.0.1:9/0"  # the discard port: nothing listens
