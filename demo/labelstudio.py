"""Running a real Label Studio server and our backend on loopback, and the few API calls the demo needs.

Used by ``make demo`` and by the end-to-end tests. Label Studio runs from its own
virtual environment (``.venv-ls``); processes are stopped by their PID.
"""
from __future__ import annotations

import contextlib
import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from backend.label_studio_client import LabelStudioClient, default_hidden_columns

ROOT = Path(__file__).resolve().parents[1]
LABEL_STUDIO_BIN = ROOT / ".venv-ls" / "bin" / "label-studio"


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None,
             auth: tuple[bytes, bytes] | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process for {url} exited with {process.returncode}\n{tail}")
        try:
            if requests.get(url, timeout=2, auth=auth).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def is_running(pid: int) -> bool:
    """Whether process ``pid`` runs: alive and not a zombie (an exited orphan waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class ManagedProcess:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(log, "ab")  # noqa: SIM115 (the child writes to it until stop())
        self.process = subprocess.Popen(args, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 15) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        # Whatever the process left behind in its group (a child it forked, hung) goes with it, even when
        # the process itself has exited: a group outlives its leader while a member lives.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log_file.close()


class LabelStudio:
    """A Label Studio server on 127.0.0.1 with a known user and legacy API token.

    ``allow_local_backends``: start it as the README says, so that it connects a backend on
    this host and sends it webhooks; False: a stock Label Studio, which refuses both.
    """

    def __init__(self, data_dir: Path, port: int = 8080, username: str = "admin@example.com",
                 password: str | None = None, token: str | None = None, allow_local_backends: bool = True):
        self.allow_local_backends = allow_local_backends
        self.data_dir = Path(data_dir)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.username = username
        self.password = password or secrets.token_urlsafe(9)
        self.token = token or secrets.token_hex(20)
        self.process: ManagedProcess | None = None

    def start(self, timeout: float = 240) -> "LabelStudio":
        if not LABEL_STUDIO_BIN.exists():
            raise RuntimeError(f"{LABEL_STUDIO_BIN} missing: run `make setup-ls`")
        if not port_is_free(self.port):
            raise RuntimeError(f"port {self.port} is busy: Label Studio would silently pick another one")
        # As the README tells users: the backend on this host is a local address, which Label Studio
        # refuses to connect (ML_BLOCK_LOCAL_IP) and to send webhooks to (SSRF_PROTECTION_ENABLED).
        # Credentials go through the environment, never the command line (visible in `ps`).
        env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
               "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
               "LABEL_STUDIO_USERNAME": self.username, "LABEL_STUDIO_PASSWORD": self.password,
               "LABEL_STUDIO_USER_TOKEN": self.token, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true"}
        for name in ("ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED"):
            env.pop(name, None)
            if self.allow_local_backends:
                env[name] = "false"
        self.process = ManagedProcess(
            [str(LABEL_STUDIO_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port)],
            env, self.data_dir / "label-studio.log")
        wait_for(f"{self.url}/health", timeout, self.process.process, self.process.log)
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    # ------------------------------------------------------------------ API (the backend's own client)
    @cached_property
    def client(self) -> LabelStudioClient:
        return LabelStudioClient(self.url, self.token)

    def api(self, method: str, path: str, **kwargs):
        """A call the SDK does not wrap, answered as JSON (None when empty)."""
        response = self.client.request(method, path, timeout=kwargs.pop("timeout", 120), **kwargs)
        return response.json() if response.content else None

    def create_project(self, title: str, label_config: str) -> int:
        return self.client.sdk.projects.create(title=title, label_config=label_config).id

    def import_images(self, project: int, images: dict[str, np.ndarray], per_request: int = 50) -> None:
        """Upload PNGs as tasks; Label Studio caps the files per request (DATA_UPLOAD_MAX_NUMBER_FILES=100)."""
        items = list(images.items())
        for start in range(0, len(items), per_request):
            files = {}
            for k, (name, image) in enumerate(items[start:start + per_request]):
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                files[f"file{k}"] = (name, buffer.getvalue(), "image/png")
            self.api("POST", f"/api/projects/{project}/import", files=files)

    def connect_backend(self, project: int, url: str, title: str = "GKC open-vocabulary segmenter",
                        interactive: bool = False) -> int:
        """Connect the backend to the project; ``interactive``: it also answers the annotators' smart tools."""
        return self.client.sdk.ml.create(url=url, project=project, title=title, is_interactive=interactive).id

    def retrieve_predictions(self, project: int) -> None:
        self.client.sdk.actions.create(id="retrieve_tasks_predictions", project=project,
                                       selected_items={"all": True, "excluded": []},
                                       request_options={"timeout_in_seconds": 600})

    def personal_access_token(self) -> str:
        """A new personal access token of the user, created as the web UI does (log in, then POST /api/token/)."""
        session = requests.Session()
        session.get(f"{self.url}/user/login/", timeout=30)
        session.post(f"{self.url}/user/login/", timeout=30, headers={"Referer": f"{self.url}/user/login/"},
                     data={"email": self.username, "password": self.password,
                           "csrfmiddlewaretoken": session.cookies.get("csrftoken")})
        answer = session.post(f"{self.url}/api/token/", timeout=30,
                              headers={"X-CSRFToken": session.cookies.get("csrftoken"), "Referer": f"{self.url}/"})
        if answer.status_code >= 400:
            raise RuntimeError(f"creating a personal access token → {answer.status_code}: {answer.text[:300]}")
        return answer.json()["token"]

    def select_predictions(self, project: int) -> str:
        """Make the newest model version of the project's stored predictions the one the project
        shows (pre-annotations, and the Data Manager's prediction score column); returns it."""
        versions = {p["model_version"]: p["created_at"] for task in self.tasks(project)
                    for p in task.get("predictions") or []}
        version = max(versions, key=versions.get)
        self.client.sdk.projects.update(id=project, model_version=version)
        return version

    def add_score_tab(self, project: int) -> None:
        """A Data Manager tab that shows the prediction score column, lowest first (Label Studio hides the
        column by default; by hand: *Columns → Prediction score*, then *Order by*)."""
        hidden = default_hidden_columns(self.api("GET", f"/api/dm/columns?project={project}")["columns"])
        self.client.sdk.views.create(project=project, data={
            "title": "Lowest score first", "ordering": ["tasks:predictions_score"],
            "hiddenColumns": {"explore": hidden, "labeling": hidden + ["tasks:predictions_score"]}})

    def tasks(self, project: int) -> list[dict]:
        tasks, page = [], 1
        while True:
            batch = self.api("GET", f"/api/tasks?project={project}&page={page}&page_size=100&fields=all")
            tasks.extend(batch["tasks"])
            if len(tasks) >= batch["total"] or not batch["tasks"]:
                return tasks
            page += 1


DEMO_MODEL_SETTINGS = ("MODEL_DIR", "CLIP_MODEL", "CLIP_PRETRAINED", "INFERENCE_SIZE", "DENSE_METHOD")


def backend_env(model_dir: Path, label_studio: LabelStudio | None, env_extra: dict | None = None) -> dict:
    """The environment that runs the backend (or its command-line tools) with the demo model."""
    from demo.train_clip import DEMO_CLIP

    env = {**os.environ, "MODEL_DIR": str(model_dir), **DEMO_CLIP.settings_env(), "LOG_LEVEL": "INFO"}
    if label_studio:
        env.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token)
    env.update(env_extra or {})
    return env


def start_backend(port: int, model_dir: Path, label_studio: LabelStudio | None, env_extra: dict | None = None,
                  timeout: float = 120) -> ManagedProcess:
    """``python -m backend`` with the demo model on 127.0.0.1:port."""
    env = backend_env(model_dir, label_studio, {"HOST": "127.0.0.1", "PORT": str(port),
                                                "THREADS": "4", **(env_extra or {})})
    auth = (env["BASIC_AUTH_USER"].encode(), env["BASIC_AUTH_PASS"].encode()) if env.get("BASIC_AUTH_USER") else None
    process = ManagedProcess([sys.executable, "-m", "backend"], env, Path(model_dir) / "backend.log")
    try:
        wait_for(f"http://127.0.0.1:{port}/health", timeout, process.process, process.log, auth)
        deadline = time.time() + timeout
        while (state := requests.get(f"http://127.0.0.1:{port}/health", timeout=5,
                                     auth=auth).json()["model_state"]) == "loading":
            if time.time() > deadline:
                raise TimeoutError("the backend's model did not load in time")
            time.sleep(0.5)
        if state != "ready":
            raise RuntimeError(f"the backend's model failed to load; see {process.log}")
    except BaseException:
        process.stop()  # never leave a half-started backend behind
        raise
    return process
