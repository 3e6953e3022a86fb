"""The pre-labeler's resume and retry logic against an in-memory Label Studio."""
import json
from types import SimpleNamespace

import httpx
import pytest
from label_studio_sdk.core.api_error import ApiError

from backend.pipeline import TaskPrediction
from backend.prelabel import Prelabeler

VERSION = "model@zero-shot:vocab-1"
CONFIG = '<View><Image name="i" value="$image"/><BrushLabels name="m" toName="i"><Label value="a"/></BrushLabels></View>'


class FakeLabelStudio:
    """Tasks, predictions and the project's selected version; uploads can be made to fail."""

    def __init__(self, task_count: int, failures: list[Exception] | None = None, store_before_failing=False):
        self.predictions: dict[int, list[str]] = {i: [] for i in range(1, task_count + 1)}
        self.failures = list(failures or [])
        self.store_before_failing = store_before_failing  # the answer is lost after the commit
        self.model_version = ""
        self.tasks = SimpleNamespace(list=self._list)
        self.projects = SimpleNamespace(get=self._get, update=self._update, import_predictions=self._import)

    def _list(self, project, page_size, query, include, request_options):
        ids = sorted(self.predictions)
        if query:
            ids = json.loads(query)["selectedItems"]["included"]
        return iter([SimpleNamespace(id=i, data={"image": f"/img/{i}.png"},
                                     predictions_model_versions=",".join(self.predictions[i])) for i in ids])

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
            self.predictions[prediction["task"]].append(prediction["model_version"])


class FakeService:
    """The library-level service a Prelabeler drives; predicts every task except those whose id is in ``broken``."""

    def __init__(self, broken=()):
        self.broken = set(broken)
        self.predicted: list[int] = []
        serving = SimpleNamespace(model_version=lambda targets: VERSION)
        self.runtime = SimpleNamespace(naming=lambda project: serving, serving=lambda project: serving)
        self.projects = SimpleNamespace(set_up=lambda project, label_config: None)
        self.pipeline = SimpleNamespace(predict=self._predict)

    def _predict(self, project, tasks, targets, serving, views=False):
        self.predicted += [t["id"] for t in tasks]
        return [TaskPrediction(error="broken image") if t["id"] in self.broken else
                TaskPrediction([{"id": "r"}], 0.5) for t in tasks]


def run(client, service, **kwargs):
    return Prelabeler(client, service, project=1, batch_size=4, **kwargs).run(progress=False)


def test_resumes_where_it_stopped_and_selects_the_version():
    client = FakeLabelStudio(10)
    for task in (1, 2, 3):
        client.predictions[task] = [VERSION]
    client.predictions[4] = ["an older version"]
    service = FakeService()
    counts = run(client, service)
    assert {k: counts[k] for k in ("model_version", "tasks", "skipped", "predicted", "failed")} == \
        {"model_version": VERSION, "tasks": 10, "skipped": 3, "predicted": 7, "failed": 0}
    assert sorted(service.predicted) == list(range(4, 11))
    assert all(versions.count(VERSION) == 1 for versions in client.predictions.values())
    assert client.model_version == VERSION
    assert run(client, FakeService())["predicted"] == 0


@pytest.mark.parametrize("stored", [False, True])
def test_transient_upload_errors_are_retried_without_duplicates(monkeypatch, stored):
    monkeypatch.setattr("time.sleep", lambda _: None)
    client = FakeLabelStudio(8, [ApiError(status_code=502), httpx.ReadTimeout("slow")], store_before_failing=stored)
    counts = run(client, FakeService())
    assert counts["predicted"] == 8
    assert all(versions == [VERSION] for versions in client.predictions.values())


def test_permanent_errors_stop_and_broken_images_are_left_for_the_next_run(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda _: None)
    with pytest.raises(ApiError):
        run(FakeLabelStudio(4, [ApiError(status_code=400)]), FakeService())
    client = FakeLabelStudio(6)
    counts = run(client, FakeService(broken={2}))
    assert (counts["predicted"], counts["failed"]) == (5, 1) and client.predictions[2] == []
    assert run(client, FakeService())["predicted"] == 1
