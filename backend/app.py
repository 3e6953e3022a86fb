"""The HTTP app speaking Label Studio's ML-backend protocol.

Endpoints: ``GET /`` and ``/health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``,
``GET /metrics``, ``GET /versions``. Errors are JSON ``{"error": "..."}`` with a 4xx/5xx status.
"""
from __future__ import annotations

import hmac
import logging

from flask import Flask, Response, jsonify, request

from backend.service import SegmentationService, ServiceError
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

    @app.before_request
    def _basic_auth():
        if not settings.basic_auth_user:
            return None
        auth = request.authorization
        ok = auth is not None and hmac.compare_digest(auth.username or "", settings.basic_auth_user) \
            and hmac.compare_digest(auth.password or "", settings.basic_auth_pass)
        if not ok:
            return Response('{"error": "authentication required"}', 401, mimetype="application/json",
                            headers={"WWW-Authenticate": 'Basic realm="ml-backend"'})
        return None

    def _json_body() -> dict:
        payload = request.get_json(silent=True)
        if not isinstance(payload, dict):
            raise ServiceError("the request body must be a JSON object")
        return payload

    @app.errorhandler(ServiceError)
    def _service_error(error: ServiceError):
        log.warning("%s %s: %s", request.method, request.path, error)
        return jsonify({"error": str(error)}), error.status

    @app.errorhandler(404)
    @app.errorhandler(405)
    def _http_error(error):
        return jsonify({"error": error.description}), error.code

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return jsonify({"error": f"internal error: {error.__class__.__name__}: {error}"}), 500

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify({"status": "UP", "model_class": "GKCSegmenter", **service.status()})

    @app.post("/setup")
    def setup():
        return jsonify(service.setup(_json_body()))

    @app.post("/predict")
    def predict():
        return jsonify(service.predict(_json_body()))

    @app.post("/webhook")
    def webhook():
        payload = _json_body()
        return jsonify(service.webhook(payload)), 201

    @app.get("/metrics")
    def metrics():
        return jsonify({**service.metrics.as_dict(), "annotations": service.store.annotation_counts(),
                        **service.status()})

    @app.get("/versions")
    def versions():
        return jsonify(service.versions())

    return app
