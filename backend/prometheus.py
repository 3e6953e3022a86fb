"""What operators scrape: Prometheus counters and histograms, and the same facts as JSON.

``GET /metrics`` answers the Prometheus text format; with ``Accept: application/json`` it
answers the JSON summary (:meth:`Metrics.summary`) that earlier versions served.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: a health check is milliseconds, a /predict of full-size photos several seconds.
LATENCY_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """One registry per app, so that several apps in one process (tests) never share counters."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gkc_http_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("gkc_http_request_seconds", "Time to answer an HTTP request, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tasks = Counter("gkc_predicted_tasks", "Tasks in /predict requests", registry=r)
        self.task_failures = Counter("gkc_failed_tasks", "Tasks answered with an error instead of a prediction",
                                     registry=r)
        self.predict_seconds = Histogram("gkc_predict_seconds", "Time to answer one /predict request",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.webhooks = Counter("gkc_webhooks", "Label Studio webhook events received, by action", ["action"],
                                registry=r)
        self.training_jobs = Counter("gkc_training_jobs", "Training jobs that ended, by outcome", ["outcome"],
                                     registry=r)
        self.training_running = Gauge("gkc_training_jobs_running", "Training jobs running now", registry=r)
        self.training_queued = Gauge("gkc_training_jobs_queued", "Projects waiting for a training slot", registry=r)
        self.model_ready = Gauge("gkc_model_ready", "1 when the model has loaded, 0 while loading or failed",
                                 registry=r)

    def predicted(self, tasks: int, failures: int, seconds: float) -> None:
        self.tasks.inc(tasks)
        self.task_failures.inc(failures)
        self.predict_seconds.observe(seconds)

    def webhook(self, action: str, known: bool) -> None:
        self.webhooks.labels(action=action if known else "other").inc()  # unknown actions: one series

    def summary(self) -> dict:
        """The JSON counters, read from the Prometheus samples (one source for both formats)."""
        samples = {}
        for family in self.registry.collect():
            for sample in family.samples:
                samples[sample.name] = samples.get(sample.name, 0.0) + sample.value  # summed over labels
        return {"predict_requests": int(samples.get("gkc_predict_seconds_count", 0)),
                "predicted_tasks": int(samples.get("gkc_predicted_tasks_total", 0)),
                "failed_tasks": int(samples.get("gkc_failed_tasks_total", 0)),
                "predict_seconds_total": round(samples.get("gkc_predict_seconds_sum", 0.0), 3),
                "webhooks_received": int(samples.get("gkc_webhooks_total", 0))}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
