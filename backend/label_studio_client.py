"""The one Label Studio client: image fetching, training pulls, ``prelabel`` and the demo use it.

It is label-studio-sdk's client, so tokens are handled as the SDK handles them: a legacy
token is sent as ``Token …``; a personal access token (a JWT refresh token) is exchanged at
``/api/token/refresh/`` for an access token, cached until its own expiry, then refreshed.
"""
from __future__ import annotations

import json

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError


class LabelStudioError(RuntimeError):
    """Label Studio refused or could not be reached; the message says which and why."""


class LabelStudioClient:
    """Label Studio at ``url``, as the holder of ``token``.

    Raises:
        LabelStudioError: ``token`` is a personal access token that has expired.
    """

    def __init__(self, url: str, token: str, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.token = token or ""
        try:
            self.sdk = LabelStudio(base_url=self.url, api_key=self.token, timeout=timeout)
        except ApiError as error:
            raise LabelStudioError(f"Label Studio's token is unusable: {_detail(error)}") from None

    @property
    def _wrapper(self):
        return self.sdk._client_wrapper

    def auth_header(self, refresh: bool = False) -> dict[str, str]:
        """``Authorization`` for Label Studio's own URLs (e.g. ``/data/upload/…``); ``refresh``:
        exchange a personal access token again (after a 401) rather than trust the cached one.

        Raises:
            LabelStudioError: Label Studio refused to refresh a personal access token.
        """
        if not self.token:
            return {}
        if refresh:
            self._wrapper._tokens_client._access_token = None  # the SDK refreshes a missing one
        try:
            return {"Authorization": self._wrapper.get_headers()["Authorization"]}
        except ApiError as error:
            raise LabelStudioError(f"Label Studio refused the personal access token ({error.status_code})") from None
        except ValueError:  # the SDK reads a refusal's body as JSON; a proxy's HTML page is not
            raise LabelStudioError("Label Studio refused the personal access token (an answer that is not "
                                   "JSON)") from None
        except httpx.HTTPError as error:
            raise LabelStudioError(f"can't reach Label Studio at {self.url} to refresh the token: "
                                   f"{error.__class__.__name__}") from None

    @property
    def uses_access_tokens(self) -> bool:
        """Whether the token is a personal access token (so a 401 may only mean "refresh me")."""
        return bool(self.token) and not self._wrapper._tokens_client._use_legacy_token

    def request(self, method: str, path: str, check: bool = True, **kwargs) -> httpx.Response:
        """A call to an endpoint the SDK does not wrap (e.g. a multipart file import), authorised
        like the SDK's own; raises :class:`LabelStudioError` on a 4xx/5xx answer unless not ``check``."""
        response = self._wrapper.httpx_client.httpx_client.request(
            method, f"{self.url}{path}", headers=self.auth_header(), **kwargs)
        if check and response.status_code >= 400:
            raise LabelStudioError(f"{method} {path} → {response.status_code}: {response.text[:500]}")
        return response

    def label_config(self, project: int | str) -> str:
        return self.sdk.projects.get(id=int(project)).label_config

    def export_annotations(self, project: int | str) -> list[dict]:
        """The project's annotated tasks, as Label Studio's JSON export has them."""
        data = b"".join(self.sdk.projects.exports.download_sync(int(project), export_type="JSON"))
        return json.loads(data)


def _detail(error: ApiError) -> str:
    body = error.body if isinstance(error.body, dict) else {}
    return str(body.get("detail") or error.status_code)


def default_hidden_columns(columns: list[dict], view: str = "explore") -> list[str]:
    """The ``hiddenColumns`` ids of the Data Manager columns (``GET /api/dm/columns``) that Label Studio hides by
    default in ``view`` ("explore": the table; "labeling": the list beside the editor), but the *Prediction score*.
    A tab must name them: Label Studio computes a column's values only for a tab that says which columns it hides
    (``data_manager/managers.py``), so a tab without them shows the score column empty."""
    return [f"tasks:{'data.' if column.get('parent') == 'data' else ''}{column['id']}" for column in columns
            if not (column.get("visibility_defaults") or {}).get(view, True) and column["id"] != "predictions_score"]
