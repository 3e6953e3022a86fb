"""Pre-label a whole Label Studio project from the command line.

    python -m backend.prelabel --url http://localhost:8080 --token <key> --project 12

Label Studio's "Retrieve predictions" action calls the backend's /predict for all selected
tasks in one synchronous request and times out on large projects. This tool does the same
work in batches instead: it pages through the project's tasks with label-studio-sdk, skips
those that already have a prediction from the current model version, predicts the rest in
batches with the same model, settings and MODEL_DIR the backend uses (so the model version
matches what Label Studio sees from /setup), and uploads each batch's predictions in one
request. Interrupted, it resumes where it stopped without duplicating a prediction. At the
end it selects this model version in the project, so the data manager sorts and filters by
these predictions' scores and annotators see them as pre-annotations. With ``--annotate-next N``
it also orders the tasks for active learning (the Data Manager tab "Annotate next"), and each
training job of the project renews that order with its new version. With ``--keep-versions K`` it
deletes the predictions of the model's versions of the project but the K last predicted, as each
renewal then does, so the rounds of a loop do not leave one prediction per task each.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import numpy as np
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from tqdm import tqdm

from backend.control_tags import ControlTag
from backend.errors import ServiceError
from backend.jobs import JobQueue, job_queue
from backend.label_studio_client import LabelStudioClient, LabelStudioError, default_hidden_columns
from backend.memory import release_freed_memory
from backend.payloads import targets_of
from backend.service import SegmentationService
from backend.settings import Settings
from model.acquisition import Pool, TaskView, cluster_tasks, label_stream

log = logging.getLogger("backend.prelabel")
TRANSIENT_STATUS = {408, 409, 429, 500, 502, 503, 504}
NO_WORKER_SECONDS = 15  # a worker registers once its model is loaded; longer without one is worth saying
ANNOTATE_NEXT_TAB = "Annotate next"  # the Data Manager tab that lists the tasks in the acquisition's order
RANK_FIELD = "annotate_next"  # the task data field holding a task's place in that order ("001" first)
# Places are written for this many next batches; Label Studio lists the tasks without one after them. Each place
# is one request (there is no bulk update of task data), so a round costs a few batches, not the project.
PLACED_BATCHES = 5
# Those requests, and each prediction's cluster (one request too), go this many at a time: 4 took 200 cluster
# writes from 18.6 s to 10.5 s against a Label Studio on the same 2 cores (8: 17 s).
CONCURRENT_WRITES = 4


def is_transient(error: Exception) -> bool:
    """Worth retrying: a dropped connection, a timeout, or a 5xx/429-like answer."""
    if isinstance(error, ApiError):
        return error.status_code in TRANSIENT_STATUS
    return isinstance(error, httpx.TransportError)


def retrying(call, what: str, retries: int, delay: float = 1.0):
    """``call()``, retried with exponential backoff on transient errors."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as error:
            if attempt == retries or not is_transient(error):
                raise
            wait = min(60.0, delay * 2 ** attempt)
            log.warning("%s failed (%s); retry %d/%d in %.0fs", what, str(error)[:200], attempt + 1, retries, wait)
            time.sleep(wait)


def write_each(items: list, write, what: str, retries: int) -> None:
    """``write(item)`` for every item, :data:`CONCURRENT_WRITES` at a time, each retried as :func:`retrying` does;
    the first write that still fails raises, once the writes in flight have ended."""
    with ThreadPoolExecutor(max_workers=CONCURRENT_WRITES) as pool:
        for _ in pool.map(lambda item: retrying(lambda: write(item), what, retries), items):
            pass


def _versions(task) -> set[str]:
    """Model versions of a task's predictions (a comma-joined string on SQLite, a list on PostgreSQL)."""
    value = getattr(task, "predictions_model_versions", None) or []
    return set(value.split(",") if isinstance(value, str) else value)


class Prelabeler:
    """Pre-labels one project; ``run`` returns counts of predicted, skipped and failed tasks."""

    def __init__(self, client: LabelStudio, service: SegmentationService, project: int, batch_size: int = 16,
                 page_size: int = 100, retries: int = 5, activate: bool = True, annotate_next: int = 0,
                 keep_versions: int = 0):
        self.client = client
        self.annotate_next = annotate_next  # the next batch to annotate; 0: no order
        self.keep_versions = keep_versions  # the model's versions whose predictions stay; 0: all
        self.activate = activate
        self.service = service
        self.project = project
        self.batch_size = batch_size
        self.page_size = page_size
        self.retries = retries

    def _tasks(self, ids: list[int] | None = None) -> list:
        """The project's tasks (or only ``ids``) with their data and prediction versions, page by page."""
        query = json.dumps({"selectedItems": {"all": False, "included": ids}}) if ids else None
        return retrying(lambda: list(self.client.tasks.list(project=self.project, page_size=self.page_size,
                                                            query=query, include="id,data,predictions_model_versions,total_annotations",
                                                            request_options={"max_retries": self.retries})),
                        "listing tasks", self.retries)

    def _upload(self, predictions: list[dict], version: str) -> int:
        """Upload in one request. A retry first drops the tasks an earlier attempt already stored
        (a lost answer may hide a commit), so no task ends up with two predictions."""
        pending, attempts = predictions, 0

        def send() -> None:
            nonlocal pending, attempts
            if attempts:
                stored = {t.id for t in self._tasks([p["task"] for p in pending]) if version in _versions(t)}
                pending = [p for p in pending if p["task"] not in stored]
            attempts += 1
            if pending:
                self.client.projects.import_predictions(id=self.project, request=pending,
                                                        request_options={"max_retries": 0, "timeout_in_seconds": 300})

        retrying(send, f"uploading {len(predictions)} predictions", self.retries, delay=2.0)
        return len(predictions)

    def _start(self) -> tuple[tuple[ControlTag, ...], str]:
        """The project's segmentation targets and the model version that serves it (as /setup answers); the
        project counts as set up, as Label Studio's /setup would make it."""
        project = retrying(lambda: self.client.projects.get(id=self.project), "reading the project", self.retries)
        self._project_version = project.model_version
        targets = targets_of(project.label_config)
        self.service.projects.set_up(str(self.project), project.label_config)
        return targets, self.service.runtime.naming(str(self.project)).model_version(targets)

    def run(self, progress: bool = True) -> dict:
        targets, version = self._start()
        tasks = self._tasks()
        todo = [t for t in tasks if version not in _versions(t)]
        log.info("project %s: %d tasks, %d already have %s, %d to predict", self.project, len(tasks),
                 len(tasks) - len(todo), version, len(todo))
        views: dict[int, TaskView | None] | None = {} if self.annotate_next else None
        counts = {**self._predict(todo, targets, version, progress, views), "tasks": len(tasks),
                  "skipped": len(tasks) - len(todo)}
        counts.update(self._conclude(version))
        if self.annotate_next:
            counts["annotate_next"] = self._order(tasks, targets, version, views)
        return counts

    def run_tasks(self, task_ids: list[int]) -> dict:
        """Pre-label these tasks of the project (a queue's chunk); those already predicted by the model
        version are skipped, so running a chunk twice predicts nothing twice."""
        targets, version = self._start()
        began = time.time()
        tasks = self._tasks(task_ids)
        listing = time.time() - began
        todo = [t for t in tasks if version not in _versions(t)]
        return {**self._predict(todo, targets, version, progress=False), "tasks": len(task_ids),
                "skipped": len(tasks) - len(todo), "missing": len(task_ids) - len(tasks),
                "list_seconds": round(listing, 2)}

    def enqueue(self, queue: JobQueue, progress: bool = True, poll: float = 1.0) -> dict:
        """Enqueue the project's tasks that lack this model version's prediction, in chunks for the
        workers, and follow the chunks to their end (a progress bar fed from the queue)."""
        _, version = self._start()
        tasks = self._tasks()
        todo = [t.id for t in tasks if version not in _versions(t)]
        job_ids = queue.enqueue_tasks(self.project, todo)
        log.info("project %s: %d tasks, %d already have %s, %d enqueued in %d chunks", self.project, len(tasks),
                 len(tasks) - len(todo), version, len(todo), len(job_ids))
        started, finished, last_worker_seen, warned = time.time(), {}, time.time(), False
        with tqdm(total=len(todo), unit=" images", desc=f"project {self.project} (queued)", disable=not progress,
                  file=sys.stderr, smoothing=0.1) as bar:
            while True:
                state = queue.progress(job_ids, finished)
                bar.update(state["predicted"] + state["skipped"] + state["failed"] - bar.n)
                if not state["chunks_waiting"]:
                    break
                if state["workers"]:
                    last_worker_seen, warned = time.time(), False
                elif not warned and time.time() - last_worker_seen > NO_WORKER_SECONDS:
                    warned = True  # once per stretch without a worker
                    log.warning("project %s: %d chunks wait and no worker takes them: start `python -m backend.worker` "
                                "with this REDIS_URL (the chunks stay queued; stopping this command and running it "
                                "again later follows the same chunks)", self.project, state["chunks_waiting"])
                time.sleep(poll)
        seconds = time.time() - started
        counts = {"model_version": version, "tasks": len(tasks), "skipped": len(tasks) - len(todo) + state["skipped"],
                  "predicted": state["predicted"], "failed": state["failed"], "chunks": len(job_ids),
                  "chunks_failed": state["chunks_failed"], "seconds": round(seconds, 1),
                  "images_per_second": round(len(todo) / seconds, 2) if todo else 0.0}
        counts.update(self._conclude(version))
        return counts

    def _predict(self, todo: list, targets: tuple[ControlTag, ...], version: str, progress: bool,
                 views: dict | None = None) -> dict:
        """Predict ``todo`` in batches (:class:`backend.pipeline.PredictPipeline`, the service's own) and upload
        each batch while the next is predicted; each task's :class:`model.acquisition.TaskView` goes to ``views``."""
        counts = {"model_version": version, "skipped": 0, "predicted": 0, "failed": 0}
        started, predicting, waiting = time.time(), 0.0, 0.0
        bar = tqdm(total=len(todo), unit=" images", desc=f"project {self.project}", disable=not progress,
                   file=sys.stderr, smoothing=0.1)
        uploader = ThreadPoolExecutor(max_workers=1)  # uploads overlap the next batch's prediction
        uploading: Future | None = None
        serving = self.service.runtime.serving(str(self.project))
        try:
            for start in range(0, len(todo), self.batch_size):
                batch = [{"id": t.id, "data": t.data} for t in todo[start:start + self.batch_size]]
                began = time.time()
                answers = self.service.pipeline.predict(str(self.project), batch, targets, serving,
                                                        views=views is not None)
                release_freed_memory()
                predicting += time.time() - began
                predictions = []
                for task, answer in zip(batch, answers, strict=True):
                    if views is not None:
                        views[task["id"]] = answer.view
                    if answer.error is None:
                        predictions.append({"task": task["id"], "result": answer.result, "score": answer.score,
                                            "model_version": version})
                    else:
                        counts["failed"] += 1
                        log.warning("task %s: %s", task["id"], answer.error)
                if uploading is not None:
                    began = time.time()
                    counts["predicted"] += uploading.result()
                    waiting += time.time() - began
                uploading = uploader.submit(self._upload, predictions, version) if predictions else None
                bar.update(len(batch))
            if uploading is not None:
                began = time.time()
                counts["predicted"] += uploading.result()
                waiting += time.time() - began
        finally:
            uploader.shutdown(wait=True)
            bar.close()
        seconds = time.time() - started
        counts.update(seconds=round(seconds, 1), images_per_second=round(len(todo) / seconds, 2) if todo else 0.0,
                      predict_seconds=round(predicting, 2), upload_wait_seconds=round(waiting, 2))
        return counts

    def _order(self, tasks: list, targets: tuple[ControlTag, ...], version: str,
               views: dict[int, TaskView | None]) -> dict:
        """The acquisition order over every task, for a next batch of :attr:`annotate_next`: the tasks are clustered
        (:func:`model.acquisition.cluster_tasks`; each prediction carries its task's ``cluster``) and ordered by Label
        Studio's uncertainty-sampling rule over those clusters with the stream score
        (:func:`model.acquisition.label_stream`): one task per cluster, the least sure of each, before any
        cluster's second. The first :data:`PLACED_BATCHES` batches of tasks not annotated get their place in their
        data (:data:`RANK_FIELD`), and the Data Manager tab :data:`ANNOTATE_NEXT_TAB` lists the tasks in that order
        (the others after them: Label Studio sorts a missing field last); its *Label Tasks As Displayed* gives them
        so. The order is not the project's sampling, which reads the review score (*Prediction score*)."""
        serving = self.service.runtime.serving(str(self.project))
        missing = [{"id": t.id, "data": t.data} for t in tasks if t.id not in views]
        for start in range(0, len(missing), self.batch_size):  # tasks predicted by an earlier run: a pass each
            batch = missing[start:start + self.batch_size]
            answers = self.service.pipeline.predict(str(self.project), batch, targets, serving, views=True)
            views.update((task["id"], answer.view) for task, answer in zip(batch, answers, strict=True))
        annotated = np.array([bool(getattr(t, "total_annotations", 0)) for t in tasks])
        pool = Pool.of([views[t.id] for t in tasks], annotated)
        clusters = cluster_tasks(pool, self.annotate_next)
        order = label_stream(clusters, pool.stream_scores, annotated, PLACED_BATCHES * self.annotate_next)
        cluster_of = {t.id: int(c) for t, c in zip(tasks, clusters, strict=True)}
        predictions = retrying(lambda: self.client.predictions.list(project=self.project), "listing predictions",
                               self.retries)
        changed = [p for p in predictions if p.model_version == version and cluster_of.get(p.task, -1) >= 0
                   and p.cluster != cluster_of[p.task]]
        write_each(changed, lambda p: self.client.predictions.update(id=p.id, cluster=cluster_of[p.task]),
                   "writing a prediction's cluster", self.retries)
        width = len(str(len(order)))  # zero-padded: the label stream sorts a data field as text
        places = {tasks[i].id: f"{place + 1:0{width}d}" for place, i in enumerate(order)}
        ranked = self._write_places(places)
        failed = sorted(t.id for t in tasks if views[t.id] is None)
        if failed:
            log.warning("project %s: tasks %s have no prediction and come after every other", self.project,
                        ", ".join(map(str, failed[:20])))
        return {"clusters": int(clusters.max() + 1), "annotated": int(annotated.sum()),
                "predictions_updated": len(changed), "placed": len(places), "places_updated": ranked,
                "tab": self._tab(), "next": [tasks[i].id for i in order[:self.annotate_next]],
                "failed_tasks": failed}

    def _write_places(self, places: dict[int, str]) -> int:
        """Write each task's place in the order into its data (:data:`RANK_FIELD`), and take it from the tasks not
        in ``places`` (annotated since, or past the placed batches); returns how many tasks changed. The data is
        read unresolved, so storage URLs are written back as they were."""
        raw = retrying(lambda: list(self.client.tasks.list(project=self.project, page_size=self.page_size,
                                                           resolve_uri=False, include="id,data",
                                                           request_options={"max_retries": self.retries})),
                       "listing tasks' data", self.retries)
        moved = [task for task in raw if task.data.get(RANK_FIELD) != places.get(task.id)]
        log.info("project %s: writing %d tasks' places in the order", self.project, len(moved))

        def write(task) -> None:
            data = {key: value for key, value in task.data.items() if key != RANK_FIELD}
            if task.id in places:
                data[RANK_FIELD] = places[task.id]
            self.client.tasks.update(id=str(task.id), data=data)

        write_each(moved, write, "writing a task's place in the order", self.retries)
        return len(moved)

    def _tab(self) -> int:
        """The id of the project's :data:`ANNOTATE_NEXT_TAB` tab, made (or set back) to list the tasks by their
        place in the order, with no filter, and the columns Label Studio shows by default and the *Prediction
        score* (:func:`default_hidden_columns`)."""
        columns = self._api("GET", "api/dm/columns", "listing the Data Manager's columns",
                            params={"project": self.project})["columns"]
        data = {"title": ANNOTATE_NEXT_TAB, "type": "list", "target": "tasks",
                "ordering": [f"tasks:data.{RANK_FIELD}"], "filters": {"conjunction": "and", "items": []},
                "hiddenColumns": {view: default_hidden_columns(columns, view) for view in ("explore", "labeling")}}
        views = retrying(lambda: self.client.views.list(project=self.project), "listing tabs", self.retries)
        tab = next((v for v in views if (v.data or {}).get("title") == ANNOTATE_NEXT_TAB), None)
        if tab is None:
            tab = retrying(lambda: self.client.views.create(project=self.project, data=data), "making the tab",
                           self.retries)
        elif any(tab.data.get(key) != value for key, value in data.items()):
            tab = retrying(lambda: self.client.views.update(id=str(tab.id), project=self.project,
                                                            data={**tab.data, **data}), "setting the tab",
                           self.retries)
        return int(tab.id)

    def _delete_older_versions(self, version: str) -> dict[str, int]:
        """Delete the predictions of the model's versions of the project but the :attr:`keep_versions` last
        predicted, ``version`` (this run's) and the project's selected one always among the kept; other models'
        predictions and every annotation stay. Returns the deleted versions with their predictions' counts."""
        path = f"api/projects/{self.project}/model-versions/"
        listed = self._api("GET", path, "listing model versions", params={"extended": "true"})
        model = version.rsplit("@", 1)[0] + "@"  # this model's versions: "<model>@zero-shot:…", "<model>@p1-v2:…"
        ours = [v["model_version"] for v in sorted(listed["static"], key=lambda v: v["latest"] or "", reverse=True)
                if v["model_version"].startswith(model)]
        always = list(dict.fromkeys([version, version if self.activate else self._project_version]))
        kept = set(always + [name for name in ours if name not in always][:max(0, self.keep_versions - len(always))])
        deleted = {}
        for name in ours:
            if name not in kept:
                answer = self._api("DELETE", path, "deleting a model version's predictions", json={"model_version": name})
                deleted[name] = int(answer["deleted_predictions"] if isinstance(answer, dict) else answer)
        if deleted:
            log.info("project %s: deleted the predictions of %s", self.project, deleted)
        return deleted

    def _api(self, method: str, path: str, what: str, **kwargs):
        """A call to an endpoint the SDK does not wrap, through the SDK's own HTTP client (its auth), retried as the
        others are; the answer's JSON."""
        http = self.client._client_wrapper.httpx_client

        def call():
            response = http.request(path, method=method, request_options={"max_retries": self.retries}, **kwargs)
            if response.status_code >= 400:
                raise ApiError(status_code=response.status_code, body=response.text[:500])
            return response.json()

        return retrying(call, what, self.retries)

    def _conclude(self, version: str) -> dict:
        """Once the project holds ``version``'s predictions: select it, and delete the older versions' predictions
        if asked (:attr:`keep_versions`); what to add to the summary."""
        self._select(version)
        return {"versions_deleted": self._delete_older_versions(version)} if self.keep_versions else {}

    def _select(self, version: str) -> None:
        if self.activate and self._project_version != version:
            # The data manager's "Prediction score" column (and its sorting) and the pre-annotations
            # shown to annotators follow the project's selected model version.
            retrying(lambda: self.client.projects.update(id=self.project, model_version=version),
                     "selecting the model version", self.retries)
            log.info("project %s now shows %s", self.project, version)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backend.prelabel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="Label Studio's address, e.g. http://localhost:8080")
    parser.add_argument("--token", required=True, help="a Label Studio access token (legacy token or personal access token)")
    parser.add_argument("--project", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass and per upload")
    parser.add_argument("--page-size", type=int, default=100, help="tasks per page when listing")
    parser.add_argument("--retries", type=int, default=5, help="retries of transient HTTP errors")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("--queue", action="store_true",
                        help="enqueue the project in chunks for workers (python -m backend.worker, REDIS_URL) and "
                             "follow them instead of predicting here")
    parser.add_argument("--annotate-next", type=int, metavar="BATCH",
                        help="order the tasks for active learning, for a next batch of BATCH: the place of each of "
                             f"the next {PLACED_BATCHES} batches' tasks in its data field annotate_next, and the Data "
                             "Manager tab 'Annotate next' in that order; each training job of the project then "
                             "pre-labels it and renews the order (0: no longer)")
    parser.add_argument("--keep-versions", type=int, metavar="K",
                        help="then delete the predictions of this model's versions of the project but the K last "
                             "predicted (this run's and the project's selected one always kept; other models' "
                             "predictions and all annotations stay), as each training job's renewal of the order then "
                             "does too (0: keep every version, the default)")
    parser.add_argument("--keep-project-version", action="store_true",
                        help="don't make this model version the project's selected one at the end")
    args = parser.parse_args(argv)
    if args.annotate_next is not None and args.annotate_next < 0:
        parser.error("--annotate-next takes a batch of 1 or more tasks, or 0 to stop ordering")
    if args.keep_versions is not None and args.keep_versions < 0:
        parser.error("--keep-versions takes 1 or more versions, or 0 to keep every version")
    if args.queue and args.annotate_next:
        parser.error("--annotate-next clusters every task's pass here, and --queue has the workers predict: "
                     "run it without --queue once the workers are done")
    # The model, its weights and MODEL_DIR come from the same environment variables as the backend's.
    settings = dataclasses.replace(Settings(), label_studio_url=args.url, label_studio_api_key=args.token)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the progress bar
    queue = job_queue(settings) if args.queue else None
    if args.queue and queue is None:
        sys.exit("prelabel: --queue needs REDIS_URL, the queue the workers take jobs from")
    service = SegmentationService(settings)
    if queue is None:  # the model runs here; with --queue the workers have it
        service.start()
        try:
            service.runtime.model(wait=3600)  # fail now, clearly, if the weights are missing
        except ServiceError as error:
            sys.exit(f"prelabel: {error}")
    try:
        client = LabelStudioClient(args.url, args.token).sdk
    except LabelStudioError as error:
        sys.exit(f"prelabel: {error}")
    if args.annotate_next is not None:
        service.store.set_annotate_next(str(args.project), args.annotate_next)
    if args.keep_versions is not None:
        service.store.set_keep_versions(str(args.project), args.keep_versions)
    prelabeler = Prelabeler(client, service, args.project, args.batch_size, args.page_size, args.retries,
                            activate=not args.keep_project_version, annotate_next=args.annotate_next or 0,
                            keep_versions=args.keep_versions or 0)
    try:
        counts = (prelabeler.enqueue(queue, progress=not args.no_progress) if queue is not None
                  else prelabeler.run(progress=not args.no_progress))
    except ServiceError as error:  # e.g. a label config without a segmentation tag
        sys.exit(f"prelabel: project {args.project}: {error}")
    print(json.dumps(counts))
    if counts["failed"] or counts.get("chunks_failed"):
        sys.exit(2)


if __name__ == "__main__":
    main()
