"""A replica's own metrics: the batches it ran and the latency of the jobs it ended, through
Ray's metrics API, which every node exports to Prometheus on its metrics port (the ingress's
``/metrics`` holds what the store and Ray Serve know: jobs by state, queue depth, replicas by
state, HTTP requests). The names and buckets are those of a single server's metrics
(:class:`~specsight.remote.telemetry.ServerMetrics`), with the model as a tag."""

from __future__ import annotations

import time

__all__ = ["ReplicaMetrics"]


class ReplicaMetrics:
    """What a replica's worker observes (the worker calls :meth:`batch` and :meth:`finished`
    as it calls a single server's ServerMetrics)."""

    def __init__(self, model: str) -> None:
        from ray.util.metrics import Histogram

        self._tags = {"model": model}

        def histogram(name: str, text: str, buckets: tuple[float, ...], tags=("model",)):
            return Histogram(name, text, boundaries=list(buckets), tag_keys=tags)

        self.batch_jobs = histogram(
            "specsight_batch_jobs", "Jobs run together in one batch", (1, 2, 4, 8, 16, 32, 64)
        )
        self.batch_rows = histogram(
            "specsight_batch_rows", "Rows of one batch's plans",
            (1, 16, 64, 256, 1024, 4096, 16384, 65536),
        )  # fmt: skip
        self.run_seconds = histogram(
            "specsight_batch_run_seconds", "Seconds one batch took to run",
            (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 600),
        )  # fmt: skip
        self.job_seconds = histogram(
            "specsight_job_latency_seconds", "Seconds from a job's submission to its end",
            (0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800), tags=("model", "outcome"),
        )  # fmt: skip

    def batch(self, jobs: int, rows: int, seconds: float) -> None:
        self.batch_jobs.observe(jobs, tags=self._tags)
        self.batch_rows.observe(rows, tags=self._tags)
        self.run_seconds.observe(seconds, tags=self._tags)

    def finished(self, created: float, outcome: str) -> None:
        latency = max(0.0, time.time() - created)
        self.job_seconds.observe(latency, tags={**self._tags, "outcome": outcome})
