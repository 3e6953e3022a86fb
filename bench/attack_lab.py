"""What the hardening attacks share: servers on loopback, backend processes, the lab that stops them.

Every process an attack starts is on 127.0.0.1 and is stopped by PID when its lab closes.
"""
from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from demo.labelstudio import ManagedProcess, backend_env, free_port, start_backend

ROOT = Path(__file__).resolve().parents[1]
LABEL_CONFIG = (ROOT / "labeling_config" / "demo-world.xml").read_text()
LS_TOKEN = "label-studio-token"
ENV_KEY = "environment-api-key-K"
BASE_ENV = {"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ENV_KEY, "FETCH_TIMEOUT": "2", "FETCH_DEADLINE": "3",
            "IDLE_CONNECTION_TIMEOUT": "4", "TRAIN_STEPS": "2", "TRAIN_BATCH_SIZE": "2", "THREADS": "4",
            "LOG_LEVEL": "INFO"}
DRIP = "/data/upload/1/drip"  # a Label Studio data path whose server drips its answer


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve_on_loopback(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """An HTTP server on a free port of 127.0.0.1, serving in a daemon thread: (the server, its URL)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


class LoopbackServer:
    """A small HTTP server on 127.0.0.1 that records every request's path and Authorization header.

    ``files`` maps paths to bodies; with ``token`` set, they are served only to ``Token <token>``.
    :data:`DRIP` sends its headers, then one byte every ``drip_interval`` seconds.
    """

    def __init__(self, token: str | None = None, drip_interval: float = 0.5):
        self.token = token
        self.drip_interval = drip_interval
        self.files: dict[str, bytes] = {}
        self.seen: list[tuple[str, str]] = []
        server = self

        class Handler(QuietHandler):
            def do_GET(self):
                server.seen.append((self.path, self.headers.get("Authorization", "")))
                if self.path.startswith(DRIP):
                    return self._drip()
                if server.token and self.headers.get("Authorization") != f"Token {server.token}":
                    return self._answer(401, b"")
                body = server.files.get(self.path)
                self._answer(200 if body is not None else 404, body or b"")

            def _answer(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _drip(self):
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                with contextlib.suppress(OSError):
                    for _ in range(200):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        time.sleep(server.drip_interval)

        self.httpd, self.url = serve_on_loopback(Handler)

    def add(self, name: str, body: bytes) -> str:
        self.files[f"/data/upload/1/{name}"] = body
        return f"/data/upload/1/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Backend:
    url: str
    model_dir: Path
    process: ManagedProcess

    def post(self, path: str, payload, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=payload, timeout=kwargs.pop("timeout", 60), **kwargs)

    def get(self, path: str) -> dict:
        return requests.get(self.url + path, headers={"Accept": "application/json"}, timeout=10).json()

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def log(self) -> str:
        return self.process.log.read_text(errors="replace")


@dataclass
class Lab:
    """What the items share: a work folder, the fake Label Studio and processes to stop at the end."""

    work: Path
    label_studio: LoopbackServer = field(default_factory=lambda: LoopbackServer(LS_TOKEN))
    attacker: LoopbackServer = field(default_factory=LoopbackServer)
    backends: list = field(default_factory=list)  # every backend started, stopped with the lab
    _mounts: list = field(default_factory=list)
    _redis: list = field(default_factory=list)

    def backend(self, name: str, **env: str) -> Backend:
        """A fresh ``python -m backend`` (demo model) with its own MODEL_DIR and these settings."""
        model_dir = self.work / name
        port = free_port()
        process = start_backend(port, model_dir, None, {**BASE_ENV, **env})
        backend = Backend(f"http://127.0.0.1:{port}", model_dir, process)
        self.backends.append(backend)
        return backend

    def backend_env(self, name: str) -> dict:
        """The environment of a backend process (a worker, a command) with the demo model and its own MODEL_DIR."""
        return backend_env(self.work / name, None, BASE_ENV)

    def redis(self):
        """A real redis-server on loopback (Debian's), stopped with the lab."""
        from demo.redis_server import RedisServer

        server = RedisServer(self.work / f"redis-{len(self._redis)}").start()
        self._redis.append(server)
        return server

    def connect(self, backend: Backend, project: int = 1, token: str = LS_TOKEN) -> None:
        """Label Studio's own /setup for ``project``: the backend learns where its images live, and its token."""
        answer = backend.post("/setup", {"project": f"{project}.1700000000", "schema": LABEL_CONFIG,
                                         "hostname": self.label_studio.url, "access_token": token})
        assert answer.status_code == 200, answer.text

    def full_disk(self, path: Path) -> bool:
        """Mount a 1 MiB tmpfs at ``path`` and fill it; False where mounting is not allowed."""
        path.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                          capture_output=True).returncode != 0:
            return False
        self._mounts.append(path)
        with contextlib.suppress(OSError), open(path / "filler", "wb") as filler:
            filler.write(b"\0" * (2 << 20))
        return True

    def close(self) -> None:
        for backend in self.backends:
            backend.process.stop()
        for server in self._redis:
            server.stop()
        for path in self._mounts:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        self.label_studio.close()
        self.attacker.close()


def predict(backend: Backend, images: list[str], project: str = "1.1700000000", **kwargs) -> list[dict]:
    tasks = [{"id": i + 1, "data": {"image": image}} for i, image in enumerate(images)]
    answer = backend.post("/predict", {"tasks": tasks, "label_config": LABEL_CONFIG, "project": project}, **kwargs)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def grass_region(rows: int) -> dict:
    """A brush annotation of the demo config: the top ``rows`` of a 64x48 image are grass."""
    from label_studio_sdk.converter.brush import mask2rle

    mask = np.zeros((48, 64), np.uint8)
    mask[:rows] = 255
    return {"type": "brushlabels", "from_name": "mask", "to_name": "image", "original_width": 64,
            "original_height": 48, "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["grass"]}}


@contextlib.contextmanager
def lab_session():
    work = Path(tempfile.mkdtemp(prefix="gkc-attack-"))
    lab = Lab(work)
    try:
        yield lab
    finally:
        lab.close()
        shutil.rmtree(work, ignore_errors=True)


