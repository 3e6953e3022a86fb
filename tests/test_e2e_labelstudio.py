"""End to end with a real Label Studio server (installed by `make setup-ls` in .venv-ls)."""
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


def test_label_studio_stores_our_predictions(servers):
    label_studio, backend_url = servers
    scenes = world.test_scenes(4)
    project = label_studio.create_project("e2e", CONFIG)
    label_studio.import_images(project, {f"scene-{i:03d}.png": image for i, (image, _) in enumerate(scenes)})
    label_studio.connect_backend(project, backend_url)
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
