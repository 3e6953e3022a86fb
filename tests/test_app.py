import base64
import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.annotations import results_to_label_map
from backend.app import create_app
from backend.label_config import parse_targets
from backend.settings import Settings
from demo import world
from demo.train_clip import CONFIG
from model.evaluation import ConfusionMatrix
from model.task_scores import task_score
from tests.conftest import png_bytes, tasks_on

JSON = {"Accept": "application/json"}
LABEL_CONFIG = (Path(__file__).parents[1] / "labeling_config" / "demo-world.xml").read_text()
POLYGON_CONFIG = LABEL_CONFIG.replace("BrushLabels", "PolygonLabels")


def test_health_setup_versions_metrics(make_client):
    client, service = make_client()
    health = client.get("/health").get_json()
    assert health["status"] == "UP" and client.get("/").status_code == 200
    setup = client.post("/setup", json={"project": "1.1", "schema": LABEL_CONFIG, "hostname": "http://x",
                                        "access_token": "t"})
    assert setup.status_code == 200 and "demo-clip" in setup.get_json()["model_version"]
    versions = client.get("/versions").get_json()
    assert versions["versions"] == [] and "demo-clip" in versions["base_model"]
    assert client.post("/webhook", json={"action": "SOMETHING_NEW"}).get_json()["status"] == "ignored"
    service.runtime.model(wait=60)
    summary = client.get("/metrics", headers=JSON).get_json()  # the JSON of earlier versions, on request
    assert summary["predicted_tasks"] == 0 and summary["webhooks_received"] == 1 and summary["model_state"] == "ready"
    scraped = _scrape(client)  # what Prometheus reads
    assert scraped[("gkc_webhooks_total", (("action", "other"),))] == 1
    assert scraped[("gkc_http_requests_total", (("endpoint", "/setup"), ("status", "200")))] == 1
    assert scraped[("gkc_model_ready", ())] == 1


def test_a_skipped_task_is_not_stored_as_an_annotation(make_client):
    """Label Studio sends a skip as an annotation created (or updated) with ``was_cancelled`` and no result (seen
    in the editor, 1.23.2). It says nothing of the image: stored, its empty result would teach "none of the labels"
    where the tag names other things (``model_background``)."""
    client, service = make_client()

    def event(action, annotation_id, cancelled):
        return {"action": action, "project": {"id": 4, "label_config": LABEL_CONFIG},
                "task": {"id": 40 + annotation_id, "data": {"image": "http://x/i.png"}},
                "annotation": {"id": annotation_id, "result": [], "was_cancelled": cancelled}}

    assert client.post("/webhook", json=event("ANNOTATION_CREATED", 1, False)).status_code == 201
    answer = client.post("/webhook", json=event("ANNOTATION_CREATED", 2, True)).get_json()
    assert answer["annotation"] == "not stored: the task was skipped"
    assert [a["task_id"] for a in service.store.annotations("4")] == [41]
    assert service.store.annotation_counts()["4"] == {"stored": 1, "changes_since_training": 1}
    client.post("/webhook", json=event("ANNOTATION_UPDATED", 1, True))  # submitted, then skipped
    assert service.store.annotations("4") == []
    assert service.store.annotation_counts()["4"] == {"stored": 0, "changes_since_training": 2}
    service.runtime.model(wait=60)  # the model's start ends before the process does


def _scrape(client) -> dict:
    """``/metrics`` as Prometheus parses it: (sample name, sorted labels) → value."""
    response = client.get("/metrics", headers={"Accept": "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"})
    assert response.status_code == 200 and response.content_type.startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.get_data(as_text=True)) for sample in family.samples}


def test_predict_matches_the_model_and_caches_text(make_client, file_server, scenes, loaded_model):
    client, _ = make_client()
    tasks = tasks_on(file_server, scenes)
    response = client.post("/predict", json={"tasks": tasks, "label_config": LABEL_CONFIG, "project": "1.1"})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert len(body["results"]) == len(tasks)
    target = parse_targets(LABEL_CONFIG)[0]
    direct = loaded_model.predictor().predict([image for image, _ in scenes], target.vocabulary,
                                               Settings().region_rules())
    served, model = ConfusionMatrix(len(world.NAMES)), ConfusionMatrix(len(world.NAMES))
    for (_image, truth), entry, prediction in zip(scenes, body["results"], direct, strict=True):
        assert entry["model_version"] == body["model_version"] and "meta" not in entry
        assert entry["score"] == pytest.approx(task_score(prediction), rel=1e-3)  # TASK_SCORE=mean
        assert all(r["value"]["brushlabels"][0] in world.NAMES for r in entry["result"])
        served.update(truth, results_to_label_map(entry["result"], target, *truth.shape))
        model.update(truth, prediction.label_map)
    assert served.miou() == pytest.approx(model.miou(), abs=1e-9)  # nothing lost in the service

    forwards = loaded_model.encoder.forward_count
    assert client.post("/predict", json={"tasks": tasks[:2], "label_config": LABEL_CONFIG}).status_code == 200
    assert loaded_model.encoder.forward_count == forwards  # warm vocabulary: no text forward


def test_review_options_report_unsure_pixels(make_client, file_server, scenes, loaded_model):
    client, _ = make_client(unsure_below=0.6, task_score="sure_pixels")
    body = client.post("/predict", json={"tasks": tasks_on(file_server, scenes[:3]),
                                         "label_config": LABEL_CONFIG}).get_json()
    vocabulary = parse_targets(LABEL_CONFIG)[0].vocabulary
    direct = loaded_model.predictor().predict([image for image, _ in scenes[:3]], vocabulary, Settings().region_rules())
    for entry, prediction in zip(body["results"], direct, strict=True):
        unsure = float((prediction.confidence < 0.6).mean())
        assert entry["meta"] == {"unsure_fraction": pytest.approx(unsure, abs=1e-4), "unsure_below": 0.6}
        assert entry["score"] == pytest.approx(1 - unsure, abs=1e-4)
    assert len({entry["score"] for entry in body["results"]}) > 1
    with pytest.raises(ValueError, match="TASK_SCORE"):
        Settings(task_score="entropy")


def test_polygon_predictions(make_client, file_server, scenes):
    client, _ = make_client()
    body = client.post("/predict", json={"tasks": tasks_on(file_server, scenes[:2]),
                                         "label_config": POLYGON_CONFIG}).get_json()
    regions = [r for entry in body["results"] for r in entry["result"]]
    assert regions and all(r["type"] == "polygonlabels" and len(r["value"]["points"]) >= 3 for r in regions)


def test_bad_tasks_fail_alone(make_client, file_server, scenes):
    client, _ = make_client(max_image_pixels=200 * 200)
    good = file_server.add("good.png", png_bytes(scenes[0][0]))
    tasks = [
        {"id": 1, "data": {"image": good}},
        {"id": 2, "data": {"image": file_server.add("broken.png", b"not an image")}},
        {"id": 3, "data": {"image": "/data/upload/1/missing.png"}},
        {"id": 4, "data": {"image": file_server.add("huge.png", png_bytes(np.zeros((300, 300, 3), np.uint8)))}},
        {"id": 5, "data": {"picture": good}},
        {"id": 6, "data": {"image": "http://169.254.169.254/latest/meta-data"}},
        {"id": 7, "data": {"image": "data:image/png;base64," + base64.b64encode(png_bytes(scenes[1][0])).decode()}},
    ]
    body = client.post("/predict", json={"tasks": tasks, "label_config": LABEL_CONFIG}).get_json()
    results = body["results"]
    assert len(results) == len(tasks)
    assert results[0]["result"] and "error" not in results[0]
    assert results[6]["result"] and "error" not in results[6]
    for index, message in [(1, "not a readable image"), (2, "HTTP 404"), (3, "over the limit"),
                           (4, "no 'image' field"), (5, "non-public address")]:
        assert "result" not in results[index] and message in results[index]["error"], results[index]
    assert client.get("/metrics", headers=JSON).get_json()["failed_tasks"] == 5
    scraped = _scrape(client)
    assert scraped[("gkc_failed_tasks_total", ())] == 5 and scraped[("gkc_predicted_tasks_total", ())] == 7
    assert scraped[("gkc_http_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 1
    assert scraped[("gkc_predict_seconds_count", ())] == 1


def test_wrong_token_is_reported_per_task(make_client, file_server, scenes):
    client, service = make_client()
    service.fetcher.configure(file_server.url, "wrong-token")
    body = client.post("/predict", json={"tasks": tasks_on(file_server, scenes[:1]),
                                         "label_config": LABEL_CONFIG}).get_json()
    assert "HTTP 401" in body["results"][0]["error"] and "LABEL_STUDIO_API_KEY" in body["results"][0]["error"]


@pytest.mark.parametrize("body, status, message", [
    ("{not json", 400, "JSON object"),
    (json.dumps({"label_config": "<View/>"}), 400, "no tasks"),
    (json.dumps({"tasks": [], "label_config": "<View/>"}), 400, "no tasks"),
    (json.dumps({"tasks": [{"data": {}}], "label_config":
                 '<View><Image name="i" value="$image"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>'}),
     400, "no BrushLabels or PolygonLabels"),
    (json.dumps({"tasks": [{"data": {}}], "label_config":
                 '<View><Image name="i" value="$image"/><BrushLabels name="m" toName="i"/></View>'}),
     400, "vocabulary is empty"),
    (json.dumps({"tasks": [{"data": {}}], "label_config":
                 '<View><Image name="i" value="$image"/><BrushLabels name="m" toName="i" model_min_region_area="big">'
                 '<Label value="a"/></BrushLabels></View>'}),
     400, 'model_min_region_area="big" on <BrushLabels name="m"> is not a number'),
])
def test_bad_requests_get_clear_errors(make_client, body, status, message):
    client, _ = make_client()
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == status and message in response.get_json()["error"]
    assert client.get("/health").status_code == 200  # still serving


def test_setup_rejects_configs_without_segmentation(make_client):
    client, _ = make_client()
    response = client.post("/setup", json={"schema": '<View><Image name="i" value="$image"/></View>'})
    assert response.status_code == 400 and "BrushLabels" in response.get_json()["error"]


def test_basic_auth(make_client):
    client, _ = make_client(basic_auth_user="u", basic_auth_pass="p")
    assert client.get("/health").status_code == 401
    token = base64.b64encode(b"u:p").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {token}"}).status_code == 200


def test_missing_weights_are_reported_not_fatal(tmp_path):
    settings = Settings(clip_model=str(CONFIG), clip_pretrained=str(tmp_path / "nope.pt"), model_dir=tmp_path)
    app = create_app(settings)
    client = app.test_client()
    app.config["service"].runtime._loaded.wait(60)
    health = client.get("/health").get_json()
    assert health["model_state"] == "error" and "CLIP_PRETRAINED" in health["model_error"]
    response = client.post("/predict", json={"tasks": [{"data": {"image": "x"}}], "label_config": LABEL_CONFIG})
    assert response.status_code == 500 and "CLIP_PRETRAINED" in response.get_json()["error"]


def test_two_targets_with_different_vocabularies_fetch_each_image_once(make_client, file_server, scenes):
    stuff = "".join(f'<Label value="{world.NAMES[i]}"/>' for i in world.STUFF)
    things = "".join(f'<Label value="{world.NAMES[i]}"/>' for i in world.THINGS)
    config = (f'<View><Image name="image" value="$image"/><BrushLabels name="stuff" toName="image">{stuff}'
              f'</BrushLabels><PolygonLabels name="things" toName="image">{things}</PolygonLabels></View>')
    client, _ = make_client()
    tasks = tasks_on(file_server, scenes[:3])
    body = client.post("/predict", json={"tasks": tasks, "label_config": config}).get_json()
    assert len(file_server.requests) == 3
    for entry in body["results"]:
        assert {r["from_name"] for r in entry["result"]} == {"stuff", "things"}
        assert all(r["value"][r["type"]][0] in world.NAMES for r in entry["result"])


def test_without_its_queue_a_predict_answers_every_task_itself(make_client, file_server, scenes):
    """REDIS_URL set but Redis away: past the time budget nothing can be handed over, so nothing is."""
    client, service = make_client(redis_url="redis://127.0.0.1:9/0", predict_budget_seconds=0.001,
                                  predict_batch_size=2)
    tasks = [{**task, "project": 3} for task in tasks_on(file_server, scenes[:5])]
    body = client.post("/predict", json={"tasks": tasks, "label_config": LABEL_CONFIG, "project": "3.17"}).get_json()
    assert [("result" in entry, entry.get("error")) for entry in body["results"]] == [(True, None)] * 5
    assert service.jobs.request("3").startswith("refused: the job queue")
    assert service.status()["training"] == {}
