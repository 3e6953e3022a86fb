"""The pre-labeler's resume and retry logic against an in-memory Label Studio."""
import json
from collections import Counter
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from label_studio_sdk.core.api_error import ApiError

from backend.pipeline import TaskPrediction
from backend.prelabel import ANNOTATE_NEXT_TAB, PLACED_BATCHES, RANK_FIELD, Prelabeler
from model.acquisition import TaskView

VERSION = "model@zero-shot:vocab-1"
CONFIG = '<View><Image name="i" value="$image"/><BrushLabels name="m" toName="i"><Label value="a"/></BrushLabels></View>'


class FakeLabelStudio:
    """Tasks, predictions and the project's selected version; uploads can be made to fail."""

    def __init__(self, task_count: int, failures: list[Exception] | None = None, store_before_failing=False):
        self.stored: dict[int, list[str]] = {i: [] for i in range(1, task_count + 1)}  # model versions per task
        self.failures = list(failures or [])
        self.store_before_failing = store_before_failing  # the answer is lost after the commit
        self.model_version = ""
        self.latest: dict[str, int] = {}  # each version's last upload, in order (Label Studio's "latest")
        self.tasks = SimpleNamespace(list=self._list)
        self.projects = SimpleNamespace(get=self._get, update=self._update, import_predictions=self._import)
        # The model-versions endpoint, which the SDK does not wrap.
        self._client_wrapper = SimpleNamespace(httpx_client=SimpleNamespace(request=self._request))

    def _list(self, project, page_size, include, request_options, query=None, resolve_uri=True):
        ids = sorted(self.stored)
        if query:
            ids = json.loads(query)["selectedItems"]["included"]
        return iter([SimpleNamespace(id=i, data={"image": f"/img/{i}.png"},
                                     predictions_model_versions=",".join(self.stored[i])) for i in ids])

    def _get(self, id):
        return SimpleNamespace(label_config=CONFIG, model_version=self.model_version)

    def _update(self, id, model_version):
        self.model_version = model_version

    def _import(self, id, request, request_options):
        if self.failures:
            error = self.failures.pop(0)
            if self.store_before_failing:
                self._store(request)
            raise error
        self._store(request)

    def _store(self, request):
        for prediction in request:
            self.stored[prediction["task"]].append(prediction["model_version"])
            self.latest[prediction["model_version"]] = max(self.latest.values(), default=0) + 1

    def _request(self, path, method, params=None, json=None, request_options=None):
        if path == "api/dm/columns":  # as Label Studio 1.23.2 lists them, in part
            body = {"columns": [{"id": "image", "parent": "data", "visibility_defaults": {"explore": True}},
                                {"id": "inner_id", "visibility_defaults": {"explore": False, "labeling": False}},
                                {"id": "total_annotations", "visibility_defaults": {"explore": True, "labeling": True}},
                                {"id": "annotators", "visibility_defaults": {"explore": True, "labeling": False}},
                                {"id": "predictions_score", "visibility_defaults": {"explore": False, "labeling": False}},
                                {"id": "data"}]}
        elif method == "GET":
            assert path.endswith("/model-versions/"), path
            counts = Counter(version for versions in self.stored.values() for version in versions)
            body = {"static": [{"model_version": version, "count": count, "latest": f"{self.latest[version]:06d}"}
                               for version, count in counts.items()], "live": None}
        else:
            assert method == "DELETE", method
            deleted = sum(versions.count(json["model_version"]) for versions in self.stored.values())
            self.stored = {task: [v for v in versions if v != json["model_version"]]
                           for task, versions in self.stored.items()}
            body = {"deleted_predictions": deleted}
        return SimpleNamespace(status_code=200, json=lambda: body, text="")


class FakeService:
    """The library-level service a Prelabeler drives; predicts every task except those whose id is in ``broken``."""

    def __init__(self, broken=(), version=VERSION):
        self.broken = set(broken)
        self.predicted: list[int] = []
        serving = SimpleNamespace(model_version=lambda targets: version)
        self.runtime = SimpleNamespace(naming=lambda project: serving, serving=lambda project: serving)
        self.projects = SimpleNamespace(set_up=lambda project, label_config: None)
        self.pipeline = SimpleNamespace(predict=self._predict)

    def start(self) -> None:  # loads the model, in the real one
        pass

    def _predict(self, project, tasks, targets, serving, views=False):
        self.predicted += [t["id"] for t in tasks]
        return [TaskPrediction(error="broken image") if t["id"] in self.broken else
                TaskPrediction([{"id": "r"}], 0.5) for t in tasks]


def run(client, service, **kwargs):
    return Prelabeler(client, service, project=1, batch_size=4, **kwargs).run(progress=False)


def test_resumes_where_it_stopped_and_selects_the_version():
    client = FakeLabelStudio(10)
    for task in (1, 2, 3):
        client.stored[task] = [VERSION]
    client.stored[4] = ["an older version"]
    service = FakeService()
    counts = run(client, service)
    assert {k: counts[k] for k in ("model_version", "tasks", "skipped", "predicted", "failed")} == \
        {"model_version": VERSION, "tasks": 10, "skipped": 3, "predicted": 7, "failed": 0}
    assert sorted(service.predicted) == list(range(4, 11))
    assert all(versions.count(VERSION) == 1 for versions in client.stored.values())
    assert client.model_version == VERSION
    assert run(client, FakeService())["predicted"] == 0


@pytest.mark.parametrize("stored", [False, True])
def test_transient_upload_errors_are_retried_without_duplicates(monkeypatch, stored):
    monkeypatch.setattr("time.sleep", lambda _: None)
    client = FakeLabelStudio(8, [ApiError(status_code=502), httpx.ReadTimeout("slow")], store_before_failing=stored)
    counts = run(client, FakeService())
    assert counts["predicted"] == 8
    assert all(versions == [VERSION] for versions in client.stored.values())


def test_permanent_errors_stop_and_broken_images_are_left_for_the_next_run(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda _: None)
    with pytest.raises(ApiError):
        run(FakeLabelStudio(4, [ApiError(status_code=400)]), FakeService())
    client = FakeLabelStudio(6)
    counts = run(client, FakeService(broken={2}))
    assert (counts["predicted"], counts["failed"]) == (5, 1) and client.stored[2] == []
    assert run(client, FakeService())["predicted"] == 1



def test_keeping_versions_deletes_the_models_older_predictions_and_nothing_else():
    client = FakeLabelStudio(4)
    client._store([{"task": 1, "model_version": "other@v9"}])  # another model's prediction, the oldest
    versions = ["model@zero-shot:vocab-1", "model@p1-v1:vocab-1", "model@p1-v2:vocab-1"]
    assert run(client, FakeService(version=versions[0]), keep_versions=2)["versions_deleted"] == {}
    assert run(client, FakeService(version=versions[1]), keep_versions=2)["versions_deleted"] == {}
    # A third version: the two last predicted stay, the zero-shot one's four predictions go, the other model's stay.
    assert run(client, FakeService(version=versions[2]), keep_versions=2)["versions_deleted"] == {versions[0]: 4}
    assert client.stored[1] == ["other@v9", versions[1], versions[2]] and client.stored[4] == versions[1:]
    # Kept at 1 without selecting the new version: the project's selected one stays as well, and nothing else.
    newer = "model@p1-v3:vocab-1"
    counts = run(client, FakeService(version=newer), keep_versions=1, activate=False)
    assert counts["versions_deleted"] == {versions[1]: 4} and client.model_version == versions[2]
    assert client.stored[2] == [versions[2], newer]
    assert "versions_deleted" not in run(client, FakeService(version=newer))  # 0: every version stays


class OrderedLabelStudio(FakeLabelStudio):
    """Also the tasks' data as stored (a storage URL, resolved only when asked), their annotations, the predictions'
    clusters and the Data Manager's tabs: what ``--annotate-next`` reads and writes."""

    def __init__(self, task_count: int):
        super().__init__(task_count)
        self.data = {i: {"image": f"s3://bucket/{i}.png"} for i in self.stored}
        self.annotated: set[int] = set()
        self.clusters: dict[int, int] = {}
        self.writes, self.tabs = 0, []
        self.tasks = SimpleNamespace(list=self._list, update=self._update_task)
        self.predictions = SimpleNamespace(list=self._predictions, update=self._set_cluster)
        self.views = SimpleNamespace(list=lambda project: list(self.tabs), create=self._create_tab)

    def _list(self, project, page_size, include, request_options, query=None, resolve_uri=True):
        ids = sorted(self.data) if not query else json.loads(query)["selectedItems"]["included"]
        return iter([SimpleNamespace(id=i, data={**self.data[i], "image": f"/tasks/{i}/resolve"} if resolve_uri
                                     else dict(self.data[i]), total_annotations=int(i in self.annotated),
                                     predictions_model_versions=",".join(self.stored[i])) for i in ids])

    def _update_task(self, id, data):
        self.data[int(id)], self.writes = data, self.writes + 1

    def _predictions(self, project):
        return [SimpleNamespace(id=100 + t, task=t, model_version=VERSION, cluster=self.clusters.get(t))
                for t, versions in self.stored.items() if versions]

    def _set_cluster(self, id, cluster):
        self.clusters[id - 100] = cluster

    def _create_tab(self, project, data):
        self.tabs.append(SimpleNamespace(id=7, data=data))
        return self.tabs[-1]


class OrderingService(FakeService):
    """Each task's view: tasks 1–6 look alike, and 7–12; the lower a task's id, the less sure its pre-label."""

    def _predict(self, project, tasks, targets, serving, views=False):
        answers = super()._predict(project, tasks, targets, serving, views)
        for task, answer in zip(tasks, answers, strict=True):
            kind = np.eye(2)[int(task["id"] > 6)]
            answer.view = None if answer.error else TaskView(kind, 0.5, kind, task["id"] / 100)
        return answers


def test_the_order_writes_the_next_batches_places_and_the_tab_and_a_failed_task_comes_last():
    client, service = OrderedLabelStudio(12), OrderingService(broken={1})
    order = run(client, service, annotate_next=2)["annotate_next"]
    # One task of each cluster, the least sure first, before either's second, for the next PLACED_BATCHES batches
    # of 2: task 12 and the task whose image failed have no place, which Label Studio lists after every place.
    places = {task: data[RANK_FIELD] for task, data in client.data.items() if RANK_FIELD in data}
    assert PLACED_BATCHES * 2 == 10 and sorted(places, key=places.get) == [2, 7, 3, 8, 4, 9, 5, 10, 6, 11]
    assert places[2] == "01" and order["next"] == [2, 7] and order["failed_tasks"] == [1]
    assert order["placed"] == order["places_updated"] == 10
    assert set(client.clusters) == set(range(2, 13)) and len(set(client.clusters.values())) == 2
    # The data is written back as stored (the storage URL, not its resolved form), with the place beside it.
    assert client.data[2] == {"image": "s3://bucket/2.png", RANK_FIELD: "01"}
    assert [tab.data["title"] for tab in client.tabs] == [ANNOTATE_NEXT_TAB]
    assert client.tabs[0].data["ordering"] == [f"tasks:data.{RANK_FIELD}"]
    # The tab names the columns it hides (Label Studio's defaults) but the prediction score: Label Studio computes
    # the score column's values only for a tab that names them.
    assert client.tabs[0].data["hiddenColumns"] == {"explore": ["tasks:inner_id"],
                                                    "labeling": ["tasks:inner_id", "tasks:annotators"]}
    # Again, with tasks 2 and 7 annotated since: they lose their places, the others move up and the ten left all
    # fit, the failed task last; the tab stays one.
    client.annotated, client.writes = {2, 7}, 0
    again = run(client, service, annotate_next=2)["annotate_next"]
    assert RANK_FIELD not in client.data[2] and RANK_FIELD not in client.data[7] and client.data[3][RANK_FIELD] == "01"
    assert client.data[12][RANK_FIELD] == "09" and client.data[1][RANK_FIELD] == "10"
    assert again["next"] == [3, 8] and again["tab"] == order["tab"] and len(client.tabs) == 1
    assert client.writes == again["places_updated"] == 12


def test_a_training_job_pre_labels_with_its_version_and_renews_the_order(monkeypatch):
    from backend import training
    from backend.settings import Settings

    client, service = OrderedLabelStudio(12), OrderingService(broken={1})
    monkeypatch.setattr(training, "LabelStudioClient", lambda url, token, **options: SimpleNamespace(sdk=client))
    monkeypatch.setattr(training, "SegmentationService", lambda settings, model_loader: service)
    settings = Settings(label_studio_url="http://127.0.0.1:8080", label_studio_api_key="token")
    counts = training.renew_order(settings, "1", 2)
    assert counts["predicted"] == 11 and counts["failed"] == 1 and client.model_version == VERSION
    assert counts["annotate_next"]["next"] == [2, 7] and client.data[2][RANK_FIELD] == "01"
    assert [tab.data["title"] for tab in client.tabs] == [ANNOTATE_NEXT_TAB]

