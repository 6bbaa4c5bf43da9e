"""specsight serve: the HTTP API over a tiny model, its worker, auth and draining."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors

import specsight
from specsight.cli import main
from specsight.remote import batching
from specsight.remote.auth import INSECURE_OWNER, KeyFileError, KeyRing, hash_key
from specsight.remote.jobs import JobStore
from specsight.remote.protocol import ErrorBody, JobStatus, Limits, ModelsResponse
from specsight.remote.server import create_app

from .conftest import CLEAN as CLEAN_PROMPT
from .conftest import CORRUPT as CORRUPT_PROMPT
from .conftest import tiny

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"alice": "alice-key", "bob": "bob-key"}
ALICE = {"X-API-Key": "alice-key"}
BOB = {"X-API-Key": "bob-key"}
CLEAN = [CLEAN_PROMPT]
CORRUPT = [CORRUPT_PROMPT]


def spec(factor: float | None = None, prompt: list[str] | None = None, **extra) -> dict:
    """A small spec: a scale sweep (or one factor) with a prob and a top_k metric."""
    ops = [{"op": "scale", "site": "mlp_out.1", "factor": "{f}" if factor is None else factor}]
    invoke: dict = {"prompt": prompt or CLEAN, "ops": ops}
    if factor is None:
        invoke["sweep"] = {"f": [0.0, 0.5, 2.0]}
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"base": {"prompt": CORRUPT}, "a": invoke},
        "metrics": {
            "p": {"kind": "prob", "invoke": "a", "token": " Mary"},
            "top": {"kind": "top_k", "invoke": "a", "k": 3},
        },
        **extra,
    }


BAD_WIDTH = {
    "specsight": 1,
    "model": "tiny-llama",
    "invokes": {
        "a": {
            "prompt": CLEAN,
            "ops": [{"op": "add", "site": "model.layers.1.mlp.up_proj", "vector": [1.0, 2.0, 3.0]}],
        }
    },
    "metrics": {"p": {"kind": "prob", "invoke": "a", "token": " Mary"}},
}


def body(spec_data: dict, **extra) -> dict:
    return {"spec": spec_data, "client_version": "test", **extra}


@pytest.fixture(scope="module")
def model():
    return tiny("tiny-llama")


@pytest.fixture
def make_app(tmp_path, model):
    stores = []

    def make(**kwargs):
        store = JobStore(tmp_path / f"jobs{len(stores)}.sqlite")
        stores.append(store)
        kwargs.setdefault("keys", KeyRing.from_raw_keys(KEYS))
        kwargs.setdefault("idle_s", 0.01)
        return create_app({"tiny-llama": model}, store=store, **kwargs)

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def client(make_app):
    with TestClient(make_app()) as c:
        yield c


@pytest.fixture
def idle(make_app):
    """A client whose worker does not run: jobs stay queued until run_once()."""
    app = make_app(start_worker=False)
    with TestClient(app) as c:
        yield c


def submit(c: TestClient, spec_data: dict, headers=ALICE, **kwargs):
    return c.post("/v1/jobs", json=body(spec_data), headers=headers, **kwargs)


def wait(c: TestClient, job_id: str, headers=ALICE, timeout: float = 30.0) -> JobStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = JobStatus.model_validate(c.get(f"/v1/jobs/{job_id}", headers=headers).json())
        if status.state in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish: {status}")


def error_of(response) -> ErrorBody:
    return ErrorBody.model_validate(response.json())


def fetch(c: TestClient, job_id: str, headers=ALICE) -> dict[str, torch.Tensor]:
    r = c.get(f"/v1/jobs/{job_id}/result", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["X-Specsight-Sha256"] == hashlib.sha256(r.content).hexdigest()
    return load_safetensors(r.content)


def worker_of(c: TestClient):
    return c.app.state.server.worker


# --- auth -------------------------------------------------------------------------------------


def test_keyring_hashes_and_files(tmp_path, monkeypatch):
    ring = KeyRing.from_raw_keys({"alice": "s3cret"})
    assert ring.authenticate("s3cret") == "alice"
    assert ring.authenticate("S3cret") is None and ring.authenticate(None) is None
    assert ring.authenticate("") is None
    path = tmp_path / "keys"
    path.write_text(
        f"# team keys\n\nalice:{hash_key('a1')}  # old\nalice:{hash_key('a2')}\n"
        f"bob:{hash_key('b').upper()}\n"
    )
    ring = KeyRing.from_file(path)
    assert [ring.authenticate(k) for k in ("a1", "a2", "b", "c")] == ["alice", "alice", "bob", None]
    assert "a1" not in path.read_text() and ring.owners == ["alice", "bob"]
    monkeypatch.setenv("SPECSIGHT_API_KEYS", f"carol:{hash_key('c')}, dave:{hash_key('d')}")
    assert KeyRing.from_env().authenticate("d") == "dave"
    path.write_text(f"alice:{hash_key('a1')}\nbob:nothex\n")
    with pytest.raises(KeyFileError, match=r"keys:2"):
        KeyRing.from_file(path)
    assert KeyRing.allow_all().authenticate(None) == INSECURE_OWNER


def test_authenticate_compares_every_key(monkeypatch):
    """Constant time: no early exit at the first match."""
    import specsight.remote.auth as auth

    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(
        auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b), raising=True
    )
    ring = KeyRing.from_raw_keys({f"user{i}": f"key{i}" for i in range(5)})
    assert ring.authenticate("key0") == "user0"
    assert len(calls) == 5


def _v1_requests(app):
    """(method, path) of every /v1 route, path parameters filled in."""
    import fastapi.routing

    flatten = getattr(fastapi.routing, "iter_route_contexts", lambda routes: routes)  # >= 0.16x
    out = []
    for route in flatten(app.routes):
        path = getattr(route, "path", None) or ""
        if not path.startswith("/v1"):
            continue
        filled = re.sub(r"\{[^}]+\}", "x", path)
        out += [(method, filled) for method in sorted(route.methods - {"HEAD", "OPTIONS"})]
    return out


def test_every_v1_route_needs_a_key(client):
    requests = _v1_requests(client.app)
    assert len(requests) >= 7  # submit, status, result, manifest, cancel, models, tokenizer
    for method, path in requests:
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
            r = client.request(method, path, headers=headers, json=body(spec(1.0)))
            assert r.status_code == 401, (method, path, headers, r.text)
            assert error_of(r).error == "unauthorized"
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_openapi_declares_the_key_on_every_v1_operation(client):
    doc = client.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "an API key",
    }
    ops = [(p, m, op) for p, item in doc["paths"].items() for m, op in item.items()]
    assert len([p for p, _, _ in ops if p.startswith("/v1")]) >= 7
    for path, method, op in ops:
        if path.startswith("/v1"):
            assert op.get("security") == [{"APIKeyHeader": []}], (method, path)
        else:
            assert "security" not in op


def test_other_keys_jobs_are_not_found(client):
    job = submit(client, spec(1.0)).json()["id"]
    wait(client, job)
    for method, suffix in (("GET", ""), ("GET", "/result"), ("GET", "/manifest"), ("DELETE", "")):
        r = client.request(method, f"/v1/jobs/{job}{suffix}", headers=BOB)
        assert r.status_code == 404, (method, suffix)
        assert error_of(r).error == "not-found"
        assert client.request(method, f"/v1/jobs/{job}{suffix}", headers=ALICE).status_code == 200
    assert client.get("/v1/jobs/nope", headers=ALICE).status_code == 404


# --- a job end to end -------------------------------------------------------------------------


def test_submit_poll_result_equals_a_local_run(client, model, tmp_path):
    r = submit(client, spec())
    assert r.status_code == 202, r.text
    status = JobStatus.model_validate(r.json())
    assert status.state in ("queued", "running") and status.model == "tiny-llama"
    done = wait(client, status.id)
    assert done.state == "succeeded", done
    assert done.progress.done == done.progress.total > 0 and done.attempts == 1
    tensors = fetch(client, status.id)
    local = specsight.run(spec(), model=model)
    assert set(tensors) == set(local.tensors)
    for name, tensor in local.tensors.items():
        assert torch.equal(tensors[name], tensor), name
    r = client.get(f"/v1/jobs/{status.id}/result", headers=ALICE)
    assert r.headers["X-Specsight-Sha256"] == done.result_sha256
    manifest = client.get(f"/v1/jobs/{status.id}/manifest", headers=ALICE).json()
    assert manifest["model"]["weights_sha256"] == model.weights_sha256
    assert manifest["spec"]["sha256"] == local.manifest["spec"]["sha256"]
    for name, meta in local.manifest["tensors"].items():
        assert manifest["tensors"][name]["sha256"] == meta["sha256"]
    assert manifest["summary"]["next_tokens"] == json.loads(json.dumps(local.next_tokens))


def test_result_payload_is_what_results_save_writes(model, tmp_path):
    results = specsight.run(spec(), model=model)
    data, manifest = results.payload()
    results.save(tmp_path, plots=False)
    assert data == (tmp_path / "results.safetensors").read_bytes()
    assert manifest == (tmp_path / "manifest.json").read_text()


def test_models_and_tokenizer(client, model):
    r = client.get("/v1/models", headers=ALICE)
    assert r.status_code == 200
    models = ModelsResponse.model_validate(r.json())
    (entry,) = models.models
    assert entry.id == "tiny-llama" and entry.weights_sha256 == model.weights_sha256
    assert entry.info == model.info.to_dict()
    assert "add" in entry.ops and "logit_diff" in entry.metrics
    assert "resid_post.L" in entry.canonical_sites and models.limits == Limits()
    r = client.get("/v1/models/tiny-llama/tokenizer", headers=ALICE)
    assert r.status_code == 200 and r.json() == json.loads(model.tokenizer.backend.to_str())
    assert client.get("/v1/models/nope/tokenizer", headers=ALICE).status_code == 404


def test_result_is_409_until_succeeded(idle):
    job = submit(idle, spec(1.0)).json()["id"]
    for suffix in ("/result", "/manifest"):
        r = idle.get(f"/v1/jobs/{job}{suffix}", headers=ALICE)
        assert r.status_code == 409 and error_of(r).error == "not-ready"


# --- refusals before the queue ----------------------------------------------------------------


def test_request_too_large(make_app):
    with TestClient(make_app(limits=Limits(max_request_bytes=2000))) as c:
        big = spec(1.0, prompt=["word " * 1000])
        r = submit(c, big)
        assert r.status_code == 413
        err = error_of(r)
        assert err.error == "request-too-large" and err.limit == 2000 and err.estimate > 2000
        # without a Content-Length (chunked): refused while reading
        data = json.dumps(body(big)).encode()
        r = c.post("/v1/jobs", content=iter([data[:1500], data[1500:]]), headers=ALICE)
        assert r.status_code == 413 and error_of(r).limit == 2000
        assert c.get("/readyz").json()["queued"] == 0


def test_limit_exceeded(make_app):
    with TestClient(make_app(limits=Limits(max_cells=2))) as c:
        r = submit(c, spec())  # 1 cell in "base" + a sweep of 3
        assert r.status_code == 413
        err = error_of(r)
        assert err.error == "limit-exceeded" and (err.estimate, err.limit) == (4, 2)
        assert "cells" in err.message and err.hint


def test_huge_sweeps_are_refused_before_compiling(client):
    """A range of 10**12 values is counted, never listed (it would exhaust memory)."""
    huge = spec()
    huge["invokes"]["a"]["sweep"] = {"x": "0:1000000000000"}
    huge["invokes"]["a"]["ops"][0]["factor"] = "{x}"
    started = time.monotonic()
    r = submit(client, huge)
    assert r.status_code == 413 and error_of(r).estimate == 10**12 + 1
    product = spec()
    product["invokes"]["a"]["sweep"] = {"f": list(range(1000)), "layer": "all", "pos": "all"}
    r = submit(client, product)
    assert r.status_code == 413 and error_of(r).estimate > 20_000
    assert time.monotonic() - started < 5


def test_odd_values_are_422_not_500(client):
    odd = spec()
    odd["invokes"]["a"]["sweep"] = {"f": ":-"}
    r = submit(client, odd)
    assert r.status_code == 422 and error_of(r).error == "invalid-spec"
    r = submit(client, spec(1.0, seed=2**70))
    assert r.status_code == 422 and error_of(r).issues[0]["path"] == "seed"


def test_invalid_spec_is_422_with_located_issues(client):
    bad = spec(1.0)
    bad["metrics"]["p"]["kind"] = "probability"
    r = client.post("/v1/jobs", json=body(bad, spec_file="exp.yaml"), headers=ALICE)
    assert r.status_code == 422
    err = error_of(r)
    assert err.error == "invalid-spec" and "metrics.p.kind" in err.message
    (issue,) = err.issues
    assert issue["code"] == "unknown-metric" and issue["path"] == "metrics.p.kind"
    assert issue["path_parts"] == ["metrics", "p", "kind"] and issue["file"] == "exp.yaml"
    assert "probability" in issue["message"] and "prob" in issue["hint"]
    assert issue["line"] is None  # from_data: no positions to give


def test_compile_error_is_located(client):
    bad = spec(1.0)
    bad["invokes"]["a"]["ops"][0]["site"] = "resid_postt.1"
    err = error_of(submit(client, bad))
    assert err.error == "invalid-spec"
    (issue,) = err.issues
    assert issue["path"] == "invokes.a.ops[0].site" and "resid_post" in (issue["hint"] or "")


def test_file_vectors_are_refused(client, tmp_path):
    secret = tmp_path / "steer.npy"
    bad = spec(1.0)
    bad["invokes"]["a"]["ops"] = [
        {"op": "add", "site": "resid_post.1", "vector": {"file": str(secret)}}
    ]
    r = submit(client, bad)
    assert r.status_code == 422
    (issue,) = error_of(r).issues
    assert issue["code"] == "file-not-allowed" and issue["path"] == "invokes.a.ops[0].vector.file"
    assert not secret.exists()


def test_malformed_requests_are_422_error_bodies(client):
    cases = [
        client.post("/v1/jobs", content=b"{not json", headers=ALICE),
        client.post("/v1/jobs", content=b'{"spec": NaN}', headers=ALICE),
        client.post("/v1/jobs", json={"spec": {}}, headers=ALICE),
        client.post("/v1/jobs", json=[1, 2], headers=ALICE),
        client.post("/v1/jobs", json=body(spec(1.0), extra=1), headers=ALICE),
        client.post("/v1/jobs", json=body(spec(1.0), spec_version=2), headers=ALICE),
        client.post("/v1/jobs", json=body("not a mapping"), headers=ALICE),  # type: ignore[arg-type]
    ]
    lone = json.dumps(body(spec(1.0, prompt=["a \ud800 b"])))  # a lone surrogate: not Unicode
    cases.append(client.post("/v1/jobs", content=lone, headers=ALICE))
    codes = [error_of(r).error for r in cases]
    assert all(r.status_code == 422 for r in cases), [r.text for r in cases]
    assert codes[:3] == ["invalid-json", "invalid-json", "invalid-request"]
    assert codes[5] == "unsupported-spec-version" and codes[-1] == "invalid-spec"
    (surrogate,) = error_of(cases[-1]).issues  # located: the string that holds it
    assert surrogate["path"] == "invokes.a.prompt[0]" and "\\ud800" in surrogate["message"]
    missing = error_of(cases[2]).issues
    assert {i["path"] for i in missing} == {"client_version"}


def test_unknown_model_and_dtype(client):
    r = submit(client, spec(1.0, model="tiny-lama"))
    err = error_of(r)
    assert r.status_code == 422 and err.issues[0]["code"] == "unknown-model"
    assert err.issues[0]["path"] == "model" and "tiny-llama" in err.issues[0]["hint"]
    r = submit(client, spec(1.0, model={"id": "tiny-llama", "dtype": "float16"}))
    assert r.status_code == 422 and error_of(r).issues[0]["code"] == "dtype-mismatch"
    r = submit(client, spec(1.0, model={"id": "tiny-llama", "dtype": "float32"}))
    assert r.status_code == 202


def test_queue_full_is_429_with_retry_after(make_app):
    with TestClient(make_app(start_worker=False, limits=Limits(max_queue=2))) as c:
        assert submit(c, spec(1.0)).status_code == 202
        assert submit(c, spec(2.0)).status_code == 202
        r = submit(c, spec(3.0))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert error_of(r).error == "queue-full"


def test_idempotent_submit(idle):
    first = submit(idle, spec(1.0), headers={**ALICE, "Idempotency-Key": "k-1"})
    again = submit(idle, spec(1.0), headers={**ALICE, "Idempotency-Key": "k-1"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    other = submit(idle, spec(1.0), headers={**BOB, "Idempotency-Key": "k-1"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert idle.get("/readyz").json()["queued"] == 2
    reused = submit(idle, spec(2.0), headers={**ALICE, "Idempotency-Key": "k-1"})
    assert reused.status_code == 422 and error_of(reused).error == "idempotency-key-reused"


# --- the worker ---------------------------------------------------------------------------


def test_cancel_a_queued_job(idle):
    job = submit(idle, spec(1.0)).json()["id"]
    r = idle.delete(f"/v1/jobs/{job}", headers=ALICE)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert worker_of(idle).run_once() == 0
    assert idle.get(f"/v1/jobs/{job}/result", headers=ALICE).status_code == 409


def test_cancel_a_running_job(idle, monkeypatch):
    """A cancel requested while the job runs stops it at the next forward: cancelled."""
    job = submit(idle, spec()).json()["id"]
    real = batching.run_jobs

    def cancel_then_run(jobs, model, **watch):
        assert idle.delete(f"/v1/jobs/{job}", headers=ALICE).json()["state"] == "running"
        return real(jobs, model, **watch)

    monkeypatch.setattr(batching, "run_jobs", cancel_then_run)
    assert worker_of(idle).run_once() == 1
    assert idle.get(f"/v1/jobs/{job}", headers=ALICE).json()["state"] == "cancelled"


def test_a_failing_job_fails_alone(idle, model):
    bad = submit(idle, BAD_WIDTH).json()["id"]  # only detectable at run time
    good = submit(idle, spec(1.0)).json()["id"]
    assert worker_of(idle).run_once() == 2
    failed, succeeded = wait(idle, bad), wait(idle, good)
    assert failed.state == "failed" and failed.error.error == "run-error"
    assert "3 values" in failed.error.message and "width 128" in failed.error.message
    assert succeeded.state == "succeeded"
    assert torch.equal(fetch(idle, good)["p"], specsight.run(spec(1.0), model=model)["p"])


@pytest.fixture
def batches(monkeypatch) -> list[int]:
    """The number of jobs of each batch the worker runs."""
    calls: list[int] = []
    real = batching.run_jobs

    def counting(jobs, loaded, **watch):
        calls.append(len(jobs))
        return real(jobs, loaded, **watch)

    monkeypatch.setattr(batching, "run_jobs", counting)
    return calls


def test_queued_jobs_run_batched(idle, model, batches):
    calls = batches
    specs = [spec(), spec(0.25), spec(3.0, prompt=CORRUPT + CLEAN)]
    specs.append(spec(0.5, seed=7, deterministic=True))  # runs apart: its own seed
    ids = [
        submit(idle, s, headers=ALICE if i % 2 else BOB).json()["id"] for i, s in enumerate(specs)
    ]
    assert worker_of(idle).run_once() == 4
    assert calls == [3, 1]
    for i, (job, s) in enumerate(zip(ids, specs)):
        headers = ALICE if i % 2 else BOB
        assert wait(idle, job, headers).state == "succeeded"
        remote, local = fetch(idle, job, headers), specsight.run(s, model=model)
        for name, tensor in local.tensors.items():
            if tensor.is_floating_point():
                torch.testing.assert_close(remote[name], tensor, rtol=0, atol=1e-5)
            else:
                assert torch.equal(remote[name], tensor), name


def _kl_job(reference: str, factor: float) -> dict:
    """A job with its own reference prompt: a kl metric and an effect from a baseline."""
    ld = {"kind": "logit_diff", "target": " Mary", "foil": " John"}
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {
            "ref": {"prompt": [reference]},
            "a": {"prompt": CLEAN, "ops": [{"op": "scale", "site": "mlp_out.1", "factor": factor}]},
        },
        "metrics": {
            "kl": {"kind": "kl", "invoke": "a", "reference": "ref"},
            "p_ref": {**ld, "invoke": "ref"},
            "p": {**ld, "invoke": "a", "baseline": "p_ref"},
        },
    }


def test_jobs_of_two_keys_with_their_own_references_share_forwards_and_read_their_own(
    idle, model, batches
):
    """Two keys' jobs, each measuring kl against its own reference prompt and an effect from
    its own baseline, run in one batch and each gets what it gets alone (merging once read
    the other job's reference row, and a baseline sent the batch back to one job at a time)."""
    calls = batches
    jobs = [(ALICE, _kl_job(CORRUPT_PROMPT, 0.5)), (BOB, _kl_job(CLEAN_PROMPT, 2.0))]
    ids = [submit(idle, s, headers=h).json()["id"] for h, s in jobs]
    assert worker_of(idle).run_once() == 2
    assert calls == [2]  # one batch: merged, not run again one by one
    for job, (headers, s) in zip(ids, jobs):
        assert wait(idle, job, headers).state == "succeeded"
        remote, local = fetch(idle, job, headers), specsight.run(s, model=model)
        assert remote.keys() == local.tensors.keys()
        for name, tensor in local.tensors.items():
            torch.testing.assert_close(remote[name], tensor, rtol=1e-6, atol=1e-6)
    kls = [fetch(idle, job, h)["kl"] for job, (h, _) in zip(ids, jobs)]
    assert float(kls[0]) > 0 and not torch.equal(kls[0], kls[1])
    assert 'specsight_batch_fallbacks_total{reason="failure"}' not in idle.get("/metrics").text


def test_a_batch_run_again_one_by_one_is_logged_and_counted(idle, caplog):
    submit(idle, BAD_WIDTH)
    submit(idle, spec(1.0))
    with caplog.at_level("WARNING", logger="specsight.serve"):
        assert worker_of(idle).run_once() == 2
    assert any("one by one" in r.getMessage() for r in caplog.records)
    text = idle.get("/metrics").text
    assert 'specsight_batch_fallbacks_total{reason="failure"} 1.0' in text


def test_the_worker_thread_runs_jobs_until_shutdown(make_app):
    app = make_app()
    with TestClient(app) as c:
        ids = [submit(c, spec(f)).json()["id"] for f in (0.5, 1.5)]
        assert [wait(c, job).state for job in ids] == ["succeeded", "succeeded"]
        assert app.state.server.worker.is_alive()
    assert not app.state.server.worker.is_alive()


def test_readyz_is_503_while_draining(client):
    assert client.get("/readyz").status_code == 200
    client.app.state.server.begin_drain()
    r = client.get("/readyz")
    assert r.status_code == 503 and error_of(r).error == "draining"
    r = submit(client, spec(1.0))
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert client.get("/healthz").status_code == 200


def test_drain_requeues_a_batch_that_outlives_the_grace_period(make_app, monkeypatch):
    started = []

    def slow(jobs, model, *, progress=None, checkpoint=None):
        started.append(len(jobs))
        while True:  # a long run: every forward passes the checkpoint
            checkpoint()
            progress(0, 10)
            time.sleep(0.01)

    monkeypatch.setattr(batching, "run_jobs", slow)
    app = make_app(grace_s=0.3)
    store = app.state.server.store
    with TestClient(app) as c:
        job = submit(c, spec(1.0)).json()["id"]
        deadline = time.monotonic() + 10
        while not started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.get(f"/v1/jobs/{job}", headers=ALICE).json()["state"] == "running"
    status = store.status(job, "alice")
    assert status.state == "queued" and status.attempts == 0  # not a failed attempt


def test_drain_lets_the_running_batch_finish(make_app, monkeypatch):
    real = batching.run_jobs

    def slowish(jobs, model, **watch):
        time.sleep(0.3)
        return real(jobs, model, **watch)

    monkeypatch.setattr(batching, "run_jobs", slowish)
    app = make_app(grace_s=30)
    store = app.state.server.store
    with TestClient(app) as c:
        job = submit(c, spec(1.0)).json()["id"]
        deadline = time.monotonic() + 10
        while store.status(job, "alice").state == "queued" and time.monotonic() < deadline:
            time.sleep(0.01)
    assert store.status(job, "alice").state == "succeeded"


# --- the CLI ------------------------------------------------------------------------------


def test_hash_key_and_serve_refuses_without_keys(monkeypatch, tmp_path):
    result = CliRunner().invoke(main, ["hash-key", "--name", "alice"], input="s3cret\n")
    assert result.exit_code == 0 and result.output.strip() == f"alice:{hash_key('s3cret')}"
    result = CliRunner().invoke(main, ["hash-key", "--generate", "--name", "bob"])
    assert result.exit_code == 0
    line = result.stdout.strip()
    raw = re.search(r"(ss_\S+)", result.stderr).group(1)
    assert KeyRing.parse(line).authenticate(raw) == "bob"
    monkeypatch.delenv("SPECSIGHT_API_KEYS", raising=False)
    result = CliRunner().invoke(main, ["serve", "--model", "tiny-llama"])
    assert result.exit_code == 2 and "no API keys" in result.output
    empty = tmp_path / "keys"
    empty.write_text("# nobody\n")
    result = CliRunner().invoke(main, ["serve", "--model", "tiny-llama", "--keys", str(empty)])
    assert result.exit_code == 2 and "no key" in result.output


def test_serve_runs_jobs_and_drains_on_sigterm(tmp_path):
    """The real thing: `specsight serve` under uvicorn, a job over HTTP, SIGTERM, exit 0."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{hash_key('alice-key')}\n")
    db = tmp_path / "jobs.sqlite"
    args = ["serve", "--model", "tiny-llama", "--device", "cpu", "--port", str(port)]
    args += ["--db", str(db), "--keys", str(keys), "--grace", "5"]
    cmd = [sys.executable, "-c", "from specsight.cli import main; main()", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError("the server did not get ready")
        r = httpx.post(f"{url}/v1/jobs", json=body(spec(1.0)), headers=ALICE)
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/v1/jobs/{job}", headers=ALICE).json()["state"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(f"{url}/v1/models", headers={"X-API-Key": "no"}).status_code == 401
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    # uvicorn re-raises the signal once shut down: the process ends by SIGTERM, after draining
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output and "Traceback" not in output
    with JobStore(db) as store:
        assert store.status(job, "alice").state == "succeeded"


# --- safety -------------------------------------------------------------------------------


def test_no_unsafe_deserialisation_on_the_remote_path():
    files = sorted((ROOT / "specsight").rglob("*.py"))  # the server path, and everything else
    pattern = re.compile(r"\bpickle\b|torch\.load\(|(?<![\w.])eval\(|(?<![\w.])exec\(")
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), f"{path.name}:{number}: {line.strip()}"


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(make_app):
    """Fuzz every operation with a valid key (specs follow the spec schema the OpenAPI
    document embeds); no 5xx, responses as documented; then run every job it queued."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    app = make_app(start_worker=False, limits=Limits(max_queue=100_000))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    seen: dict[str, set[int]] = {}
    checks = [status_code_conformance, content_type_conformance, response_schema_conformance]
    for operation in operations:
        submit_op = operation.label == "POST /v1/jobs"

        @given(case=operation.as_strategy(headers=dict(ALICE)))
        @_documented_example(operation)
        @settings(
            max_examples=150 if submit_op else 30,
            deadline=None,
            database=None,
            derandomize=True,  # the same cases every run: a failure here reproduces
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            response = case.call()
            seen.setdefault(case.operation.label, set()).add(response.status_code)
            assert response.status_code < 500, (case.as_curl_command(), response.text)
            if response.status_code >= 400:
                ErrorBody.model_validate(response.json())
            case.validate_response(response, checks=checks)

        check()
    assert len(seen) == len(operations)
    assert seen["POST /v1/jobs"] & {200, 202}, seen  # the documented example is queued
    server = app.state.server
    while server.worker.run_once():
        pass
    counts = server.store.counts()
    assert counts["queued"] == counts["running"] == 0
    failed = [server.store.get(j, "alice") for j in _failed_ids(server.store)]
    assert not [r.error for r in failed if r.error.error == "internal-error"]


def _documented_example(operation):
    """The request body example the OpenAPI document gives, as the first case (it must run)."""
    from hypothesis import example

    body = operation.definition.raw.get("requestBody", {}).get("content", {})
    documented = body.get("application/json", {}).get("example")
    if documented is None:
        return lambda test: test
    case = operation.Case(body=documented, headers=dict(ALICE), media_type="application/json")
    return example(case=case)


def _failed_ids(store: JobStore) -> list[str]:
    import sqlite3

    with sqlite3.connect(store.path) as con:
        return [row[0] for row in con.execute("SELECT id FROM jobs WHERE state='failed'")]
