"""Operations: ``GET /metrics`` in Prometheus' text format (jobs by state, queue depth, batch
sizes, run and job latency, requests), checked against the jobs the test ran, and JSON log
lines naming the jobs they concern."""

from __future__ import annotations

import json
import logging

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from specsight.remote.telemetry import JsonLogFormatter
from tests.test_server import ALICE, make_app, model, spec, submit, wait  # noqa: F401


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_what_ran(make_app):  # noqa: F811
    with TestClient(make_app()) as client:
        ids = [submit(client, spec(factor=f)).json()["id"] for f in (1.0, 2.0, 3.0)]
        assert all(wait(client, i).state == "succeeded" for i in ids)
        response = client.get("/metrics")  # no key: it holds no job's data
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        values = _samples(response.text)
    assert values[("specsight_jobs", (("state", "succeeded"),))] == 3
    assert values[("specsight_queue_depth", ())] == 0
    assert values[("specsight_batch_jobs_count", ())] >= 1
    assert values[("specsight_batch_jobs_sum", ())] == 3  # every job ran in some batch, once
    latency = values[("specsight_job_latency_seconds_count", (("outcome", "succeeded"),))]
    assert latency == 3
    posted = ("method", "POST"), ("route", "/v1/jobs"), ("status", "202")
    assert values[("specsight_http_requests_total", posted)] == 3


def test_json_log_lines_name_their_jobs():
    record = logging.LogRecord("specsight.worker", logging.INFO, __file__, 1, "ran %d", (2,), None)
    record.job_ids = ["a", "b"]
    line = json.loads(JsonLogFormatter().format(record))
    assert line["message"] == "ran 2" and line["job_ids"] == ["a", "b"]
    assert line["level"] == "info" and line["logger"] == "specsight.worker"


def test_a_failure_after_a_cancel_counts_as_cancelled(tmp_path):
    from specsight.remote.jobs import open_job_store
    from specsight.remote.protocol import Limits
    from specsight.remote.worker import Worker

    outcomes: list[str] = []

    class Seen:
        def finished(self, created: float, outcome: str) -> None:
            outcomes.append(outcome)

    with open_job_store(tmp_path / "jobs.sqlite") as store:
        record, _ = store.submit(
            owner="o", model="m", spec_json="{}", spec_file=None, idempotency_key=None
        )
        worker = Worker({}, store, Limits(), metrics=Seen())  # type: ignore[arg-type]
        [claimed] = store.claim(worker.id)
        store.cancel(record.id, "o")  # the owner cancels while it runs
        worker._fail(claimed, RuntimeError("the run broke"))
        assert store.record(record.id).state == "cancelled"
    assert outcomes == ["cancelled"]
