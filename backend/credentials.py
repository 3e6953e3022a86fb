"""Which Label Studio, and which token, a project's images and training jobs use.

``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` in the environment serve every project. Without
them the backend learns them from Label Studio's ``/setup``, which is unauthenticated unless
``BASIC_AUTH_USER`` is set, so what it learns is bounded:

* **one address.** The first address learned is trusted (kept in MODEL_DIR). Moving to another
  takes a /setup that passed basic auth, or the address in ``ALLOWED_IMAGE_HOSTS``;
* **a token per project.** A token serves only the project whose /setup brought it (Label Studio
  sends the project creator's token). The first token a project gets is bound to it (its SHA-256,
  kept in MODEL_DIR; the token itself stays in memory), and a /setup bringing
  another token for that project needs basic auth. After a restart a project's token comes back
  with its next /setup, which must match the binding.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from urllib.parse import urlsplit

from backend.errors import ServiceError
from backend.label_studio_client import LabelStudioClient, LabelStudioError
from backend.settings import Settings
from backend.store import Store

log = logging.getLogger(__name__)

TRUSTED_LABEL_STUDIO = "trusted_label_studio_url"
MAX_PROJECTS = 4096  # tokens kept in memory; a project past them gets its token back at its next /setup


class Credentials:
    """Each project's Label Studio client (its address and token), as the policy above allows."""

    def __init__(self, settings: Settings, store: Store, timeout: float = 10.0):
        self.store = store
        self.timeout = timeout
        self.from_environment = bool(settings.label_studio_url)  # then /setup teaches nothing
        self._tokenless: LabelStudioClient | None = None
        self._clients: dict[str, LabelStudioClient] = {}
        self._lock = threading.Lock()
        if settings.label_studio_api_key and not settings.label_studio_url:
            log.warning("LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL: the key is not used; images "
                        "are fetched with the token Label Studio sends to /setup")

    def for_project(self, project: str) -> LabelStudioClient | None:
        """The client for ``project``'s images: None for the environment's (the fetcher's own), else the
        project's, else the trusted address without a token (relative paths resolve; Label Studio then
        answers 401 until the project's next /setup)."""
        if self.from_environment:
            return None
        with self._lock:
            client = self._clients.get(project)
            if client is not None:
                return client
            trusted = self.store.get_meta(TRUSTED_LABEL_STUDIO)
            if trusted and (self._tokenless is None or self._tokenless.url != trusted):
                self._tokenless = LabelStudioClient(trusted, "", self.timeout)
            return self._tokenless if trusted else None

    def training_env(self, project: str) -> dict[str, str]:
        """LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY for ``project``'s training job, learnt from its /setup (empty:
        the environment's serve, or none is known)."""
        client = self.for_project(project)
        if client is None or not client.token:
            return {}
        return {"LABEL_STUDIO_URL": client.url, "LABEL_STUDIO_API_KEY": client.token}

    def learn(self, project: str, hostname, token, authenticated: bool, allowed) -> None:
        """Take /setup's ``hostname`` and ``token`` for ``project``, unless the environment names them.

        Args:
            authenticated: the /setup passed basic auth.
            allowed: ``allowed(origin)``, whether an address is in ALLOWED_IMAGE_HOSTS.

        Raises:
            ServiceError: 400 for a malformed address, 403 for a move or a token change the policy refuses.
        """
        if self.from_environment or not hostname or not token:
            return
        if not isinstance(hostname, str) or not isinstance(token, str):
            raise ServiceError("/setup's 'hostname' and 'access_token' must be strings")
        parts = urlsplit(hostname.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise ServiceError(f"/setup's hostname {hostname[:80]!r} is not an http(s) address without credentials")
        origin = f"{parts.scheme}://{parts.netloc.lower()}"
        trusted = self.store.get_meta(TRUSTED_LABEL_STUDIO)
        if trusted and trusted != origin and not (authenticated or allowed(origin)):
            raise ServiceError(
                f"this backend trusts the Label Studio at {trusted}; a /setup naming {origin} needs basic auth "
                "(BASIC_AUTH_USER/BASIC_AUTH_PASS) or the host in ALLOWED_IMAGE_HOSTS", 403)
        if not project:
            log.warning("/setup from %s names no project: its token is not used", origin)
            return
        binding, bound = _binding(token), self.store.get_meta(_binding_key(project))
        if bound and not hmac.compare_digest(bound, binding) and not authenticated:
            raise ServiceError(
                f"project {project} already has a Label Studio token; a /setup bringing another one needs basic "
                "auth (BASIC_AUTH_USER/BASIC_AUTH_PASS), or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", 403)
        try:
            client = LabelStudioClient(origin, token, self.timeout)
        except LabelStudioError as error:
            raise ServiceError(f"/setup: {error}") from None
        with self._lock:
            current = self._clients.get(project)
            if current is None or (current.url, current.token) != (origin, token):  # keep a PAT's access token
                self._clients.pop(project, None)
                self._clients[project] = client
                while len(self._clients) > MAX_PROJECTS:
                    del self._clients[next(iter(self._clients))]
        if bound != binding:
            self.store.set_meta(_binding_key(project), binding)
        if trusted != origin:
            self.store.set_meta(TRUSTED_LABEL_STUDIO, origin)
            log.warning("trusting the Label Studio at %s (learnt from /setup)", origin)


def _binding_key(project: str) -> str:
    return f"label_studio_token_sha256:{project}"


def _binding(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
