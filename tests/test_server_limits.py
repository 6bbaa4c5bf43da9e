"""One request never costs the server more than its limits, and one user does not hurt others:
sizes are checked from the spec before compiling, validation is linear, the advertised limits
hold, fields the server cannot honour are refused, a key has a share of the queue, a crashed
batch is split, and a running job stops at the next decode step when cancelled or too long."""

from __future__ import annotations

import json
import time

import pytest
import torch
from fastapi.testclient import TestClient

import specsight
from specsight.engine import execute
from specsight.remote.auth import KeyRing
from specsight.remote.jobs import JobStore
from specsight.remote.protocol import ErrorBody, Limits
from specsight.remote.server import create_app
from tests.conftest import CLEAN, tiny

KEYS = {"alice": "alice-key", "bob": "bob-key"}
ALICE, BOB = {"X-API-Key": "alice-key"}, {"X-API-Key": "bob-key"}


@pytest.fixture
def make_client(tmp_path):
    clients = []

    def make(**kwargs):
        store = JobStore(tmp_path / f"jobs{len(clients)}.sqlite")
        app = create_app(
            {"tiny-llama": tiny("tiny-llama")},
            store=store,
            keys=KeyRing.from_raw_keys(KEYS),
            start_worker=False,
            idle_s=0.01,
            **kwargs,
        )
        client = TestClient(app)
        client.__enter__()
        clients.append((client, store))
        return client

    yield make
    for client, store in clients:
        client.__exit__(None, None, None)
        store.close()


def _post(client, spec, headers=ALICE):
    return client.post("/v1/jobs", json={"spec": spec, "client_version": "t"}, headers=headers)


def _error(response) -> ErrorBody:
    return ErrorBody.model_validate(response.json())


def _small(factor: float = 1.0) -> dict:
    ops = [{"op": "scale", "site": "mlp_out.1", "factor": factor}]
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": {"prompt": CLEAN, "ops": ops}},
        "metrics": {"p": {"kind": "prob", "invoke": "a", "token": " Mary"}},
    }


def _huge_generation(new_tokens: int) -> dict:
    """2,000 prompts generating and saving every layer at every position (the 226 KB request)."""
    prompts = [f"Prompt number {i} says" for i in range(2000)]
    ops = [{"op": "save", "site": "resid_post.*", "positions": "all", "steps": "all"}]
    generate = {"max_new_tokens": new_tokens}
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": {"prompt": prompts, "ops": ops, "generate": generate}},
    }


@pytest.mark.parametrize(("new_tokens", "what"), [(4096, "new tokens"), (256, "result bytes")])
def test_a_huge_request_is_refused_before_compiling(make_client, new_tokens, what):
    client = make_client()
    spec = _huge_generation(new_tokens)
    assert len(json.dumps(spec)) > 50_000
    started = time.perf_counter()
    response = _post(client, spec)
    elapsed = time.perf_counter() - started
    assert response.status_code == 413, response.text
    assert what in _error(response).message
    assert elapsed < 5.0  # counted from the spec; nothing per row or per step was built


def test_the_advertised_new_token_limit_holds(make_client):
    client = make_client(limits=Limits(max_new_tokens=8))
    spec = _small()
    spec["invokes"]["a"]["generate"] = {"max_new_tokens": 9}
    spec["metrics"] = {}  # metrics read one forward, not a generation
    response = _post(client, spec)
    assert response.status_code == 413
    body = _error(response)
    assert (body.estimate, body.limit) == (9, 8) and "new tokens" in body.message
    spec["invokes"]["a"]["generate"] = {"max_new_tokens": 8}
    assert _post(client, spec).status_code == 202


def test_validation_is_linear_in_the_number_of_problems(make_client):
    client = make_client()
    sweep = {"specsight": 1, "model": "tiny-llama"}
    sweep["invokes"] = {
        "a": {
            "prompt": CLEAN,
            "sweep": {"layer": [f"x{i}" for i in range(3000)]},
            "ops": [{"op": "zero", "site": "mlp_out.{layer}"}],
        }
    }
    keys = {"specsight": 1, "model": "tiny-llama", "invokes": {"a": {"prompt": CLEAN}}}
    keys["invokes"]["a"].update({f"unknown_{i}": i for i in range(12_000)})
    for spec in (sweep, keys):
        started = time.perf_counter()
        response = _post(client, spec)
        elapsed = time.perf_counter() - started
        assert response.status_code == 422
        issues = response.json()["issues"]
        assert len(issues) <= 51 and issues[-1]["code"] == "more-issues"
        assert len(response.content) < 50_000
        assert elapsed < 2.0, elapsed


def test_non_finite_numbers_are_refused(make_client):
    client = make_client()
    text = json.dumps({"spec": _small(), "client_version": "t"}).replace(
        '"factor": 1.0', '"factor": 1e999'
    )
    response = client.post(
        "/v1/jobs", content=text, headers={**ALICE, "content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "finite number" in response.text


@pytest.mark.parametrize(
    ("field", "value"),
    [("revision", "v2"), ("device", "cuda:3"), ("attn_implementation", "eager")],
)
def test_fields_the_server_cannot_honour_are_refused(make_client, field, value):
    client = make_client()
    spec = _small()
    spec["model"] = {"id": "tiny-llama", field: value}
    response = _post(client, spec)
    assert response.status_code == 422, response.text
    (issue,) = response.json()["issues"]
    assert issue["code"] == "model-mismatch" and issue["path"] == f"model.{field}"
    assert "this server runs 'tiny-llama'" in issue["message"]


def test_a_key_has_a_share_of_the_queue(make_client):
    client = make_client(limits=Limits(max_queue=10, max_queue_per_key=3))
    for factor in range(3):
        assert _post(client, _small(float(factor))).status_code == 202
    response = _post(client, _small(5.0))
    assert response.status_code == 429 and "Retry-After" in response.headers
    assert "this key's job queue is full" in _error(response).message
    assert _post(client, _small(5.0), headers=BOB).status_code == 202  # others still get in


def test_a_crashed_batch_runs_again_one_job_at_a_time(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    try:
        ids = [
            store.submit(
                owner="alice", model="m", spec_json="{}", spec_file=None, idempotency_key=None
            )[0].id
            for _ in range(3)
        ]
        assert [r.id for r in store.claim("w1", limit=8)] == ids  # one batch
        assert store.recover()["requeued"] == 3  # the process died with the batch running
        for expected in ids:  # each alone now: the one that crashed it crashes only itself
            (record,) = store.claim("w2", limit=8)
            assert record.id == expected and record.attempts == 2
            store.fail(record.id, "w2", ErrorBody(error="x", message="x"))
        new = store.submit(
            owner="alice", model="m", spec_json="{}", spec_file=None, idempotency_key=None
        )[0]
        assert [r.id for r in store.claim("w3", limit=8)] == [new.id]
    finally:
        store.close()


def _generation_plan(new_tokens: int):
    lm = tiny("tiny-llama")
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": {"prompt": CLEAN, "generate": {"max_new_tokens": new_tokens}}},
    }
    return lm, specsight.compile_plan(specsight.load_spec(spec), lm.info, lm.tokenizer)


def test_a_checkpoint_stops_generation_at_the_next_decode_step():
    lm, plan = _generation_plan(100)
    calls = []

    class Stop(Exception):
        pass

    def checkpoint():
        calls.append(1)
        if len(calls) == 6:
            raise Stop

    forwards = []
    handle = lm.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with pytest.raises(Stop):
            execute(plan, lm.model, pad_id=lm.tokenizer.pad_id, checkpoint=checkpoint)
    finally:
        handle.remove()
    assert len(forwards) == 4  # the forward loop's check, then decode steps 0..3 ran


def test_cancel_and_time_limit_reach_a_running_generation(make_client, monkeypatch):
    client = make_client(limits=Limits(max_new_tokens=256))
    spec = _small()
    spec["invokes"]["a"]["generate"] = {"max_new_tokens": 100}
    spec["metrics"] = {}
    job = _post(client, spec).json()["id"]
    store = client.app.state.server.store
    beats = []
    real_heartbeat = store.heartbeat

    def heartbeat_then_cancel(job_id, worker):  # the owner cancels during the generation
        beats.append(job_id)
        if len(beats) == 3:
            assert store.cancel(job_id, "alice").state == "running"
        return real_heartbeat(job_id, worker)

    monkeypatch.setattr(store, "heartbeat", heartbeat_then_cancel)
    monkeypatch.setattr("specsight.remote.worker._WRITE_EVERY_S", 0.0)
    forwards = []
    handle = tiny("tiny-llama").model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        assert client.app.state.server.worker.run_once() == 1
    finally:
        handle.remove()
    assert len(forwards) <= 4  # stopped at a decode step, not after 100 of them
    assert client.get(f"/v1/jobs/{job}", headers=ALICE).json()["state"] == "cancelled"

    monkeypatch.undo()
    client = make_client(limits=Limits(max_job_seconds=0.0))
    response = _post(client, spec)
    assert response.status_code == 202, response.text
    job = response.json()["id"]
    assert client.app.state.server.worker.run_once() == 1
    status = client.get(f"/v1/jobs/{job}", headers=ALICE).json()
    assert status["state"] == "failed" and status["error"]["error"] == "limit-exceeded"
    assert "run time" in status["error"]["message"]


def test_result_size_of_a_raw_path_save_is_exact_on_the_server(make_client):
    client = make_client()
    ops = [{"op": "save", "site": "lm_head", "positions": "all"}]
    spec = {"specsight": 1, "model": "tiny-llama", "invokes": {"a": {"prompt": CLEAN, "ops": ops}}}
    job = _post(client, spec).json()["id"]
    store = client.app.state.server.store
    assert store.get(job, "alice").result_estimate == 14 * tiny("tiny-llama").info.vocab_size * 4
    assert client.app.state.server.worker.run_once() == 1
    data = client.get(f"/v1/jobs/{job}/result", headers=ALICE).content
    from safetensors.torch import load

    tensor = load(data)["a/lm_head"]
    assert tensor.numel() * tensor.element_size() == store.get(job, "alice").result_estimate
    assert tensor.dtype == torch.float32


def test_a_deleted_result_is_410_and_a_download_streams_the_file(make_client):
    client = make_client()
    job = _post(client, _small()).json()["id"]
    server = client.app.state.server
    assert server.worker.run_once() == 1
    path = server.store.result(job, "alice")[0]
    response = client.get(f"/v1/jobs/{job}/result", headers=ALICE)
    assert response.status_code == 200 and response.content == path.read_bytes()
    assert server.store.expire_results(now=time.time() + 30 * 86400) == 1
    response = client.get(f"/v1/jobs/{job}/result", headers=ALICE)
    assert response.status_code == 410 and _error(response).error == "result-deleted"
    assert client.get(f"/v1/jobs/{job}", headers=ALICE).json()["state"] == "succeeded"
