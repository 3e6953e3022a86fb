"""The HTTP app speaking Label Studio's ML-backend protocol.

Endpoints: ``GET /`` and ``/health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``,
``GET /metrics``, ``GET /versions``. Errors are JSON ``{"error": "..."}`` with a 4xx/5xx status.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from flask import Flask, Response, g, jsonify, request

from backend.errors import ServiceError
from backend.memory import release_freed_memory
from backend.prometheus import CONTENT_TYPE as METRICS_CONTENT_TYPE
from backend.prometheus import Metrics
from backend.service import SegmentationService
from backend.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, service: SegmentationService | None = None) -> Flask:
    settings = settings or Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if service is None:
        service = SegmentationService(settings)
        service.start()
    app = Flask("gkc-backend")
    app.config["service"] = service
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    _measure(app, service.metrics)
    _guard_and_report(app, settings)

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify({"status": "UP", "model_class": "GKCSegmenter", **service.status()})

    @app.post("/setup")
    def setup():
        authenticated = bool(settings.basic_auth_user)  # _basic_auth has already checked it
        return jsonify(service.setup(_json_body(), authenticated=authenticated))

    @app.post("/predict")
    def predict():
        return jsonify(service.predict(_json_body()))

    @app.post("/webhook")
    def webhook():
        payload = _json_body()
        return jsonify(service.webhook(payload)), 201

    @app.get("/metrics")
    def metrics():
        summary = service.metrics_summary()
        accept = request.accept_mimetypes
        if accept["application/json"] > accept["text/plain"]:
            return jsonify(summary)
        return Response(service.metrics.exposition(), mimetype=None, content_type=METRICS_CONTENT_TYPE)

    @app.get("/versions")
    def versions():
        return jsonify(service.versions())

    return app


def _measure(app: Flask, metrics: Metrics) -> None:
    """Count every answer and time it, by route (not by path: paths are unbounded)."""

    @app.before_request
    def _start_clock():
        g.started = time.perf_counter()

    @app.after_request
    def _observe(response: Response):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        if endpoint != "/predict" and (request.content_length or 0) > TRIM_AFTER_BYTES:  # /predict trims itself
            release_freed_memory()
        metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response


TRIM_AFTER_BYTES = 2**20  # a request body past this leaves freed heap behind worth giving back


def _guard_and_report(app: Flask, settings: Settings) -> None:
    """Basic auth before every request; errors as JSON ``{"error": ...}`` after any."""

    @app.before_request
    def _basic_auth():
        if settings.basic_auth_user and not _authenticated(settings):
            return Response('{"error": "authentication required"}', 401, mimetype="application/json",
                            headers={"WWW-Authenticate": 'Basic realm="ml-backend"'})
        return None

    @app.errorhandler(ServiceError)
    def _service_error(error: ServiceError):
        log.warning("%s %s: %s", request.method, request.path, error)
        return jsonify({"error": str(error)}), error.status

    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    def _http_error(error):
        return jsonify({"error": error.description}), error.code

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        # Internals (paths, object reprs) stay in the log; the answer names the log entry.
        reference = uuid.uuid4().hex[:8]
        log.exception("unexpected error on %s %s (ref %s)", request.method, request.path, reference)
        return jsonify({"error": f"internal error (ref {reference} in the backend's log)"}), 500


def _json_body() -> dict:
    """The body as a JSON object; NaN, Infinity and nesting past Python's recursion limit are 400s."""
    try:
        payload = json.loads(request.get_data(cache=False), parse_constant=_refuse_constant)
    except RecursionError:
        raise ServiceError("the request body is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError and NaN/Infinity
        reason = str(error) if isinstance(error, NonStandardNumber) else "not valid JSON"
        raise ServiceError(f"the request body must be a JSON object ({reason})") from None
    if not isinstance(payload, dict):
        raise ServiceError("the request body must be a JSON object")
    return payload


class NonStandardNumber(ValueError):
    """NaN or Infinity: Python's json reads them, JSON does not have them."""


def _refuse_constant(name: str):
    raise NonStandardNumber(f"{name} is not a JSON number")


def _authenticated(settings: Settings) -> bool:
    """Basic auth, compared in constant time as UTF-8 bytes (any Unicode credential is valid input)."""
    auth = request.authorization
    if auth is None:
        return False
    user = hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
    password = hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
    return user and password
