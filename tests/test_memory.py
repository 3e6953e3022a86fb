"""A /predict's peak memory does not grow with its number of tasks (images stream through in chunks)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
MEASURE = """
import json, sys, numpy as np
from pathlib import Path
from backend.app import create_app
from backend.service import SegmentationService
from backend.settings import Settings
from demo.train_clip import CONFIG, DENSE_METHOD, materialize
from tests.conftest import FileServer, png_bytes

def kib(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))

count, model_dir = int(sys.argv[1]), sys.argv[2]
server = FileServer()
from PIL import Image
from demo import world
scene = world.test_scenes(1, seed=5)[0][0]
photo = np.asarray(Image.fromarray(scene).resize((1200, 900), Image.BICUBIC))  # 3.2 MB decoded
path = server.add("photo.png", png_bytes(photo))
settings = Settings(clip_model=str(CONFIG), clip_pretrained=str(materialize()), inference_size=128,
                    dense_method=DENSE_METHOD, model_dir=Path(model_dir), label_studio_url=server.url,
                    label_studio_api_key="good-token", predict_batch_size=4)
service = SegmentationService(settings)
service.start()
client = create_app(settings, service).test_client()
config = (Path("labeling_config") / "demo-world.xml").read_text()
warm = client.post("/predict", json={"tasks": [{"id": 0, "data": {"image": path}}], "label_config": config})
assert warm.status_code == 200
Path("/proc/self/clear_refs").write_text("5")  # peak := now
before = kib("VmRSS")
answer = client.post("/predict", json={"tasks": [{"id": i, "data": {"image": path}} for i in range(count)],
                                       "label_config": config}).get_json()
assert all("result" in r for r in answer["results"]) and len(answer["results"]) == count
print(json.dumps({"peak_added_mib": (kib("VmHWM") - before) / 1024}))
"""


def peak_added_mib(count: int, tmp_path: Path) -> float:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(count), str(tmp_path / f"m{count}")], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_added_mib"]


def test_peak_memory_of_a_predict_does_not_grow_with_its_tasks(tmp_path):
    few, many = peak_added_mib(4, tmp_path), peak_added_mib(60, tmp_path)
    # Holding every image at once would add 56 × 3.2 MB ≈ 180 MiB for the larger request (measured: 4–8 MiB).
    assert many - few < 30, (few, many)
