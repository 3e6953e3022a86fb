"""End to end with a real Label Studio server (installed by `make setup-ls` in .venv-ls)."""
import time

import numpy as np
import pytest

from backend.annotations import region_mask
from demo import world
from demo.labelstudio import LABEL_STUDIO_BIN, LabelStudio, free_port, start_backend

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
        yield label_studio, f"http://127.0.0.1:{backend_port}"
    finally:
        if backend:
            backend.stop()
        label_studio.stop()


def connected_project(servers, title: str, config: str, images: dict[str, np.ndarray]) -> tuple[int, int]:
    """A project with ``images`` as tasks and our backend connected: (project id, ML backend id)."""
    label_studio, backend_url = servers
    project = label_studio.create_project(title, config)
    label_studio.import_images(project, images)
    return project, label_studio.connect_backend(project, backend_url)


def test_label_studio_stores_our_predictions(servers):
    label_studio, _ = servers
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
        assert covered.max() == 1 and covered.mean() > 0.9  # brush regions partition the image
        for region in polygons:
            assert region["value"]["polygonlabels"][0] in world.NAMES
            assert len(region["value"]["points"]) >= 3 and region_mask(region, 128, 128).any()


def _miou(label_studio, project, scenes, ids, config):
    from backend.annotations import results_to_label_map
    from backend.label_config import parse_targets
    from model.metrics import ConfusionMatrix

    target = parse_targets(config)[0]
    confusion = ConfusionMatrix(len(world.NAMES))
    versions = set()
    for task in label_studio.tasks(project):
        if task["id"] in ids:
            prediction = task["predictions"][-1]
            versions.add(prediction["model_version"])
            truth = scenes[ids[task["id"]]][1]
            confusion.update(truth, results_to_label_map(prediction["result"], target, *truth.shape))
    base = [world.NAMES.index(n) for n in world.BASE]
    novel = [world.NAMES.index(n) for n in world.NOVEL]
    return versions, confusion.miou(base), confusion.miou(novel)


def test_corrections_made_in_label_studio_train_a_better_model(servers):
    """Annotate base classes in Label Studio, train through its train action, predict again."""
    import requests

    from tests.test_learning import LABEL_CONFIG, annotation_results

    label_studio, backend_url = servers
    train_scenes, held_out = world.test_scenes(100, seed=99), world.test_scenes(60)
    images = {f"train-{i:03d}.png": image for i, (image, _) in enumerate(train_scenes)}
    images.update({f"held-{i:03d}.png": image for i, (image, _) in enumerate(held_out)})
    project, ml = connected_project(servers, "learning loop", LABEL_CONFIG, images)
    tasks = label_studio.tasks(project)
    held_ids = {t["id"]: int(t["data"]["image"][-7:-4]) for t in tasks if "held-" in t["data"]["image"]}
    train_ids = {t["id"]: int(t["data"]["image"][-7:-4]) for t in tasks if "train-" in t["data"]["image"]}
    label_studio.retrieve_predictions(project)
    versions_before, base_before, novel_before = _miou(label_studio, project, held_out, held_ids, LABEL_CONFIG)

    for task_id, index in train_ids.items():
        label_studio.api("POST", f"/api/tasks/{task_id}/annotations",
                         json={"result": annotation_results(train_scenes[index][1]), "was_cancelled": False})
    label_studio.api("POST", f"/api/ml/{ml}/train", json={})
    deadline = time.time() + 900
    while not requests.get(f"{backend_url}/versions", timeout=5).json()["versions"]:
        status = requests.get(f"{backend_url}/health", timeout=5).json()["training"]
        assert time.time() < deadline and all(s.get("state") != "failed" for s in status.values()), status
        time.sleep(2)
    label_studio.retrieve_predictions(project)
    versions_after, base_after, novel_after = _miou(label_studio, project, held_out, held_ids, LABEL_CONFIG)
    print(f"Label Studio loop, held-out mIoU: base {base_before:.1f} → {base_after:.1f}, "
          f"novel {novel_before:.1f} → {novel_after:.1f}; {versions_before} → {versions_after}")
    assert len(versions_after) == 1 and "-v1:" in next(iter(versions_after))
    assert base_after > base_before + 5
    assert novel_after >= novel_before  # the labels nobody corrected are not forgotten


def test_label_studio_annotation_events_reach_the_store(servers):
    """Created, updated and deleted annotations arrive as Label Studio's own webhooks."""
    import requests

    from tests.test_learning import LABEL_CONFIG, annotation_results

    label_studio, backend_url = servers
    scenes = world.test_scenes(2)
    project, _ = connected_project(servers, "webhooks", LABEL_CONFIG,
                                   {f"s{i}.png": image for i, (image, _) in enumerate(scenes)})
    task = label_studio.tasks(project)[0]

    def stored(expected: int, changes: int) -> None:
        deadline = time.time() + 30
        while (counts := requests.get(f"{backend_url}/metrics", timeout=5).json()["annotations"].get(str(project))) \
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
