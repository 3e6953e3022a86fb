import io
import threading
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
    """A stand-in for Label Studio's file serving: ``/data/upload/<name>`` with token auth."""

    def __init__(self, token="good-token"):
        self.token = token
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.headers.get("Authorization") != f"Token {server.token}":
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
