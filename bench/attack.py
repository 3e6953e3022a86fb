"""Replays the hardening list against real backend processes on loopback; one line per item.

    python -m bench.attack            # every item: "held" or "failed: <why>"
    python -m bench.attack 1 3 12     # some of them

Each item starts what it needs on 127.0.0.1 (the backend with the demo model, a stand-in
for Label Studio's file serving, an "attacker" server), sends bounded traffic, checks the
behaviour and stops its processes by PID. ``tests/test_hardening.py`` runs the same items.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import requests
from PIL import Image

from bench.attack_lab import DRIP, ENV_KEY, LABEL_CONFIG, ROOT, Lab, grass_region, lab_session, png, predict
from bench.attack_surfaces import SURFACE_ATTACKS
from demo.labelstudio import free_port


# ---------------------------------------------------------------------------------------------- the items
def key_leak_and_setup_ssrf(lab: Lab) -> str:
    """1. The environment's key goes nowhere without LABEL_STUDIO_URL; a second /setup host is refused."""
    backend = lab.backend("setup")
    lab.connect(backend)
    hijack = backend.post("/setup", {"schema": LABEL_CONFIG, "hostname": lab.attacker.url, "access_token": "x"})
    assert hijack.status_code == 403, f"/setup to another host answered {hijack.status_code}"
    lab.attacker.files["/img.png"] = png(64, 48)
    good = lab.label_studio.add("a.png", png(64, 48))
    results = predict(backend, [good, lab.attacker.url + "/img.png"])
    assert results[0].get("result") is not None, results[0]
    assert "non-public address" in (results[1].get("error") or ""), results[1]
    # The other side: a backend whose first /setup comes from the attacker gives it only its own token.
    fresh = lab.backend("setup-first")
    assert fresh.post("/setup", {"schema": LABEL_CONFIG, "hostname": lab.attacker.url, "project": "1.1700000000",
                                 "access_token": "x"}).status_code == 200
    lab.attacker.files["/data/upload/1/img.png"] = png(64, 48)
    predict(fresh, [lab.attacker.url + "/data/upload/1/img.png"])
    for server in (lab.attacker, lab.label_studio):
        leaked = [path for path, auth in server.seen if ENV_KEY in auth]
        assert not leaked, f"the environment's key reached {server.url}: {leaked}"
    assert ("/data/upload/1/img.png", "Token x") in lab.attacker.seen
    return "K sent nowhere; 2nd host refused with 403; its images refused as non-public"


def project_id_paths(lab: Lab) -> str:
    """2. Project ids never name directories: only Label Studio's integer ids are accepted."""
    backend = lab.backend("paths")
    target = lab.work / "outside"
    for bad in (str(target), "abc/def", "../../x", "1/../../x", True, [1]):
        answer = backend.post("/webhook", {"action": "START_TRAINING", "project": {"id": bad}})
        assert answer.status_code == 400, f"project {bad!r} answered {answer.status_code}"
    projects = backend.model_dir / "projects"
    assert not target.exists(), f"{target} was created"
    assert not projects.exists() or not any(projects.iterdir()), list(projects.iterdir())
    ok = backend.post("/webhook", {"action": "ANNOTATIONS_DELETED", "project": {"id": "12.1699999999"},
                                   "annotations": []})
    assert ok.status_code == 201 and ok.json()["project"] == "12", ok.text
    return "6 malformed ids answered 400, nothing created; '12.1699999999' is project 12"


def slow_clients(lab: Lab) -> str:
    """3. Half-open clients cost a socket, not a thread: /health answers while they hang."""
    backend = lab.backend("slowloris")
    host, port = backend.url.removeprefix("http://").split(":")
    sockets = []
    for _ in range(16):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Len")
        sockets.append(sock)
    try:
        slowest = 0.0
        for _ in range(5):
            started = time.monotonic()
            assert requests.get(backend.url + "/health", timeout=5).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.5)
        # The idle timeout (4 s here, IDLE_CONNECTION_TIMEOUT) closes them: the server hangs up.
        deadline = time.monotonic() + 20
        closed = 0
        for sock in sockets:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(OSError):
                closed += sock.recv(1) == b""
    finally:
        for sock in sockets:
            sock.close()
    assert closed == len(sockets), f"only {closed} of {len(sockets)} half-open connections were closed"
    return f"/health in {slowest * 1000:.0f} ms at worst beside 16 half-open clients; all 16 closed by the server"


def extreme_shapes(lab: Lab) -> str:
    """4. A 100000x1 image fails alone; a 1000x1 one costs a bounded amount; an 8000x8000 one is refused
    by default or answered, never a 500."""
    backend = lab.backend("shapes")
    lab.connect(backend)
    good = lab.label_studio.add("good.png", png(96, 64))
    line = lab.label_studio.add("line.png", png(100000, 1))
    results = predict(backend, [good, line])
    assert results[0].get("result") is not None and "too elongated" in (results[1].get("error") or ""), results
    started = time.monotonic()
    predict(backend, [good])
    normal = time.monotonic() - started
    thin = lab.label_studio.add("thin.png", png(1000, 1))
    started = time.monotonic()
    results = predict(backend, [thin])
    elongated = time.monotonic() - started
    assert results[0].get("result") is not None, results
    assert elongated < 20 * max(normal, 0.05), f"1000x1 took {elongated:.1f} s against {normal:.2f} s"
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), np.uint8)).resize((4000, 4000))
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    large = lab.label_studio.add("large.png", buffer.getvalue())
    before = backend.rss_mib()
    started = time.monotonic()
    assert predict(backend, [large])[0].get("result") is not None
    large_seconds, kept = time.monotonic() - started, backend.rss_mib() - before
    assert kept < 100, f"a 4000x4000 image left {kept:.0f} MiB resident"
    return (f"100000x1 refused alone; 1000x1 took {elongated:.2f} s (a 96x64 image {normal:.2f} s); "
            f"4000x4000 took {large_seconds:.1f} s and left {kept:+.0f} MiB resident")


def request_bounds(lab: Lab) -> str:
    """5. Body size, a total deadline per download, and a fetch pool per request."""
    backend = lab.backend("bounds", MAX_REQUEST_BYTES=str(1 << 20))
    lab.connect(backend)
    big = backend.post("/predict", {"tasks": [{"data": {"image": "x" * (2 << 20)}}], "label_config": LABEL_CONFIG})
    assert big.status_code == 413, f"a 2 MiB body answered {big.status_code}"
    started = time.monotonic()
    results = predict(backend, [DRIP])
    dripped = time.monotonic() - started
    assert "FETCH_DEADLINE" in (results[0].get("error") or "") and dripped < 3 + 2 + 2, (dripped, results)
    good = lab.label_studio.add("fair.png", png(64, 48))
    slow = threading.Thread(target=predict, args=(backend, [f"{DRIP}?{i}" for i in range(16)]))
    slow.start()
    time.sleep(0.5)
    started = time.monotonic()
    fair = predict(backend, [good])
    fair_seconds = time.monotonic() - started
    overtaken = slow.is_alive()
    slow.join(120)
    assert fair[0].get("result") is not None and overtaken and fair_seconds < 3, (fair_seconds, overtaken)
    return (f"2 MiB body → 413; a dripping server cut at {dripped:.1f} s; an image beside 16 dripping ones "
            f"answered in {fair_seconds:.2f} s")


def corrupt_checkpoint(lab: Lab) -> str:
    """6. A truncated newest checkpoint: the project is served its newest readable version, and says so."""
    from backend.store import Store
    from demo.train_clip import CONFIG, DENSE_METHOD, materialize
    from model.checkpoint import save_checkpoint
    from model.clip import load_clip
    from model.config import model_identity
    from model.segmenter import build_segmenter

    backend = lab.backend("checkpoint")
    lab.connect(backend)
    clip = load_clip(str(CONFIG), str(materialize()))
    store = Store(backend.model_dir)
    directory = store.project_dir("5")
    for _ in (1, 2):
        store.add_version("5", {"images": 1}, lambda number, path: save_checkpoint(
            path, build_segmenter(clip, dense_method=DENSE_METHOD), model_identity(clip.identity, DENSE_METHOD),
            temperature=1.0))
    (directory / "v2.pt").write_bytes((directory / "v2.pt").read_bytes()[:100])
    image = lab.label_studio.add("c.png", png(64, 48))
    answer = backend.post("/predict", {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": LABEL_CONFIG,
                                       "project": "5.1700000000"})
    assert answer.status_code == 200 and "p5-v1" in answer.json()["model_version"], answer.text
    health, versions = backend.get("/health"), backend.get("/versions")
    assert health["unreadable_checkpoints"][0]["version"] == "v2", health
    assert versions["current"]["5"] == "v1" and versions["versions"][1].get("readable") is False, versions
    assert "v2.pt can't be read" in backend.log()
    return "v2 truncated → served p5-v1; /health, /versions and the log name v2"


def bad_annotations(lab: Lab) -> str:
    """7. Malformed annotations are refused at the webhook; stored ones are skipped by training."""
    from backend.images import ImageFetcher
    from backend.store import Store
    from backend.training import build_samples

    backend = lab.backend("annotations")
    task = {"id": 9, "data": {"image": "/data/upload/1/x.png"}}
    bad_results = [
        "garbage",
        [{"type": "brushlabels", "from_name": "mask", "original_width": 4, "original_height": 4,
          "value": {"format": "rle", "rle": [0, 0, 0, 64, 1, 2, 3], "brushlabels": ["grass"]}}],
        [{"type": "polygonlabels", "from_name": "mask", "original_width": 20000, "original_height": 20000,
          "value": {"points": [[0, 0], [100, 0], [100, 100]], "polygonlabels": ["grass"]}}],
    ]
    for result in bad_results:
        answer = backend.post("/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 3},
                                           "annotation": {"id": 1, "result": result}, "task": task})
        assert answer.status_code == 400, f"{str(result)[:60]} answered {answer.status_code}"
    assert "3" not in backend.get("/metrics")["annotations"], "a refused annotation was stored"
    # Stored before validation existed: training skips it and says which task and why.
    store = Store(backend.model_dir)
    store.upsert_annotation("3", {"id": 2, "result": bad_results[1]}, task)
    skipped: list = []
    samples, _ = build_samples(store.annotations("3"), LABEL_CONFIG, ImageFetcher(), skipped)
    assert samples == [] and skipped and skipped[0]["task_id"] == 9, skipped
    return f"3 malformed annotations → 400, none stored; a stored one skipped: {skipped[0]['reason'][:60]}"


def training_cap(lab: Lab) -> str:
    """8. START_TRAINING for 5 projects runs one job at a time (MAX_TRAINING_JOBS=1); the rest queue."""
    backend = lab.backend("cap")
    for project in range(1, 6):
        lab.connect(backend, project)
    answers = [backend.post("/webhook", {"action": "START_TRAINING", "project": {"id": p}}).json()["training"]
               for p in range(1, 6)]
    assert answers == ["started"] + ["queued"] * 4, answers
    most, deadline = 0, time.monotonic() + 180
    while time.monotonic() < deadline:
        training = backend.get("/health")["training"]
        most = max(most, sum(entry.get("state") == "running" for entry in training.values()))
        if len(training) == 5 and all(entry.get("state") in ("failed", "finished") for entry in training.values()):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"jobs did not all end: {training}")
    assert most == 1, f"{most} jobs ran at once"
    return f"5 requests → 1 started, 4 queued; at most {most} running at a time; all 5 ended"


def wrong_types(lab: Lab) -> str:
    """9. Wrong JSON types answer 400 in words; non-ASCII credentials 401; half a credential pair refused."""
    backend = lab.backend("types", BASIC_AUTH_USER="user", BASIC_AUTH_PASS="pässword")
    auth = (b"user", "pässword".encode())
    cases = [
        ("/setup", {"schema": 12}), ("/setup", {"schema": ["<View/>"]}), ("/predict", {"tasks": [[1]]}),
        ("/predict", {"tasks": [{"data": {"image": "x"}}], "label_config": 5}),
        ("/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": "xyz"}}),
        ("/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": 1}, "task": []}),
        ("/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": 1},
                      "task": {"id": [1]}}),
    ]
    for path, payload in cases:
        answer = requests.post(backend.url + path, json=payload, auth=auth, timeout=30)
        assert answer.status_code == 400 and "internal" not in answer.text, (path, payload, answer.status_code)
    for user, password in (("üser", "pässword"), ("user", "passwörd"), ("user", "pässword\u200b")):
        answer = requests.get(backend.url + "/health", auth=(user.encode(), password.encode()), timeout=10)
        assert answer.status_code == 401, (user, password, answer.status_code)
    assert requests.get(backend.url + "/health", auth=(b"user", "pässword".encode()), timeout=10).status_code == 200
    env = {**os.environ, "BASIC_AUTH_PASS": "only-a-password", "BASIC_AUTH_USER": "", "PORT": str(free_port())}
    half = subprocess.run([sys.executable, "-m", "backend"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert half.returncode != 0 and "BASIC_AUTH_USER" in half.stderr, half.stderr[-300:]
    return f"{len(cases)} wrong-type payloads → 400; 3 non-ASCII wrong credentials → 401; BASIC_AUTH_PASS alone won't start"


def bounded_growth(lab: Lab) -> str:
    """10. 400 new label sets: memory plateaus, the disk cache stays under its cap, /predict adds no project."""
    cap = 64 * 1024
    backend = lab.backend("growth", TEXT_CACHE_VOCABULARIES="16", TEXT_CACHE_DISK_BYTES=str(cap),
                          INTERACTIVE_CACHE_BYTES=str(8 * 2**20))  # its bound is its own setting
    image = "data:image/png;base64," + base64.b64encode(png(32, 32)).decode()
    rss = {}
    for number in range(400):
        labels = "".join(f'<Label value="thing{number}x{k}"/>' for k in range(20))
        config = f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{labels}' \
                 "</BrushLabels></View>"
        answer = backend.post("/predict", {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": config,
                                           "project": f"{1000 + number}.1"})
        assert answer.status_code == 200, answer.text
        if number + 1 in (100, 400):
            rss[number + 1] = backend.rss_mib()
    text_cache = backend.model_dir / "cache" / "text"
    disk = sum(f.stat().st_size for f in text_cache.glob("*.pt"))
    largest = max(f.stat().st_size for f in text_cache.glob("*.pt"))
    assert disk <= cap + largest, f"text cache holds {disk} bytes, cap {cap}"
    assert not backend.get("/metrics")["annotations"], "/predict created project rows"
    growth = rss[400] - rss[100]
    assert growth < 60, f"RSS grew {growth:.0f} MiB between the 100th and 400th label set"
    return f"RSS {rss[100]:.0f} → {rss[400]:.0f} MiB from the 100th to the 400th label set; disk cache {disk} B"


def disk_full(lab: Lab) -> str:
    """11. A full disk: /predict goes on without its text cache; a training job says "No space left"."""
    backend = lab.backend("disk", TRAIN_AFTER_ANNOTATIONS="2")
    lab.connect(backend)
    lab.connect(backend, project=4)
    if not lab.full_disk(backend.model_dir / "cache" / "text"):
        return "skipped: mounting a tmpfs is not allowed here"
    image = lab.label_studio.add("d.png", png(64, 48, seed=3))
    config = LABEL_CONFIG.replace('<Label value="grass"', '<Label value="brand new label"/><Label value="grass"')
    answer = backend.post("/predict", {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": config,
                                       "project": "1.1700000000"})
    assert answer.status_code == 200 and answer.json()["results"][0].get("result") is not None, answer.text
    assert "text-embedding cache not written (No space left on device)" in backend.log()
    region = grass_region(rows=24)
    project = {"id": 4, "label_config": LABEL_CONFIG}
    if not lab.full_disk(backend.model_dir / "projects" / "4"):
        return "skipped: mounting a tmpfs is not allowed here"
    for number in (1, 2):  # the second one starts training (TRAIN_AFTER_ANNOTATIONS=2)
        answer = backend.post("/webhook", {"action": "ANNOTATION_CREATED", "project": project,
                                           "annotation": {"id": number, "result": [region]},
                                           "task": {"id": number, "data": {"image": image}}})
        assert answer.status_code == 201, answer.text
    deadline = time.monotonic() + 180
    while (job := backend.get("/health")["training"].get("4", {})).get("state") not in ("failed", "finished"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["state"] == "failed" and "No space left on device" in job["error"], job
    assert backend.get("/versions")["versions"] == []
    return f"/predict answered without its cache; training failed with {job['error']!r}"


def sigterm_stops_training(lab: Lab) -> str:
    """12. SIGTERM to the service: requests in flight finish, its training job stops and registers nothing, it exits 0."""
    from backend.store import Store

    backend = lab.backend("sigterm", TRAIN_STEPS="100000", GRACEFUL_TIMEOUT="20", TRAIN_AFTER_ANNOTATIONS="1")
    lab.connect(backend)
    lab.connect(backend, project=6)
    image = lab.label_studio.add("s.png", png(64, 48, seed=4))
    region = grass_region(rows=30)
    project = {"id": 6, "label_config": LABEL_CONFIG}
    backend.post("/webhook", {"action": "ANNOTATION_CREATED", "project": project,  # starts training
                              "annotation": {"id": 1, "result": [region]}, "task": {"id": 1, "data": {"image": image}}})
    deadline = time.monotonic() + 120
    while (job := backend.get("/health")["training"].get("6", {})).get("state") != "running" or "step" not in job:
        assert time.monotonic() < deadline and job.get("state") != "failed", job
        time.sleep(0.5)
    child = job["pid"]
    in_flight = []
    request = threading.Thread(target=lambda: in_flight.append(predict(backend, [DRIP])))
    request.start()
    time.sleep(0.5)
    os.kill(backend.process.pid, signal.SIGTERM)
    request.join(30)
    code = backend.process.process.wait(40)
    gone = _wait_gone(child, 15)
    store_versions = Store(backend.model_dir).versions("6")
    assert code == 0, f"the service did not stop in time (exit code {code}); its log shows where it was stuck"
    assert in_flight and "FETCH_DEADLINE" in (in_flight[0][0].get("error") or ""), "the request in flight was cut"
    assert gone, f"training child {child} still runs after the service stopped"
    assert store_versions == [], "a version was registered after SIGTERM"
    return f"in-flight /predict answered; child {child} stopped with the service; no version registered"


def internal_details(lab: Lab) -> str:
    """13. No object addresses or absolute paths in answers."""
    backend = lab.backend("details")
    lab.connect(backend)
    broken = lab.label_studio.add("broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    junk = lab.label_studio.add("junk.png", b"junk")
    texts = [json.dumps(predict(backend, [broken, junk, "http://127.0.0.1:9/x.png"])),
             json.dumps(backend.get("/versions")), json.dumps(backend.get("/health")),
             backend.post("/predict", {"tasks": "nope"}).text]
    for text in texts:
        assert "object at 0x" not in text and str(backend.model_dir) not in text and str(ROOT) not in text, text
    return "errors, /versions and /health carry no object address or absolute path"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    return False


ATTACKS = [key_leak_and_setup_ssrf, project_id_paths, slow_clients, extreme_shapes, request_bounds,
           corrupt_checkpoint, bad_annotations, training_cap, wrong_types, bounded_growth, disk_full,
           sigterm_stops_training, internal_details, *SURFACE_ATTACKS]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.attack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("numbers", nargs="*", type=int, metavar="N",
                        help=f"the items to run (1-{len(ATTACKS)}; default: all)")
    numbers = parser.parse_args(argv).numbers or range(1, len(ATTACKS) + 1)
    if not set(numbers) <= set(range(1, len(ATTACKS) + 1)):  # argparse's choices refuse an empty list
        parser.error(f"items are numbered 1 to {len(ATTACKS)}")
    failed = 0
    for number in numbers:
        attack = ATTACKS[number - 1]
        with lab_session() as lab:
            started = time.monotonic()
            try:
                verdict = f"held ({attack(lab)})"
            except Exception as error:  # report and go on to the next item
                failed += 1
                verdict = f"failed: {error.__class__.__name__}: {str(error)[:300]}"
        print(f"{number:2d}. {attack.__doc__.split('.', 1)[1].strip().splitlines()[0][:70]:70s} "
              f"{verdict} [{time.monotonic() - started:.0f} s]", flush=True)
    print(f"attack: {len(list(numbers)) - failed} held, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
