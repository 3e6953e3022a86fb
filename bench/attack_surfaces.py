"""The hardening items of the job queue, clicks, per-project credentials and work nobody asked for.

Each is one function of a :class:`bench.attack_lab.Lab`, returning what it measured, or raising
with why it failed; ``python -m bench.attack`` numbers them after the first list.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import requests
from PIL import Image

from backend.store import Store
from bench.attack_lab import LABEL_CONFIG, LS_TOKEN, ROOT, Backend, Lab, QuietHandler, png, predict, serve_on_loopback
from demo import world

LABELS = "".join(f'<Label value="{name}"/>' for name in re.findall(r'<Label value="([^"]+)"', LABEL_CONFIG))
SMART_CONFIG = LABEL_CONFIG.replace("</View>", f'<KeyPointLabels name="click" toName="image" smart="true">{LABELS}'
                                                "</KeyPointLabels></View>")
PROJECT = "1.1700000000"


def click(x: float, y: float, label: str = "grass") -> dict:
    """A smart keypoint as Label Studio's editor puts it into the context (x, y in percent)."""
    return {"from_name": "click", "to_name": "image", "type": "keypointlabels", "is_positive": True,
            "value": {"x": x, "y": y, "keypointlabels": [label]}}


def clicked(backend: Backend, image: str, regions: list[dict], project: str = PROJECT, config: str = SMART_CONFIG,
            timeout: float = 120) -> tuple[requests.Response, float]:
    """One interactive /predict: (the answer, its seconds)."""
    started = time.monotonic()
    answer = backend.post("/predict", {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": config,
                                       "project": project, "params": {"context": {"result": regions}}},
                          timeout=timeout)
    return answer, time.monotonic() - started


def scene_png(seed: int, size: int = 128) -> bytes:
    image = world.render_scene(np.random.default_rng(seed))[0]
    buffer = io.BytesIO()
    Image.fromarray(image).resize((size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def timed(call) -> tuple[object, float]:
    started = time.monotonic()
    value = call()
    return value, time.monotonic() - started


# ---------------------------------------------------------------------------------------------- the queue
def foreign_queue_jobs(lab: Lab) -> str:
    """14. Jobs pushed straight into Redis (pickled, another function, callbacks) never run on a worker."""
    from rq import Queue
    from rq.registry import FailedJobRegistry

    from backend.rq_jobs import PRELABEL_QUEUE, SERIALIZER, RQJobQueue

    redis_server = lab.redis()
    connection = RQJobQueue(redis_server.url).connection
    marker = lab.work / "pwned"
    Queue(PRELABEL_QUEUE, connection=connection).enqueue("os.system", f"touch {marker}-pickle")  # RQ's pickle
    json_queue = Queue(PRELABEL_QUEUE, connection=connection, serializer=SERIALIZER)
    json_queue.enqueue("os.system", f"touch {marker}-json")
    json_queue.enqueue("subprocess.getoutput", f"touch {marker}-getoutput")
    ours = json_queue.enqueue("backend.worker.predict_chunk", 1, [999999])
    connection.hset(ours.key, "failure_callback_name", "os.system")  # a callback named in Redis
    env = {**lab.backend_env("worker"), "REDIS_URL": redis_server.url, "LABEL_STUDIO_URL": lab.label_studio.url,
           "LABEL_STUDIO_API_KEY": LS_TOKEN}
    worker = subprocess.run([sys.executable, "-m", "backend.worker", "--burst", "--queues", PRELABEL_QUEUE],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    ran = sorted(p.name for p in lab.work.glob("pwned*"))
    assert not ran, f"foreign jobs ran: {ran}"
    failed = FailedJobRegistry(PRELABEL_QUEUE, connection=connection, serializer=SERIALIZER).get_job_ids()
    assert worker.returncode == 0 and len(failed) == 4, (worker.returncode, failed, worker.stderr[-800:])
    assert "this worker runs only" in worker.stderr and "not a JSON job" in worker.stderr, worker.stderr[-800:]
    return "4 foreign jobs (pickle, os.system, subprocess.getoutput, a callback) failed unrun; the worker went on"


class HungRedis:
    """A TCP server on loopback that accepts connections and never answers (a hung Redis)."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.socket.getsockname()[1]}/0"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.socket.accept()[0])
            except OSError:
                return

    def close(self):
        for held in self.held:
            held.close()
        self.socket.close()


def hung_redis(lab: Lab) -> str:
    """15. A Redis that accepts and never answers: /health and /predict do not wait on it."""
    hung = HungRedis()
    try:
        backend = lab.backend("hung", REDIS_URL=hung.url, PREDICT_BUDGET_SECONDS="0.2")
        lab.connect(backend)
        image = lab.label_studio.add("h.png", png(64, 48))
        health = max(timed(lambda: backend.get("/health"))[1] for _ in range(5))
        time.sleep(3)  # the status reads in the background have timed out by now
        status = backend.get("/health")
        _, predicted = timed(lambda: predict(backend, [image] * 24))
        training, asked = timed(lambda: backend.post("/webhook", {"action": "START_TRAINING",
                                                                  "project": {"id": 1}}).json()["training"])
    finally:
        hung.close()
    assert health < 1.0, f"/health took {health:.1f} s"
    assert status.get("queue", "").startswith("not answering"), status.get("queue")
    assert predicted < 30 and asked < 5 and training.startswith("refused"), (predicted, asked, training)
    return (f"/health ≤ {health * 1000:.0f} ms ('{status['queue'][:40]}…'); 24 tasks predicted here in "
            f"{predicted:.1f} s; a training request refused in {asked:.1f} s")


def unknown_projects(lab: Lab) -> str:
    """16. Training and queue handovers only for projects Label Studio's /setup named."""
    from rq import Queue

    from backend.rq_jobs import PRELABEL_QUEUE, SERIALIZER, TRAINING_QUEUE, RQJobQueue

    redis_server = lab.redis()
    connection = RQJobQueue(redis_server.url).connection
    queued = Queue(TRAINING_QUEUE, connection=connection, serializer=SERIALIZER)
    chunks = Queue(PRELABEL_QUEUE, connection=connection, serializer=SERIALIZER)
    backend = lab.backend("unknown", REDIS_URL=redis_server.url, PREDICT_BUDGET_SECONDS="0.5")
    answers = [backend.post("/webhook", {"action": "START_TRAINING", "project": {"id": 5000 + n}}).json()["training"]
               for n in range(500)]
    refused = sum(answer.startswith("refused: project") for answer in answers)
    assert refused == 500 and queued.count == 0, (refused, queued.count, answers[:2])
    image = "data:image/png;base64," + base64.b64encode(png(64, 48)).decode()
    tasks = [{"id": n + 1, "data": {"image": image}} for n in range(200)]
    body = {"tasks": tasks, "label_config": LABEL_CONFIG, "project": "77.1700000000"}
    unknown = backend.post("/predict", body, timeout=300).json()["results"]
    assert chunks.count == 0 and all("result" in r for r in unknown), chunks.count
    lab.connect(backend, project=77)  # the same request for a set-up project is handed over
    known = backend.post("/predict", body, timeout=300).json()["results"]
    handed = sum("queued for a worker" in (r.get("error") or "") for r in known)
    assert handed and chunks.count, (handed, chunks.count)
    return (f"500 training requests for unknown projects → 500 refused, 0 jobs; 200 tasks of an unknown project "
            f"→ 0 chunks (all predicted here); once set up, {handed} handed over in {chunks.count} chunks")


# ---------------------------------------------------------------------------------------------- credentials
def project_credentials(lab: Lab) -> str:
    """17. A token serves its own project; another project's click never gets a pass it may not see."""
    backend = lab.backend("credentials")
    lab.connect(backend)  # project 1, with Label Studio's token
    hijack = backend.post("/setup", {"project": PROJECT, "schema": LABEL_CONFIG, "hostname": lab.label_studio.url,
                                     "access_token": "someone-else"})
    assert hijack.status_code == 403, f"a second token for project 1 answered {hijack.status_code}"
    image = lab.label_studio.add("private.png", scene_png(1))
    assert "result" in predict(backend, [image])[0]  # project 1's images still come with its own token
    lab.connect(backend, project=2, token="project-two-token")  # a token Label Studio refuses for this file
    opened = predict(backend, [image])  # project 1 opens the task: its pass is kept
    answer, _ = clicked(backend, image, [click(50, 50)], project="2.1700000000")
    error = answer.json()["results"][0].get("error") or ""
    assert "result" in opened[0] and "HTTP 401" in error, answer.text[:300]
    sent = [auth for path, auth in lab.label_studio.seen if path == image]
    assert "Token project-two-token" in sent, "project 2's click did not ask Label Studio with its own token"
    return "2nd token for project 1 → 403; project 2's click on project 1's kept image → its own 401"


def token_to_data_paths(lab: Lab) -> str:
    """18. Label Studio's token goes to its data paths only; errors never echo remote bytes."""
    backend = lab.backend("paths-only")
    lab.connect(backend)
    lab.label_studio.files["/api/current-user/whoami"] = b'{"email": "admin@example.com", "token": "SECRET"}'
    secret = lab.label_studio.add("secret.txt", b"SECRET-BYTES-0123456789")
    refused = [
        "/api/current-user/whoami", f"{lab.label_studio.url}/api/current-user/whoami", "/data/upload/../../api/x",
        "/data/upload/%2e%2e/%2e%2e/api/current-user/whoami",
    ]
    results = predict(backend, [*refused, secret])
    sent = [path for path, auth in lab.label_studio.seen if auth and not path.startswith("/data/upload/1/")]
    assert not sent, f"the token reached {sent}"
    texts = json.dumps(results)
    assert all("error" in r for r in results) and "SECRET" not in texts and "admin@" not in texts, texts[:600]
    return f"{len(refused)} non-data paths got no token; a non-image's error names its size only"


# ---------------------------------------------------------------------------------------------- memory and CPU
def click_cache_bound(lab: Lab) -> str:
    """19. The click cache stays within INTERACTIVE_CACHE_BYTES, newest entry included."""
    backend = lab.backend("click-cache", INTERACTIVE_CACHE_BYTES=str(32 * 2**20), MAX_INFERENCE_AREA="8")
    lab.connect(backend)
    photo = Image.fromarray(np.asarray(Image.open(io.BytesIO(scene_png(3))))).resize((2048, 2048))
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    image = lab.label_studio.add("big.png", buffer.getvalue())
    clicked(backend, image, [click(50, 50)])
    before = backend.rss_mib()
    for threshold in range(80):
        config = SMART_CONFIG.replace('<BrushLabels name="mask" toName="image"',
                                      f'<BrushLabels name="mask" toName="image" model_score_threshold="0.{threshold:02d}"')
        answer, _ = clicked(backend, image, [click(50, 50)], config=config)
        assert answer.status_code == 200, answer.text[:300]
    grown = backend.rss_mib() - before
    assert grown < 96, f"80 thresholds grew RSS by {grown:.0f} MiB under a 32 MiB cache"
    return f"80 clicks, each with its own model_score_threshold, on a 2048x2048 image: RSS {grown:+.0f} MiB"


def webhook_configs(lab: Lab) -> str:
    """20. Unauthenticated webhooks with 12 MiB label configs: refused before they are kept."""
    backend = lab.backend("configs")
    huge = LABEL_CONFIG.replace("</View>", f"<!-- {'x' * (12 * 2**20)} --></View>")
    rss = {}
    for number in range(30):
        answer = backend.post("/webhook", {"action": "PROJECT_UPDATED",
                                           "project": {"id": 100 + number, "label_config": huge}})
        assert answer.status_code == 201 and answer.json()["label_config"].startswith("not stored"), answer.text[:200]
        rss[number + 1] = backend.rss_mib()
    database = sum(f.stat().st_size for f in backend.model_dir.glob("backend.sqlite*"))
    grown = rss[30] - rss[10]
    assert database < 2**20 and grown < 24, (database, rss[10], rss[30])
    return (f"30 webhooks with 12 MiB configs: none stored; database {database / 2**10:.0f} KiB; RSS "
            f"{rss[10]:.0f} MiB after 10, {rss[30]:.0f} after 30")


def cpu_bounds(lab: Lab) -> str:
    """21. Small requests can't buy long CPU time: clicks, labels, ids and tags are bounded before work."""
    backend = lab.backend("cpu")
    lab.connect(backend)
    image = lab.label_studio.add("cpu.png", scene_png(4, 4096))
    figures = []
    answer, seconds = clicked(backend, image, [click(50, 50)] * 20000)
    assert "at most" in answer.json()["results"][0].get("error", ""), answer.text[:300]
    figures.append(f"20,000 clicks → error in {seconds:.2f} s")
    labels = re.findall(r'<Label value="([^"]+)"', LABEL_CONFIG)
    answer, seconds = clicked(backend, image, [click(10 + n, 50, label) for n, label in enumerate(labels[:30])])
    assert "at most" in answer.json()["results"][0].get("error", ""), answer.text[:300]
    figures.append(f"30 labels → error in {seconds:.2f} s")
    predict(backend, [image])
    _, opened = timed(lambda: predict(backend, [image]))
    answer, four = clicked(backend, image, [click(10 + n, 50, label) for n, label in enumerate(labels[:4])])
    assert "result" in answer.json()["results"][0], answer.text[:300]
    figures.append(f"4 labels on 4096² {four:.1f} s (its /predict {opened:.1f} s)")
    for n in range(10):  # stored, so the deletion below has something to delete
        backend.post("/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 1},
                                  "task": {"id": n, "data": {"image": image}}, "annotation": {"id": n, "result": []}})
    ids = [{"id": n} for n in range(100_000)]
    slow = threading.Thread(target=lambda: figures.append("100,000 deletions {:.1f} s".format(timed(
        lambda: backend.post("/webhook", {"action": "ANNOTATIONS_DELETED", "project": {"id": 1},
                                          "annotations": ids}))[1])))
    slow.start()
    time.sleep(0.2)
    _, waited = timed(lambda: backend.post("/webhook", {"action": "PROJECT_UPDATED", "project": {"id": 1}}))
    slow.join(60)
    # 10 stored and 10 deleted: ids the store never had change nothing.
    counts = Store(backend.model_dir).annotation_counts()["1"]
    assert counts == {"stored": 0, "changes_since_training": 20}, f"not deleted: {counts}"
    figures.append(f"another webhook {waited:.2f} s")
    assert waited < 2, figures
    many = "".join(f'<Label value="label number {n}"/>' for n in range(10_000))
    config = f'<View><Image name="image" value="$image"/><BrushLabels name="m" toName="image">{many}</BrushLabels></View>'
    answer, seconds = timed(lambda: backend.post("/predict", {"tasks": [{"id": 1, "data": {"image": image}}],
                                                              "label_config": config}))
    assert answer.status_code == 400 and "at most" in answer.text, answer.text[:300]
    figures.append(f"10,000 labels → 400 in {seconds:.1f} s")
    tags = "".join(f'<BrushLabels name="m{n}" toName="image"><Label value="thing {n}"/></BrushLabels>' for n in range(300))
    answer, seconds = timed(lambda: backend.post("/predict", {"tasks": [{"id": 1, "data": {"image": image}}],
                                                              "label_config": f'<View><Image name="image" value="$image"/>{tags}</View>'}))
    assert answer.status_code == 400 and "segmentation tags" in answer.text, answer.text[:300]
    figures.append(f"300 tags → 400 in {seconds:.1f} s")
    return "; ".join(figures)


def fair_text_encoder(lab: Lab) -> str:
    """22. A new 1,000-label vocabulary being encoded does not hold up a /predict whose labels are cached."""
    backend = lab.backend("fair")
    lab.connect(backend)
    image = lab.label_studio.add("f.png", png(64, 48))
    predict(backend, [image])
    _, alone = timed(lambda: predict(backend, [image]))
    many = "".join(f'<Label value="kind {n}" predicted_values="{n} things,a {n} thing,thing {n},sort {n}"/>'
                   for n in range(1000))  # 5,000 texts, 35,000 prompts
    config = f'<View><Image name="image" value="$image"/><BrushLabels name="m" toName="image">{many}</BrushLabels></View>'
    answers = []
    big = threading.Thread(target=lambda: answers.append(backend.post(
        "/predict", {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": config, "project": PROJECT},
        timeout=600)))
    started = time.monotonic()
    big.start()
    time.sleep(0.5)
    _, beside = timed(lambda: predict(backend, [image]))
    big.join(600)
    encoding = time.monotonic() - started
    assert "result" in answers[0].json()["results"][0], answers[0].text[:300]
    assert beside < max(3 * alone, 1.5) and beside < encoding / 2, (alone, beside, encoding)
    return f"cached /predict {beside:.2f} s beside a {encoding:.1f} s 1,000-label encoding (alone {alone:.2f} s)"


# ---------------------------------------------------------------------------------------------- input
MALFORMED = [
    ("/predict", '{"tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": NaN}'),
    ("/predict", "[" * 100_000 + "]" * 100_000),
    ("/predict", '{"tasks": [{"id": 1, "data": {"image": "x"}}], "project": "²", "label_config": "<View/>"}'),
    ("/webhook", json.dumps({"action": "START_TRAINING", "project": {"id": int("9" * 300)}})),
    ("/webhook", json.dumps({"action": "START_TRAINING", "project": {"id": "9" * 300}})),
    ("/webhook", json.dumps({"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": 10**30},
                             "task": {"id": 1, "data": {}}})),
    ("/webhook", json.dumps({"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": "²"},
                             "task": {"id": 1, "data": {}}})),
    ("/webhook", json.dumps({"action": "ANNOTATION_DELETED", "project": {"id": 1}, "annotation": {"id": -1}})),
]


def malformed_numbers(lab: Lab) -> str:
    """23. Malformed numbers: 400s, or per-task errors, never a 500."""
    backend = lab.backend("numbers")
    lab.connect(backend)
    statuses = []
    for path, body in MALFORMED:
        answer = requests.post(backend.url + path, data=body, headers={"Content-Type": "application/json"},
                               timeout=60)
        statuses.append(answer.status_code)
        assert answer.status_code == 400, (path, body[:80], answer.status_code, answer.text[:200])
    image = lab.label_studio.add("n.png", png(64, 48))
    boxes = [{"from_name": "click", "to_name": "image", "type": "keypointlabels",
              "value": {"x": value, "y": 50, "keypointlabels": ["grass"]}} for value in ("nan", "inf", 1.7e308)]
    for box in boxes:
        answer, _ = clicked(backend, image, [box])
        assert answer.status_code == 200 and "finite numbers" in answer.json()["results"][0].get("error", ""), \
            answer.text[:300]
    return f"{len(MALFORMED)} malformed bodies → 400; nan/inf/1.7e308 coordinates → per-task errors"


def stale_masks(lab: Lab) -> str:
    """24. A click after the image behind a URL changed answers from the new image."""
    backend = lab.backend("stale")
    lab.connect(backend)
    image = lab.label_studio.add("changing.png", scene_png(5))
    predict(backend, [image])  # opened: the pass of the first image is kept
    clicked(backend, image, [click(40, 60)])
    lab.label_studio.files[image] = scene_png(6)
    after, _ = clicked(backend, image, [click(40, 60)])
    fresh = lab.backend("stale-fresh")
    lab.connect(fresh)
    truth, _ = clicked(fresh, image, [click(40, 60)])
    masks = [[r["value"].get("rle") for r in answer.json()["results"][0]["result"]] for answer in (after, truth)]
    assert masks[0] == masks[1], "the click was answered from the old image"
    return "the click after the change equals a fresh backend's click on the new image"


# ---------------------------------------------------------------------------------------------- check
class FakeLabelStudio:
    """Label Studio's API as ``check`` meets it, answering each path with a chosen status."""

    def __init__(self, statuses: dict[tuple[str, str], int]):
        self.statuses = statuses
        self.seen: list[tuple[str, str]] = []
        fake = self

        class Handler(QuietHandler):
            def _answer(self):
                path = self.path.split("?")[0].rstrip("/") + ("/" if "webhooks" in self.path else "")
                fake.seen.append((self.command, path))
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                status = fake.statuses.get((self.command, path), 200)
                body = json.dumps({"version": "1.23.2", "release": "1.23.2", "email": "a@b.c", "id": 5,
                                   "webhooks_received": 0, "tasks": [],
                                   "label_config": SMART_CONFIG} if status == 200 else {"detail": "no"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = _answer

        self.httpd, self.url = serve_on_loopback(Handler)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def check_errors(lab: Lab) -> str:
    """25. ``python -m backend check``: a line for every HTTP error, its webhook always removed, the token
    from the environment."""
    cases = {"403 on the project": ({("GET", "/api/projects/1"): 403}, False),
             "404 on the project": ({("GET", "/api/projects/1"): 404}, False),
             "webhook removal fails": ({("DELETE", "/api/webhooks/5/"): 500, ("PATCH", "/api/projects/1"): 500}, True)}
    lines = []
    for name, (statuses, webhook) in cases.items():
        fake = FakeLabelStudio(statuses)
        try:
            env = {**os.environ, "LABEL_STUDIO_API_KEY": "check-token"}  # no --token: read from the environment
            run = subprocess.run([sys.executable, "-m", "backend", "check", "--url", fake.url, "--project", "1",
                                  *(["--backend-url", fake.url] if webhook else [])], env=env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
        finally:
            fake.close()
        output = run.stdout + run.stderr
        assert "Traceback" not in output and run.returncode == 1 and "FAIL" in output, (name, output[-600:])
        deletes = sum(method == "DELETE" for method, _ in fake.seen)
        if ("POST", "/api/webhooks/") in fake.seen:
            assert deletes >= 1, (name, fake.seen)
        lines.append(f"{name}: {next(line for line in output.splitlines() if 'FAIL' in line)[:70]}")
    return " | ".join(lines)


SURFACE_ATTACKS = [foreign_queue_jobs, hung_redis, unknown_projects, project_credentials, token_to_data_paths,
                   click_cache_bound, webhook_configs, cpu_bounds, fair_text_encoder, malformed_numbers, stale_masks,
                   check_errors]

