import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from demo import world


def pytest_configure(config):
    config.addinivalue_line("markers", "labelstudio: end-to-end tests against a real Label Studio server")


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def demo_clip():
    from demo.train_clip import CONFIG, materialize
    from model.clip import load_clip

    return load_clip(str(CONFIG), str(materialize()))


@pytest.fixture(scope="session")
def scenes():
    return world.test_scenes(12)


class FileServer:
    """A stand-in for Label Studio's file serving: ``/data/upload/<name>`` with token auth.

    With ``refresh_token`` set it also takes personal access tokens: ``/api/token/refresh/``
    exchanges that token for an access token, and only the newest access token is accepted.
    """

    def __init__(self, token="good-token"):
        self.accepted = {f"Token {token}"}
        self.refresh_token: str | None = None
        self.refreshes = 0
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path != "/api/token/refresh/" or body.get("refresh") != server.refresh_token:
                    self.send_response(401)
                    self.end_headers()
                    return
                import jwt

                server.refreshes += 1
                access = jwt.encode({"exp": int(time.time()) + 300, "token_type": "access", "n": server.refreshes},
                                    "test-signing-key-of-32-bytes-or-more")
                server.accepted = {f"Bearer {access}"}
                answer = json.dumps({"access": access}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def do_GET(self):
                server.requests.append(self.path)
                if self.headers.get("Authorization") not in server.accepted:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, name: str, data: bytes) -> str:
        path = f"/data/upload/1/{name}"
        self.files[path] = data
        return path


@pytest.fixture()
def file_server():
    server = FileServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="module")
def loaded_model(tmp_path_factory):
    """The demo model, as the backend loads it."""
    from backend.runtime import load_model
    from backend.settings import Settings
    from demo.train_clip import CONFIG, DENSE_METHOD, materialize

    settings = Settings(clip_model=str(CONFIG), clip_pretrained=str(materialize()), inference_size=128,
                        dense_method=DENSE_METHOD, model_dir=tmp_path_factory.mktemp("model_dir"))
    return load_model(settings)


@pytest.fixture()
def make_client(loaded_model, file_server, tmp_path):
    """make(**settings) → (a Flask test client of the backend, its service), serving the demo model."""
    from backend.app import create_app
    from backend.service import SegmentationService
    from backend.settings import Settings

    def make(**overrides):
        settings = Settings(label_studio_url=file_server.url, label_studio_api_key="good-token",
                            model_dir=tmp_path, **overrides)
        service = SegmentationService(settings, model_loader=lambda _: loaded_model)
        service.start()
        return create_app(settings, service).test_client(), service
    return make


def tasks_on(file_server, scenes) -> list[dict]:
    """One task per scene, its image served by ``file_server``."""
    return [{"id": i, "data": {"image": file_server.add(f"scene-{i}.png", png_bytes(image))}}
            for i, (image, _) in enumerate(scenes)]
