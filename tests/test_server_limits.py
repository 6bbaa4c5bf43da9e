"""One request never costs the server more than its limits, and one user does not hurt others:
sizes are checked from the spec before compiling (texts by their bytes before tokenizing, the
result's estimate before running), validation is linear, the advertised limits hold and
``GET /v1/limits`` reports them, fields the server cannot honour are refused, a key has a share
of the queue and of the intake, a crashed batch is split, and a running job stops at the next
decode step when cancelled or too long."""

from __future__ import annotations

import json
import threading
import time

import httpx
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
from tests.serving import start_server, stop_server, submit

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
    """The tensor's bytes are exact (its width measured on the served model); the estimate
    adds the safetensors header and the manifest, and holds everything stored."""
    client = make_client()
    ops = [{"op": "save", "site": "lm_head", "positions": "all"}]
    spec = {"specsight": 1, "model": "tiny-llama", "invokes": {"a": {"prompt": CLEAN, "ops": ops}}}
    job = _post(client, spec).json()["id"]
    store = client.app.state.server.store
    tensor_bytes = 14 * tiny("tiny-llama").info.vocab_size * 4
    estimate = store.get(job, "alice").result_estimate
    assert estimate >= tensor_bytes
    assert client.app.state.server.worker.run_once() == 1
    data = client.get(f"/v1/jobs/{job}/result", headers=ALICE).content
    manifest = client.get(f"/v1/jobs/{job}/manifest", headers=ALICE).content
    from safetensors.torch import load

    tensor = load(data)["a/lm_head"]
    assert tensor.numel() * tensor.element_size() == tensor_bytes
    assert tensor.dtype == torch.float32
    assert len(data) + len(manifest) <= estimate


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


# --- on a real `specsight serve` ------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``specsight serve`` on loopback with the default limits, but results of 32 MB at most."""
    server = start_server(
        tmp_path_factory.mktemp("served"), deploy={"limits": {"max_result_bytes": 32_000_000}}
    )
    yield server
    stop_server(server)


def _many_invokes(count: int) -> dict:
    invokes = {f"i{i}": {"prompt": f"Prompt {i} says"} for i in range(count)}
    return {"specsight": 1, "model": "tiny-llama", "invokes": invokes}


def test_a_long_prompt_is_refused_by_its_bytes_before_tokenizing(served):
    """First on this server: tokenizing the prompt would add ~360 MB to a fresh process."""
    spec = _small()
    spec["invokes"]["a"]["prompt"] = "The quick brown fox jumps over the lazy dog. " * 42_000
    served.reset_peak()
    before = served.rss_mb()
    response = submit(served.url, spec, ALICE)
    after = served.rss_mb()
    assert response.status_code == 413, response.text
    body = _error(response)
    assert "prompt bytes (invokes.a.prompt)" in body.message
    assert (body.estimate, body.limit) == (len(spec["invokes"]["a"]["prompt"]), 65_536)
    assert after["VmHWM"] - before["VmRSS"] < 50, (before, after)


def test_one_key_s_large_specs_do_not_hold_every_intake_slot(served):
    """Two 16k-invoke specs from one key, then a 1-invoke spec from another: the other key is
    answered at once, not after the large specs compiled."""
    big, done = _many_invokes(16_000), {}

    def post(name, spec, headers):
        started = time.perf_counter()
        response = submit(served.url, spec, headers)
        done[name] = (response, time.perf_counter() - started, time.perf_counter())

    threads = [threading.Thread(target=post, args=(f"a{i}", big, ALICE)) for i in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # both bodies are in: the large specs hold the intake
    post("b", _small(), BOB)
    for thread in threads:
        thread.join(120)
    response, seconds, finished = done["b"]
    assert response.status_code == 202, response.text
    assert seconds < 2.0, seconds
    assert [done[f"a{i}"][0].status_code for i in range(2)] == [202, 202]
    assert finished < max(done["a0"][2], done["a1"][2])  # ahead of one key's second spec
    for i in range(2):  # spare the CPU the two 16k-row runs
        job = done[f"a{i}"][0].json()["id"]
        httpx.delete(f"{served.url}/v1/jobs/{job}", headers=ALICE, timeout=30)


@pytest.mark.parametrize("template", ["{p}", "Say {p}{p}{p}"])
def test_a_template_s_bytes_count_the_dataset_s_values(served, template):
    spec = _small()
    spec["dataset"] = {"rows": [{"p": "short"}, {"p": "x" * 30_000}]}
    spec["invokes"]["a"]["prompt"] = template
    response = submit(served.url, spec, ALICE)
    assert response.status_code == 413, response.text
    if template == "{p}":  # 30,000 bytes pass; the tokens they make do not
        assert "prompt tokens" in _error(response).message
        return
    assert "with the dataset's longest values in" in _error(response).message
    assert _error(response).estimate == 4 + 3 * 30_000


def test_the_limits_route_reports_jobs_dataset_files_and_connections(served):
    from specsight.compile.dataset import (
        MAX_DATASET_BYTES,
        MAX_FIELD_CHARS,
        MAX_LINE_BYTES,
        MAX_ROWS,
    )

    assert httpx.get(f"{served.url}/v1/limits").status_code == 401
    response = httpx.get(f"{served.url}/v1/limits", headers=BOB)
    assert response.status_code == 200
    body = response.json()
    assert body["limits"] == {**Limits().model_dump(), "max_result_bytes": 32_000_000}
    assert body["limits"]["max_prompt_bytes"] == 65_536
    assert body["dataset_files"] == {
        "max_rows": MAX_ROWS,
        "max_dataset_bytes": MAX_DATASET_BYTES,
        "max_line_bytes": MAX_LINE_BYTES,
        "max_field_chars": MAX_FIELD_CHARS,
    }
    connections = body["connections"]
    assert connections["header_timeout_s"] == 10.0 and connections["body_timeout_s"] == 30.0
    assert connections["max_connections_per_address"] == 64
    assert connections["max_connections"] >= 8
    assert body["intake"] == {"slots": 2, "slots_per_key": 1, "waiting": 32, "waiting_per_key": 8}
    openapi = httpx.get(f"{served.url}/openapi.json").json()
    assert "/v1/limits" in openapi["paths"]


def test_a_result_estimate_over_the_limit_is_refused_before_running(served):
    ops = [{"op": "save", "site": "lm_head", "positions": "all"}]
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": {"prompt": [CLEAN] * 600, "ops": ops}},  # 600 x 14 x 1,024 floats
    }
    queued = httpx.get(f"{served.url}/readyz").json()["queued"]
    response = submit(served.url, spec, ALICE)
    assert response.status_code == 413, response.text
    body = _error(response)
    assert "estimated result bytes" in body.message
    assert body.estimate > body.limit == 32_000_000
    assert httpx.get(f"{served.url}/readyz").json()["queued"] <= queued  # nothing was queued


def test_the_intake_gives_a_free_slot_to_the_key_served_longest_ago():
    import anyio

    from specsight.remote.fairness import FairIntake, IntakeBusy
    from specsight.remote.protocol import IntakeLimits

    started: list[str] = []
    gates = {name: threading.Event() for name in ("a1", "a2", "a3", "b1", "c1")}

    def work(name: str) -> str:
        started.append(name)
        assert gates[name].wait(10)
        return name

    async def scenario() -> None:
        limits = IntakeLimits(slots=2, slots_per_key=1, waiting=3, waiting_per_key=2)
        intake = FairIntake(limits)

        async def step(key: str, name: str) -> None:
            tasks.start_soon(intake.run, key, work, name)
            await anyio.sleep(0.1)

        async with anyio.create_task_group() as tasks:
            for name in ("a1", "a2", "a3"):
                await step("a", name)
            with pytest.raises(IntakeBusy) as busy:  # a's share of the waiting room is full
                await intake.run("a", work, "a4")
            assert busy.value.per_key
            await step("b", "b1")
            assert started == ["a1", "b1"]  # a's second waits; b takes the free slot
            await step("c", "c1")
            with pytest.raises(IntakeBusy) as busy:  # the waiting room is full
                await intake.run("d", work, "d1")
            assert not busy.value.per_key
            gates["a1"].set()
            await anyio.sleep(0.2)
            assert started == ["a1", "b1", "c1"]  # c was never served: it goes before a2
            gates["b1"].set()
            await anyio.sleep(0.2)
            assert started[-1] == "a2" and intake.waiting == 1
            for gate in gates.values():
                gate.set()
        assert (intake.busy, intake.waiting) == (0, 0)
        assert sorted(started) == ["a1", "a2", "a3", "b1", "c1"]

    anyio.run(scenario)


def test_every_text_of_a_spec_is_checked_by_its_bytes():
    from specsight.remote.admission import LimitError, check_text_bytes

    limits = Limits(max_prompt_bytes=100)
    fine = {"invokes": {"a": {"prompt": "{{" * 60 + "{p}"}}, "dataset": [{"p": "é" * 20}]}
    check_text_bytes(fine, limits)  # 60 braces + 40 bytes
    cases = [
        ({"invokes": {"a": {"prompt": "é" * 51}}}, "invokes.a.prompt", 102),
        ({"metrics": {"m": {"target": [" x", "y" * 101]}}}, "metrics.m.target[1]", 101),
        ({"dataset": {"rows": [{"p": "z" * 101}]}}, "dataset.rows[0].p", 101),
        ({"invokes": {"k" * 101: {}}}, "invokes: a key", 101),
    ]
    for data, where, size in cases:
        with pytest.raises(LimitError) as refused:
            check_text_bytes(data, limits)
        assert f"prompt bytes ({where})" in str(refused.value)
        assert (refused.value.estimate, refused.value.limit) == (size, 100)


_ROWS = [{"clean": CLEAN, "io": " Mary"}, {"clean": CLEAN}]


@pytest.mark.parametrize(
    ("case", "change", "path"),
    [
        ("missing value", {"dataset": {"rows": _ROWS}}, "metrics.p.token"),
        ("null value", {"dataset": {"rows": [{"clean": None, "io": " Mary"}]}}, "invokes.a.prompt"),
        ("lone surrogate", {"dataset": {"rows": [{"clean": "a\ud800", "io": " M"}]}}, "dataset.rows[0].clean"),
        ("nested value", {"dataset": {"rows": [{"clean": [[["x"]]], "io": " M"}]}}, "dataset.rows[0].clean"),
        ("no dataset", {}, "invokes.a.prompt"),
    ],
)  # fmt: skip
def test_dataset_mistakes_are_located_422s(served, case, change, path):
    """What locally exits 2 with a located error is a 422 naming the spec path on the server
    (before: a 422 without a location and a traceback in the server's log, or a run of the
    literal text '{clean}')."""
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": {"prompt": "{clean}"}},
        "metrics": {"p": {"kind": "prob", "invoke": "a", "token": "{io}"}},
        **change,
    }
    response = submit(served.url, spec, ALICE)
    assert response.status_code == 422, (case, response.text)
    body = _error(response)
    assert path in [issue["path"] for issue in body.issues], (case, body.issues)
    assert "Traceback" not in served.tail(20_000)


def test_a_row_nested_ten_thousand_deep_is_a_422_not_a_crash(served):
    deep = "[" * 10_000 + "]" * 10_000
    body = '{"client_version": "t", "spec": {"specsight": 1, "model": "tiny-llama", '
    body += (
        '"dataset": {"rows": [{"clean": ' + deep + '}]}, "invokes": {"a": {"prompt": "{clean}"}}}}'
    )
    response = httpx.post(
        f"{served.url}/v1/jobs", content=body, headers={**ALICE, "content-type": "application/json"}
    )
    assert response.status_code in (400, 422), response.text
    assert _error(response).message
    assert httpx.get(f"{served.url}/healthz").status_code == 200


def test_a_saved_value_of_the_wrong_width_is_refused_at_admission(served):
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {
            "src": {"prompt": CLEAN, "ops": [{"op": "save", "site": "mlp_act.1", "name": "v"}]},
            "dst": {"prompt": CLEAN, "ops": [{"op": "add", "site": "resid_post.1", "vector": {"saved": "v"}}]},
        },
    }  # fmt: skip
    response = submit(served.url, spec, ALICE)
    assert response.status_code == 422, response.text
    (issue,) = _error(response).issues
    assert issue["code"] == "vector-size" and issue["path"] == "invokes.dst.ops[0].vector.saved"
