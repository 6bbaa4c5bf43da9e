"""Operations of a server: Prometheus metrics (``GET /metrics``) and structured JSON logs.

Metrics live in the app's own registry (several apps in one process, as in tests, do not
collide). Jobs by state and the queue depth are read from the job store at each scrape, so every
ingress of a shared store reports the same; batch sizes, run times and job latency are observed
by this process's worker. prometheus_client is part of the ``server`` extra.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["ServerMetrics", "JsonLogFormatter", "METRICS_CONTENT_TYPE", "log_handler"]

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


class ServerMetrics:
    """The server's metrics; :meth:`render` is the text a Prometheus scrape gets."""

    def __init__(
        self,
        counts: Callable[[], dict[str, int]],
        replicas: Callable[[], dict[str, dict[str, int]]] | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(counts, replicas))
        self.batch_jobs = Histogram(
            "specsight_batch_jobs",
            "Jobs run together in one batch (shared forwards)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "specsight_batch_rows",
            "Rows of one batch's plans",
            buckets=(1, 16, 64, 256, 1024, 4096, 16384, 65536),
            registry=self.registry,
        )
        self.run_seconds = Histogram(
            "specsight_batch_run_seconds",
            "Seconds one batch took to run",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 600),
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "specsight_job_latency_seconds",
            "Seconds from a job's submission to its end, by outcome",
            ["outcome"],
            buckets=(0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800),
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "specsight_batch_fallbacks",
            "Batches of jobs run again one job at a time, by why (a failure: to find the job "
            "that failed, so that the others succeed)",
            ["reason"],
            registry=self.registry,
        )
        self.requests = Counter(
            "specsight_http_requests",
            "HTTP requests answered, by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )

    def batch(self, jobs: int, rows: int, seconds: float) -> None:
        """One batch ran."""
        self.batch_jobs.observe(jobs)
        self.batch_rows.observe(rows)
        self.run_seconds.observe(seconds)

    def fallback(self, reason: str) -> None:
        """A batch of jobs is run again one job at a time."""
        self.fallbacks.labels(reason=reason).inc()

    def finished(self, created: float, outcome: str) -> None:
        """A job ended (``outcome``: succeeded, failed or cancelled)."""
        self.job_seconds.labels(outcome=outcome).observe(max(0.0, time.time() - created))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _StoreCollector:
    """Jobs by state and the queue depth, read from the store at each scrape (and a cluster's
    replicas by model and state, from Ray Serve)."""

    def __init__(
        self,
        counts: Callable[[], dict[str, int]],
        replicas: Callable[[], dict[str, dict[str, int]]] | None,
    ) -> None:
        self._counts, self._replicas = counts, replicas

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        counts = self._counts()
        by_state = GaugeMetricFamily(
            "specsight_jobs", "Jobs in the store by state", labels=["state"]
        )
        for state in _STATES:
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state
        yield GaugeMetricFamily(
            "specsight_queue_depth", "Jobs waiting to run", value=counts.get("queued", 0)
        )
        if self._replicas is not None:
            replicas = GaugeMetricFamily(
                "specsight_replicas",
                "A cluster's model replicas by state",
                labels=["model", "state"],
            )
            for model, by_state in sorted(self._replicas().items()):
                for state in sorted(set(by_state) | {"RUNNING"}):
                    replicas.add_metric([model, state], by_state.get(state, 0))
            yield replicas


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the job id(s) a record
    carries (``extra={"job_id": ...}`` or ``{"job_ids": [...]}``), with the exception's text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("job_id", "job_ids", "worker", "model"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_handler(log_format: str) -> logging.Handler:
    """A stderr handler of the server's log lines: plain, or (``json``) one JSON object per
    line (a single server's and a cluster's replicas' alike)."""
    handler = logging.StreamHandler()
    text = logging.Formatter("%(asctime)s %(name)s: %(message)s")
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else text)
    return handler
