"""End to end with a real Label Studio server (installed by `make setup-ls` in .venv-ls)."""
import io
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from backend.annotations import region_mask
from backend.check import ConnectionCheck
from backend.images import ImageFetcher
from backend.label_studio_client import LabelStudioClient
from demo import world
from demo.labelstudio import LABEL_STUDIO_BIN, ROOT, LabelStudio, backend_env, free_port, start_backend

pytestmark = [pytest.mark.labelstudio,
              pytest.mark.skipif(not LABEL_STUDIO_BIN.exists(), reason="Label Studio not installed (make setup-ls)")]

LABELS = "".join(f'<Label value="{name}"/>' for name in world.NAMES)
CONFIG = (f'<View><Image name="image" value="$image"/>'
          f'<BrushLabels name="mask" toName="image">{LABELS}</BrushLabels>'
          f'<PolygonLabels name="outline" toName="image" model_score_threshold="0.2">{LABELS}</PolygonLabels></View>')


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    label_studio = LabelStudio(work / "ls", port=free_port()).start()
    backend = None
    try:
        backend_port = free_port()
        backend = start_backend(backend_port, work / "model_dir", label_studio)
        yield label_studio, f"http://127.0.0.1:{backend_port}", work / "model_dir"
    finally:
        if backend:
            backend.stop()
        label_studio.stop()


def connected_project(servers, title: str, config: str, images: dict[str, np.ndarray]) -> tuple[int, int]:
    """A project with ``images`` as tasks and our backend connected: (project id, ML backend id)."""
    label_studio, backend_url, _ = servers
    project = label_studio.create_project(title, config)
    label_studio.import_images(project, images)
    return project, label_studio.connect_backend(project, backend_url)


def scene_project(servers, title: str, config: str, scene_sets: dict[str, list]) -> tuple[int, int, dict]:
    """A connected project with each set's scenes as tasks named ``<set>-NNN.png``; also, per set,
    a map from task id to the scene's index."""
    images = {f"{kind}-{i:03d}.png": image for kind, scenes in scene_sets.items()
              for i, (image, _) in enumerate(scenes)}
    project, ml = connected_project(servers, title, config, images)
    tasks = servers[0].tasks(project)
    ids = {kind: {t["id"]: int(t["data"]["image"][-7:-4]) for t in tasks if f"{kind}-" in t["data"]["image"]}
           for kind in scene_sets}
    return project, ml, ids


def test_label_studio_stores_our_predictions(servers):
    label_studio, _, _ = servers
    scenes = world.test_scenes(4)
    project, _ = connected_project(servers, "e2e", CONFIG,
                                   {f"scene-{i:03d}.png": image for i, (image, _) in enumerate(scenes)})
    label_studio.retrieve_predictions(project)
    tasks = label_studio.tasks(project)
    assert len(tasks) == 4
    for task in tasks:
        assert task["predictions"], f"task {task['id']} has no prediction"
        prediction = task["predictions"][-1]
        assert "demo-clip" in prediction["model_version"]
        brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        polygons = [r for r in prediction["result"] if r["type"] == "polygonlabels"]
        assert brushes and polygons
        covered = np.zeros((128, 128), int)
        for region in brushes:
            assert region["value"]["brushlabels"][0] in world.NAMES
            assert (region["original_height"], region["original_width"]) == (128, 128)
            mask = region_mask(region, 128, 128)
            assert mask.shape == (128, 128) and mask.any()
            covered += mask
        # Brush regions never overlap; pixels of pruned (unlikely) labels are left uncovered.
        assert covered.max() == 1 and covered.mean() > 0.25
        for region in polygons:
            assert region["value"]["polygonlabels"][0] in world.NAMES
            assert len(region["value"]["points"]) >= 3 and region_mask(region, 128, 128).any()


SMART_CONFIG = CONFIG.replace("</View>", f'<KeyPointLabels name="click" toName="image" smart="true">{LABELS}'
                                          f'</KeyPointLabels><RectangleLabels name="box" toName="image" smart="true">'
                                          f'{LABELS}</RectangleLabels></View>')


def smart_region(kind: str, label: str, value: dict, positive: bool = True) -> dict:
    """A smart region as Label Studio 1.23's editor puts it in the context (its ``regionFinishedDrawing``
    handler sends the annotation's smart regions of that tool and label, serialised)."""
    return {"id": f"{kind[:3]}{len(str(value))}", "from_name": "click" if kind == "keypointlabels" else "box",
            "to_name": "image", "type": kind, "origin": "manual", "original_width": 128, "original_height": 128,
            "image_rotation": 0, "value": {**value, kind: [label], "labels": [label]}, "is_positive": positive}


def test_smart_clicks_and_boxes_through_label_studio(servers):
    label_studio, backend_url, _ = servers
    image, truth = world.test_scenes(1, seed=31)[0]
    project = label_studio.create_project("interactive", SMART_CONFIG)
    label_studio.import_images(project, {"scene.png": image})
    ml = label_studio.connect_backend(project, backend_url, interactive=True)
    task = label_studio.tasks(project)[0]["id"]

    def suggest(*regions: dict) -> dict:
        answer = label_studio.api("POST", f"/api/ml/{ml}/interactive-annotating",
                                  json={"task": task, "context": {"result": list(regions)}})
        assert "errors" not in answer, answer
        return answer["data"]

    label = world.NAMES[int(np.bincount(truth.ravel()).argmax())]
    rows, cols = np.nonzero(truth == world.NAMES.index(label))
    y, x = int(rows[len(rows) // 2]), int(cols[len(cols) // 2])
    click = smart_region("keypointlabels", label, {"x": 100 * (x + 0.5) / 128, "y": 100 * (y + 0.5) / 128, "width": 0.6})
    suggestion = suggest(click)
    brushes = [r for r in suggestion["result"] if r["type"] == "brushlabels"]
    outlines = [r for r in suggestion["result"] if r["type"] == "polygonlabels"]
    assert brushes and outlines and {r["value"][r["type"]][0] for r in suggestion["result"]} == {label}
    mask = region_mask(brushes[0], 128, 128)
    assert mask[y, x] and (mask & (truth == world.NAMES.index(label))).sum() > 0.8 * mask.sum()
    assert suggestion["model_version"].startswith("demo-clip")

    # a box on the same label keeps it inside
    box = smart_region("rectanglelabels", label, {"x": 10, "y": 10, "width": 40, "height": 40, "rotation": 0})
    boxed = region_mask([r for r in suggest(box)["result"] if r["type"] == "brushlabels"][0], 128, 128)
    assert boxed.any() and not boxed[:12].any() and not boxed[:, 65:].any()

    # a click outside the image gets an error for that task, and Label Studio stores nothing
    refused = suggest(smart_region("keypointlabels", label, {"x": 140, "y": 5, "width": 0.6}))
    assert "result" not in refused and "outside the image" in refused["error"]
    assert not label_studio.tasks(project)[0]["predictions"]


def _miou(label_studio, project, scenes, ids, config, classes=None):
    from backend.annotations import results_to_label_map
    from backend.label_config import parse_targets
    from model.evaluation import ConfusionMatrix

    target = parse_targets(config)[0]
    confusion = ConfusionMatrix(len(world.NAMES))
    versions = set()
    for task in label_studio.tasks(project):
        if task["id"] in ids:
            prediction = max(task["predictions"], key=lambda p: p["id"])  # the newest
            versions.add(prediction["model_version"])
            truth = scenes[ids[task["id"]]][1]
            confusion.update(truth, results_to_label_map(prediction["result"], target, *truth.shape))
    if classes == "all":
        return versions, confusion.miou()
    base = [world.NAMES.index(n) for n in world.BASE]
    novel = [world.NAMES.index(n) for n in world.NOVEL]
    return versions, confusion.miou(base), confusion.miou(novel)


def test_corrections_made_in_label_studio_train_a_better_model(servers):
    """Correct images that show only the base classes in Label Studio, train through its train action,
    predict again: the corrected labels improve, and the labels no corrected image shows are kept."""
    from tests.test_learning import BASE, LABEL_CONFIG, annotation_results

    label_studio = servers[0]
    train_scenes, held_out = world.test_scenes(100, seed=99, classes=BASE), world.test_scenes(60)
    project, ml, ids = scene_project(servers, "learning loop", LABEL_CONFIG, {"train": train_scenes, "held": held_out})
    held_ids, train_ids = ids["held"], ids["train"]
    label_studio.retrieve_predictions(project)
    versions_before, base_before, novel_before = _miou(label_studio, project, held_out, held_ids, LABEL_CONFIG)

    for task_id, index in train_ids.items():
        label_studio.api("POST", f"/api/tasks/{task_id}/annotations",
                         json={"result": annotation_results(train_scenes[index][1]), "was_cancelled": False})
    _train_and_wait(servers, project, ml)
    label_studio.retrieve_predictions(project)
    versions_after, base_after, novel_after = _miou(label_studio, project, held_out, held_ids, LABEL_CONFIG)
    print(f"Label Studio loop, held-out mIoU: base {base_before:.1f} → {base_after:.1f}, "
          f"novel {novel_before:.1f} → {novel_after:.1f}; {versions_before} → {versions_after}")
    assert len(versions_after) == 1 and "-v1:" in next(iter(versions_after))
    assert base_after >= base_before + 10
    # Labels absent from every corrected image are not forgotten.
    assert novel_after >= novel_before - 1.5


def test_label_studio_annotation_events_reach_the_store(servers):
    """Created, updated and deleted annotations arrive as Label Studio's own webhooks."""
    import requests

    from tests.test_learning import LABEL_CONFIG, annotation_results

    label_studio, backend_url, _ = servers
    scenes = world.test_scenes(2)
    project, _ = connected_project(servers, "webhooks", LABEL_CONFIG,
                                   {f"s{i}.png": image for i, (image, _) in enumerate(scenes)})
    task = label_studio.tasks(project)[0]

    def stored(expected: int, changes: int) -> None:
        deadline = time.time() + 30
        while (counts := requests.get(f"{backend_url}/metrics", headers={"Accept": "application/json"},
                                           timeout=5).json()["annotations"].get(str(project))) \
                != {"stored": expected, "changes_since_training": changes}:
            assert time.time() < deadline, counts
            time.sleep(0.3)

    annotation = label_studio.api("POST", f"/api/tasks/{task['id']}/annotations",
                                  json={"result": annotation_results(scenes[0][1])})
    stored(1, changes=1)
    label_studio.api("PATCH", f"/api/annotations/{annotation['id']}", json={"result": annotation_results(scenes[1][1])})
    stored(1, changes=2)  # replaced, not added
    label_studio.api("DELETE", f"/api/annotations/{annotation['id']}")
    stored(0, changes=3)
    # A skip (what the editor's Skip posts) is not stored and changes nothing.
    label_studio.api("POST", f"/api/tasks/{task['id']}/annotations", json={"result": [], "was_cancelled": True})
    annotation = label_studio.api("POST", f"/api/tasks/{label_studio.tasks(project)[1]['id']}/annotations",
                                  json={"result": annotation_results(scenes[1][1])})
    stored(1, changes=4)  # the skip's webhook came first


def prelabel(servers, project: int, *args: str) -> subprocess.Popen:
    """``python -m backend.prelabel`` for ``project`` with the backend's model and MODEL_DIR."""
    label_studio, _, model_dir = servers
    return subprocess.Popen([sys.executable, "-m", "backend.prelabel", "--url", label_studio.url, "--token",
                             label_studio.token, "--project", str(project), *args],
                            env=backend_env(model_dir, label_studio), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(process: subprocess.Popen, timeout: float = 600) -> dict:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    assert "images/s" in err  # the progress bar
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pool_project(servers):
    """200 demo tasks (140 to choose annotations from, 60 held out), pre-labeled by the CLI, which is
    killed halfway through its first run and restarted."""
    from tests.test_learning import LABEL_CONFIG

    label_studio = servers[0]
    pool, held_out = world.test_scenes(140, seed=2024), world.test_scenes(60)
    project, ml, ids = scene_project(servers, "active learning", LABEL_CONFIG, {"pool": pool, "held": held_out})

    first = prelabel(servers, project, "--batch-size", "4")
    deadline = time.time() + 300
    while (stored := label_studio.api("GET", f"/api/projects/{project}")["total_predictions_number"]) < 100:
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)  # a hard crash halfway
    first.wait()
    resumed = finished(prelabel(servers, project))
    return {"project": project, "ml": ml, "ids": ids, "pool": pool, "held_out": held_out, "killed_at": stored,
            "resumed": resumed, "config": LABEL_CONFIG}


def test_prelabel_cli_resumes_after_a_crash_without_duplicates(servers, pool_project):
    label_studio = servers[0]
    resumed, project = pool_project["resumed"], pool_project["project"]
    print(f"prelabel killed with {pool_project['killed_at']} of 200 stored; the rerun: {resumed}")
    assert 0 < resumed["skipped"] < 200 and resumed["skipped"] + resumed["predicted"] == 200
    assert resumed["failed"] == 0
    tasks = label_studio.tasks(project)
    assert len(tasks) == 200
    for task in tasks:
        current = [p for p in task["predictions"] if p["model_version"] == resumed["model_version"]]
        assert len(current) == 1 and len(task["predictions"]) == 1, task["id"]
        # A task whose every label is unlikely gets no region, but still its score.
        assert isinstance(current[0]["result"], list) and 0 < current[0]["score"] <= 1
    again = finished(prelabel(servers, project))
    assert (again["skipped"], again["predicted"]) == (200, 0)


def _train_and_wait(servers, project: int, ml: int) -> dict:
    """Label Studio's train action for the project's backend; wait for the project's next version and for its job
    to end (it may pre-label the project with the version after it); the job's status."""
    import requests

    label_studio, backend_url, _ = servers

    def versions() -> int:
        listed = requests.get(f"{backend_url}/versions", timeout=5).json()["versions"]
        return sum(v["project"] == str(project) for v in listed)

    before = versions()
    label_studio.api("POST", f"/api/ml/{ml}/train", json={})
    deadline = time.time() + 900
    while True:
        status = requests.get(f"{backend_url}/health", timeout=5).json()["training"].get(str(project), {})
        assert time.time() < deadline and status.get("state") != "failed", status
        if versions() > before and status.get("state") == "finished":
            return status
        time.sleep(2)


def test_the_active_learning_loop_through_label_studio(servers, pool_project):
    """The active-learning recipe: ``prelabel --annotate-next 20`` clusters the tasks, writes the place of each of
    the next batches' tasks in the order into its data and makes the Data Manager tab "Annotate next"; the
    annotator takes 20 tasks from that tab's *Label Tasks As Displayed* (annotated here from ground truth) and
    trains, and the training job pre-labels the project again, renews the order and deletes the round before's
    predictions (``--keep-versions 1``); and 20 random tasks, same training seed. The tab gives the tasks in the order's places, one task per cluster, and both arms beat
    zero-shot; which beats which by how much is bench.active_learning's to report over many draws (README)."""
    from backend.prelabel import ANNOTATE_NEXT_TAB, PLACED_BATCHES, RANK_FIELD
    from tests.test_learning import annotation_results

    label_studio = servers[0]
    project, ml, ids = pool_project["project"], pool_project["ml"], pool_project["ids"]
    pool, held_out, config = pool_project["pool"], pool_project["held_out"], pool_project["config"]
    _, zero_shot = _miou(label_studio, project, held_out, ids["held"], config, classes="all")
    trained = 0

    def annotate(task: int) -> dict:
        return label_studio.api("POST", f"/api/tasks/{task}/annotations",
                                json={"result": annotation_results(pool[ids["pool"][task]][1], range(len(world.NAMES)))})

    def train_and_predict() -> None:
        """The train action; the job itself pre-labels every task with its version and renews the order, since the
        project was ordered (the command below then finds nothing to predict)."""
        nonlocal trained
        renewed = _train_and_wait(servers, project, ml)["prelabel"]
        trained += 1
        assert renewed["predicted"] == 200 and f"-v{trained}:" in renewed["model_version"]
        # --keep-versions 1: the renewal deleted the round before's predictions, so each task holds one.
        assert len(renewed["versions_deleted"]) == 1
        assert label_studio.api("GET", f"/api/projects/{project}/model-versions/") == {renewed["model_version"]: 200}
        order = renewed["annotate_next"]
        assert order["placed"] == PLACED_BATCHES * 20 and len(order["next"]) == 20 and not order["failed_tasks"]
        rerun = finished(prelabel(servers, project))
        assert (rerun["predicted"], rerun["skipped"], rerun["model_version"]) == (0, 200, renewed["model_version"])

    ordered = finished(prelabel(servers, project, "--annotate-next", "20", "--keep-versions", "1"))["annotate_next"]
    assert ordered["clusters"] == 20 and ordered["predictions_updated"] == 200 and not ordered["failed_tasks"]
    # Places for the next PLACED_BATCHES batches of 20; Label Studio lists the tasks without one after them.
    assert ordered["placed"] == ordered["places_updated"] == PLACED_BATCHES * 20 and len(ordered["next"]) == 20
    # A second run over the same predictions finds every place and the tab as they are.
    again = finished(prelabel(servers, project, "--annotate-next", "20"))["annotate_next"]
    assert (again["tab"], again["next"], again["places_updated"]) == (ordered["tab"], ordered["next"], 0)
    tab = label_studio.api("GET", f"/api/dm/views/{ordered['tab']}?project={project}")
    assert tab["data"]["title"] == ANNOTATE_NEXT_TAB
    # The tab shows the review score: Label Studio computes it only for a tab that names the columns it hides.
    listed = label_studio.api("GET", f"/api/tasks?project={project}&view={tab['id']}&page_size=5")["tasks"]
    assert len(listed) == 5 and all(task["predictions_score"] is not None for task in listed)
    clusters, places = {}, {}
    for task in label_studio.tasks(project):
        (prediction,) = task["predictions"]
        clusters[task["id"]] = prediction["cluster"]
        if RANK_FIELD not in task["data"]:
            continue
        places[task["id"]] = task["data"][RANK_FIELD]
        if task["id"] in ids["held"]:  # not the annotator's to label: out of the order, so the tab lists it last
            data = {key: value for key, value in task["data"].items() if key != RANK_FIELD}
            label_studio.api("PATCH", f"/api/tasks/{task['id']}", json={"data": data})
    assert sorted(places, key=places.get)[:20] == ordered["next"]
    streamed, annotations = [], []
    for _ in range(20):  # the annotator's "Label Tasks As Displayed" in the tab, as the Data Manager asks for it
        body = {"ordering": tab["data"]["ordering"], "filters": tab["data"]["filters"]}
        streamed.append(label_studio.api("POST", f"/api/dm/actions?id=next_task&project={project}&tabID={tab['id']}",
                                         json=body)["id"])
        annotations.append(annotate(streamed[-1]))
    assert streamed == sorted(places.keys() & ids["pool"], key=places.get)[:20]
    # The order's first 20 places: one task of each cluster (the held-out tasks among them are skipped here).
    assert len({clusters[t] for t in ordered["next"]}) == 20
    train_and_predict()
    _, stream = _miou(label_studio, project, held_out, ids["held"], config, classes="all")
    for annotation in annotations:  # the random arm starts from no annotations
        label_studio.api("DELETE", f"/api/annotations/{annotation['id']}")
    for task in np.random.default_rng(0).choice(sorted(ids["pool"]), 20, replace=False):
        annotate(int(task))
    train_and_predict()
    _, random = _miou(label_studio, project, held_out, ids["held"], config, classes="all")
    print(f"active learning, held-out mIoU: zero-shot {zero_shot:.1f}, 20 from the label stream {stream:.1f}, "
          f"20 random {random:.1f}")
    assert stream > zero_shot + 5 and random > zero_shot + 5


def test_the_connection_check_passes_where_label_studio_is_set_up_as_the_readme_says(servers):
    label_studio, backend_url, _ = servers
    project, _ = connected_project(servers, "Connection check", CONFIG, {"c.png": world.test_scenes(1)[0][0]})
    out = io.StringIO()
    assert ConnectionCheck(label_studio.url, label_studio.token, project, backend_url).run(out), out.getvalue()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and all(line.startswith("ok") for line in lines), lines
    assert "128x128 pixels" in lines[1] and "reached" in lines[3]
    hooks = label_studio.api("GET", f"/api/webhooks/?project={project}") or []
    assert not [hook for hook in hooks if hook.get("actions") == ["PROJECT_UPDATED"]]  # the check removed its own
    print("\n" + out.getvalue())


def test_the_connection_check_names_what_a_stock_label_studio_refuses(servers, tmp_path):
    """A Label Studio started without the README's two settings: the check says which one to set."""
    _, backend_url, _ = servers
    stock = LabelStudio(tmp_path / "stock", port=free_port(), allow_local_backends=False).start()
    try:
        project = stock.create_project("Stock Label Studio", CONFIG)
        stock.import_images(project, {"s.png": world.test_scenes(1)[0][0]})
        with pytest.raises(Exception, match="reserved network address"):  # what a user sees when connecting
            stock.connect_backend(project, backend_url)
        out = io.StringIO()
        assert not ConnectionCheck(stock.url, stock.token, project, backend_url).run(out)
        lines = out.getvalue().splitlines()
        assert lines[0].startswith("ok") and lines[1].startswith("ok"), lines  # its API and images are fine
        assert lines[2].startswith("FAIL") and "ML_BLOCK_LOCAL_IP=false" in lines[2], lines
        assert lines[3].startswith("FAIL") and "SSRF_PROTECTION_ENABLED=false" in lines[3], lines
        print("\n" + out.getvalue())
    finally:
        stock.stop()


def test_a_personal_access_token_fetches_label_studio_images(servers):
    """The newer kind of token, made as the web UI makes it: exchanged, cached and used by the one client."""
    label_studio = servers[0]
    project = label_studio.create_project("Personal token", CONFIG)
    image = world.test_scenes(1)[0][0]
    label_studio.import_images(project, {"p.png": image})
    path = label_studio.tasks(project)[0]["data"]["image"]
    token = label_studio.personal_access_token()
    fetcher = ImageFetcher(label_studio.url, token)
    assert fetcher.label_studio.uses_access_tokens
    assert np.array_equal(fetcher.fetch(path), image)
    assert LabelStudioClient(label_studio.url, token).label_config(project) == CONFIG  # the SDK's calls too
