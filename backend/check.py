"""``python -m backend check``: can Label Studio and this backend reach each other? Says what is wrong.

    LABEL_STUDIO_API_KEY=<token> python -m backend check --url http://localhost:8080 \\
        [--project 12] [--backend-url http://<address Label Studio uses>:9090]

The token is read from ``LABEL_STUDIO_API_KEY`` (``--token`` also takes it, but a command line is
visible to every local user).

Run it where the backend runs, with the backend's environment. One line per step, ``ok`` or
``FAIL`` with the cause and what to change:

1. Label Studio's API answers, and accepts the token;
2. (with --project) the project's first task image downloads as the backend fetches images;
3. (with --backend-url) Label Studio accepts that address for a model (``ML_BLOCK_LOCAL_IP``);
4. (with both) a webhook round trip: Label Studio posts an event to the backend's ``/webhook``
   and the backend counts it (``SSRF_PROTECTION_ENABLED``). The check adds a webhook to the
   project, saves the project unchanged to fire it, and removes the webhook again.

Exits with 1 when a step failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import httpx
import requests
from label_studio_sdk.core.api_error import ApiError

from backend.images import ImageError, ImageFetcher
from backend.label_config import LabelConfigError, parse_targets
from backend.label_studio_client import LabelStudioClient, LabelStudioError
from backend.settings import Settings

RESERVED = "reserved network address"  # the words of Label Studio's refusal of local addresses


class CheckFailed(Exception):
    """A step failed; the message says why and what to change."""


class ConnectionCheck:
    def __init__(self, url: str, token: str, project: int | None = None, backend_url: str | None = None,
                 settings: Settings | None = None):
        self.url = url.rstrip("/")
        self.token = token
        self.project = project
        self.backend_url = backend_url.rstrip("/") if backend_url else None
        self.settings = dataclasses.replace(settings or Settings(), label_studio_url=self.url,
                                            label_studio_api_key=token)
        self.client: LabelStudioClient | None = None

    def steps(self) -> list[tuple[str, object]]:
        steps = [("Label Studio API", self.api)]
        if self.project is not None:
            steps.append((f"image of project {self.project}'s first task", self.image))
        if self.backend_url:
            steps.append(("Label Studio accepts the backend's address", self.model_address))
            if self.project is not None:
                steps.append(("webhook round trip, Label Studio → backend", self.webhook))
        return steps

    def run(self, out=sys.stdout) -> bool:
        """Every step in order (later ones are skipped once the API fails); True when all passed."""
        passed = True
        for name, step in self.steps():
            if self.client is None and step != self.api:
                print(f"skip  {name}: needs the Label Studio API", file=out)
                continue
            try:
                print(f"ok    {name}: {step()}", file=out)
            except CheckFailed as error:
                passed = False
                print(f"FAIL  {name}: {error}", file=out)
            except (LabelStudioError, ApiError, httpx.HTTPError) as error:  # any other refusal is a line too
                passed = False
                print(f"FAIL  {name}: Label Studio answered {_said(error)}", file=out)
        return passed

    # ------------------------------------------------------------------ steps
    def api(self) -> str:
        try:
            client = LabelStudioClient(self.url, self.token, timeout=15)
            version = client.request("GET", "/api/version").json()
            user = client.request("GET", "/api/current-user/whoami").json()
        except httpx.TransportError as error:
            raise CheckFailed(f"can't reach {self.url} ({error.__class__.__name__}): is Label Studio running, and "
                              "is this its address as seen from where the backend runs? (In docker compose: "
                              "http://label-studio:8080.)") from None
        except LabelStudioError as error:
            if " → 401" in str(error) or " → 403" in str(error):
                raise CheckFailed("Label Studio refused the token: copy it from Account & Settings → Access Token; "
                                  "a legacy token works only while the organization allows legacy tokens") from None
            raise CheckFailed(str(error)) from None
        self.client = client
        release = version.get("release") or version.get("label-studio-os-package", {}).get("version", "?")
        return f"Label Studio {release}, token of {user.get('email') or user.get('username')}"

    def image(self) -> str:
        try:
            config = self.client.label_config(self.project)
            tasks = self.client.request("GET", f"/api/tasks?project={self.project}&page_size=1").json()
        except (LabelStudioError, ApiError, httpx.HTTPError, ValueError) as error:
            raise CheckFailed(f"can't read project {self.project} ({_said(error)}): does it exist, and may this "
                              "token's user see it?") from None
        try:
            target = parse_targets(config)[0]
        except LabelConfigError as error:
            raise CheckFailed(f"the project's label config can't be served: {error}") from None
        listed = tasks.get("tasks", []) if isinstance(tasks, dict) else tasks
        if not listed:
            return "the project has no tasks yet: nothing to download"
        task = listed[0]
        try:
            image = ImageFetcher.from_settings(self.settings).fetch((task.get("data") or {}).get(target.data_key),
                                                                     task["id"])
        except ImageError as error:
            raise CheckFailed(f"task {task['id']}: {error}") from None
        return f"task {task['id']}'s ${target.data_key}: {image.shape[1]}x{image.shape[0]} pixels"

    def model_address(self) -> str:
        # An invalid project makes Label Studio check each field and connect nowhere: only the URL's verdict counts.
        response = self.client.request("POST", "/api/ml", check=False,
                                       json={"url": self.backend_url, "project": 0, "title": "connection check"})
        if RESERVED in response.text:
            raise CheckFailed(f"Label Studio refuses {self.backend_url}: \"URL resolves to a {RESERVED}\". Start "
                              "Label Studio with ML_BLOCK_LOCAL_IP=false to connect a backend on its own host or "
                              "network (see README: Connecting it to Label Studio)")
        return f"{self.backend_url} passes Label Studio's address check"

    def webhook(self) -> str:
        before = self._webhooks_received()
        try:
            created = self.client.request("POST", "/api/webhooks/", json={
                "project": self.project, "url": f"{self.backend_url}/webhook", "send_payload": True,
                "send_for_all_actions": False, "actions": ["PROJECT_UPDATED"]}).json()
        except LabelStudioError as error:
            if RESERVED in str(error):
                raise CheckFailed("Label Studio refuses webhooks to local addresses: start it with "
                                  "SSRF_PROTECTION_ENABLED=false (see README: Connecting it to Label Studio)") from None
            raise CheckFailed(f"can't add a webhook: {error}") from None
        try:
            self.client.request("PATCH", f"/api/projects/{self.project}", json={})
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if self._webhooks_received() > before:
                    return f"Label Studio's PROJECT_UPDATED reached {self.backend_url}/webhook"
                time.sleep(0.5)
        except LabelStudioError as error:
            raise CheckFailed(f"can't save project {self.project} to fire the webhook ({_said(error)})") from None
        finally:
            self._remove_webhook(created["id"])
        raise CheckFailed(f"Label Studio sent its event, but {self.backend_url} never received it: can Label "
                          "Studio's host reach that address (firewall, docker network)? Label Studio's log says "
                          "why its webhook failed")

    def _remove_webhook(self, webhook: int, tries: int = 3) -> None:
        """Remove the check's webhook, trying again on a failure; say so when it stays behind."""
        for attempt in range(tries):
            try:
                self.client.request("DELETE", f"/api/webhooks/{webhook}/")
                return
            except (LabelStudioError, httpx.HTTPError) as error:
                failure = _said(error)
                time.sleep(0.5 * (attempt + 1))
        raise CheckFailed(f"the check's webhook {webhook} could not be removed ({failure}): remove it in the "
                          "project's Settings → Webhooks")

    def _webhooks_received(self) -> int:
        auth = (self.settings.basic_auth_user, self.settings.basic_auth_pass) if self.settings.basic_auth_user else None
        try:
            answer = requests.get(f"{self.backend_url}/metrics", headers={"Accept": "application/json"}, auth=auth,
                                  timeout=10)
            answer.raise_for_status()
            return int(answer.json()["webhooks_received"])
        except (requests.RequestException, KeyError, ValueError) as error:
            raise CheckFailed(f"can't read the backend's /metrics at {self.backend_url} from here "
                              f"({error.__class__.__name__}): is the backend running at that address?") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backend check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="Label Studio's address, e.g. http://localhost:8080")
    parser.add_argument("--token", default=os.environ.get("LABEL_STUDIO_API_KEY", ""),
                        help="a Label Studio access token (legacy or personal); default: $LABEL_STUDIO_API_KEY, "
                             "which other local users can't read, as they can a command line")
    parser.add_argument("--project", type=int, help="a project id: also check its images and a webhook round trip")
    parser.add_argument("--backend-url", help="the backend's address as Label Studio reaches it, e.g. "
                                              "http://gkc-backend:9090")
    args = parser.parse_args(argv)
    if not args.token:
        sys.exit("check: set LABEL_STUDIO_API_KEY (or --token) to a Label Studio access token")
    try:
        settings = Settings()
    except ValueError as error:
        sys.exit(f"check: {error}")
    if not ConnectionCheck(args.url, args.token, args.project, args.backend_url, settings).run():
        sys.exit(1)


def _said(error: Exception) -> str:
    """An HTTP refusal in a few words: its status where there is one."""
    status = getattr(error, "status_code", None)
    if status is None and " → " in str(error):
        status = str(error).split(" → ", 1)[1].split(":", 1)[0]
    return f"HTTP {status}" if status else error.__class__.__name__
