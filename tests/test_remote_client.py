"""The remote client (``specsight run --remote``): against an in-process fake server built on
the real job runner (``httpx.MockTransport``), and against a real ``specsight serve`` process.

The fake server lets each failure be provoked on purpose: a wrong key, a full queue, a dropped
connection, altered result bytes, an old API version, a failed or cancelled job.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from specsight.api import run as run_local
from specsight.cli import main
from specsight.errors import RunError, SpecError
from specsight.remote import protocol as P
from specsight.remote.client import KEY_HINT, RemoteClient
from specsight.remote.submit import run_remote
from specsight.results import Results

from .conftest import CLEAN, ioi_spec, tiny

ROOT = Path(__file__).resolve().parent.parent
URL = "http://fake.test"
KEY = "secret-key"

#: an IOI patching sweep with a save and several metrics
IOI_SPEC: dict[str, Any] = ioi_spec(
    name="ioi-remote",
    sweep={"layer": "all", "pos": [0, 9, 13]},
    baseline="baseline",
    recovery="recovery",
    clean_ops=[{"op": "save", "site": "resid_post.1", "name": "clean_rp1"}],
    metrics={
        "p_mary": {"kind": "prob", "invoke": "clean", "token": " Mary"},
        "top": {"kind": "top_k", "invoke": "clean", "k": 3},
    },
)

#: an unknown op on line 7, column 9 (caught locally, before anything is sent)
BAD_SPEC = """\
specsight: 1
model: tiny-llama
invokes:
  a:
    prompt: "hello there"
    ops:
      - {op: zeroo, site: resid_post.1}
"""


def write_spec(folder: Path, data: dict[str, Any], name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the fake server


class FakeServer:
    """The wire protocol over the real runner, answering in process; faults on request."""

    def __init__(self, *, limits: P.Limits | None = None):
        self.model = tiny("tiny-llama")
        self.limits = limits or P.Limits()
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        self.api_version = P.API_VERSION
        self.queue_full = 0  # answer 429 this many times
        self.drop_posts = 0  # raise a connection error on this many POSTs (after storing the job)
        self.tamper: str | None = None  # "bytes", "header" or "manifest"
        self.final_state = "succeeded"
        self.polls_before_done = 2

    def client(self, key: str | None = KEY, **kwargs: Any) -> RemoteClient:
        client = RemoteClient(URL, key, transport=httpx.MockTransport(self.handle), **kwargs)
        client._sleep = lambda s: None
        return client

    def posts(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "POST"]

    @staticmethod
    def _answer(code: int, body: Any, **headers: str) -> httpx.Response:
        if isinstance(body, P.ErrorBody | P.JobStatus | P.ModelsResponse):
            body = body.model_dump(mode="json")
        return httpx.Response(code, json=body, headers=headers)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get(P.API_KEY_HEADER) != KEY:
            return self._answer(401, P.ErrorBody(error="unauthorized", message="bad key"))
        path, method = request.url.path, request.method
        if path == "/v1/models":
            entry = P.ModelEntry(
                id="tiny-llama",
                info=self.model.info.to_dict(),
                dtype="float32",
                device="cpu",
                weights_sha256=self.model.weights_sha256,
                ops=[],
                metrics=[],
                canonical_sites=[],
            )
            body = P.ModelsResponse(
                server_version="0.1.0", spec_version=1, limits=self.limits, models=[entry]
            ).model_dump(mode="json")
            body["api_version"] = self.api_version
            return self._answer(200, body)
        if path == "/v1/models/tiny-llama/tokenizer":
            return httpx.Response(200, text=self.model.tokenizer.backend.to_str())
        if path == "/v1/jobs" and method == "POST":
            return self._submit(request)
        job_id = path.split("/")[3]
        job = self.jobs.get(job_id)
        if job is None:
            return self._answer(404, P.ErrorBody(error="not-found", message="no such job"))
        if method == "DELETE":
            if job["status"].state not in P.TERMINAL_STATES:
                job["status"] = job["status"].model_copy(update={"state": "cancelled"})
            return self._answer(200, job["status"])
        if path.endswith("/result"):
            data = job["data"]
            digest = hashlib.sha256(data).hexdigest()
            if self.tamper == "bytes":
                data = data[:-1] + bytes([data[-1] ^ 1])
            if self.tamper == "header":
                digest = "0" * 64
            return httpx.Response(200, content=data, headers={P.SHA256_HEADER: digest})
        if path.endswith("/manifest"):
            manifest = json.loads(json.dumps(job["manifest"]))
            if self.tamper == "manifest":
                manifest["tensors"]["ld"]["sha256"] = "0" * 64
            return self._answer(200, manifest)
        return self._poll(job)

    def _submit(self, request: httpx.Request) -> httpx.Response:
        from specsight.remote.admission import LimitError, prepare_job
        from specsight.remote.batching import run_jobs

        if self.queue_full:
            self.queue_full -= 1
            body = P.ErrorBody(error="queue-full", message="the queue is full")
            return self._answer(429, body, **{"Retry-After": "2"})
        key = request.headers.get(P.IDEMPOTENCY_HEADER)
        for job in self.jobs.values():
            if key and job["key"] == key:
                return self._answer(200, job["status"])
        submitted = P.SubmitRequest.model_validate_json(request.content)
        try:
            prepared = prepare_job(
                submitted.spec, self.model, self.limits, spec_file=submitted.spec_file
            )
        except SpecError as exc:
            issues = [i.to_dict() for i in exc.issues]
            body = P.ErrorBody(error="invalid-spec", message=str(exc), issues=issues)
            return self._answer(422, body)
        except LimitError as exc:
            return self._answer(413, P.ErrorBody(**exc.to_dict()))
        (results,) = run_jobs([prepared], self.model)
        with tempfile.TemporaryDirectory() as folder:
            results.save(folder, plots=False)
            data = (Path(folder) / "results.safetensors").read_bytes()
            manifest = json.loads((Path(folder) / "manifest.json").read_text())
        job_id = f"job{len(self.jobs)}"
        status = P.JobStatus(
            id=job_id, state="queued", model="tiny-llama", queue_position=0, created=time.time()
        )
        self.jobs[job_id] = {
            "key": key,
            "status": status,
            "polls": 0,
            "data": data,
            "manifest": manifest,
            "spec": submitted.spec,
            "rows": len(prepared.plan.rows),
        }
        if self.drop_posts:
            self.drop_posts -= 1
            raise httpx.ReadError("connection reset", request=request)
        return self._answer(202, status)

    def _poll(self, job: dict[str, Any]) -> httpx.Response:
        job["polls"] += 1
        status: P.JobStatus = job["status"]
        if status.state in P.TERMINAL_STATES:
            return self._answer(200, status)
        rows = job["rows"]
        if job["polls"] < self.polls_before_done:
            update = {
                "state": "running",
                "queue_position": None,
                "progress": {"done": 1, "total": rows},
            }
        elif self.final_state == "succeeded":
            digest = hashlib.sha256(job["data"]).hexdigest()
            update = {"state": "succeeded", "result_sha256": digest}
            update["progress"] = {"done": rows, "total": rows}
        elif self.final_state == "failed":
            error = P.ErrorBody(error="run-failed", message="CUDA out of memory", hint="retry")
            update = {"state": "failed", "error": error}
        else:
            update = {"state": self.final_state}
        job["status"] = P.JobStatus.model_validate({**status.model_dump(), **update})
        return self._answer(200, job["status"])


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


def assert_same_tensors(a: Results, b: Results) -> None:
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert torch.equal(a[name], b[name]) or (
            a[name].isnan().any()
            and torch.allclose(a[name], b[name], rtol=0, atol=0, equal_nan=True)
        ), name


# --------------------------------------------------------------------------- against the fake


def test_remote_run_matches_local_run(fake, tmp_path):
    spec = write_spec(tmp_path, IOI_SPEC)
    statuses: list[P.JobStatus] = []
    with fake.client() as client:
        remote = run_remote(
            spec, URL, client=client, out=tmp_path / "remote", progress=statuses.append
        )
    local = run_local(spec, out=tmp_path / "local")
    assert_same_tensors(remote, local)
    assert remote.axes("ld") == local.axes("ld") == ["layer", "pos"]
    assert remote.next_tokens == local.next_tokens
    assert remote.manifest["remote"]["job_id"] == "job0"
    same = (tmp_path / "remote/results.safetensors").read_bytes()
    assert same == (tmp_path / "local/results.safetensors").read_bytes()
    assert (tmp_path / "remote/manifest.json").exists()
    assert sorted(p.name for p in (tmp_path / "remote").glob("*.png")) == sorted(
        p.name for p in (tmp_path / "local").glob("*.png")
    )
    assert [s.state for s in statuses] == ["running", "succeeded"]
    # the file name travels for error messages; the key header on every request
    assert json.loads(fake.posts()[0].content)["spec_file"] == str(spec)
    assert all(r.headers[P.API_KEY_HEADER] == KEY for r in fake.requests)


def test_file_vectors_are_inlined_before_submitting(fake, tmp_path):
    d_model = fake.model.info.d_model
    np.save(tmp_path / "steer.npy", np.linspace(-1, 1, d_model))
    data = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {
            "a": {
                "prompt": CLEAN,
                "ops": [{"op": "add", "site": "resid_post.1", "vector": {"file": "steer.npy"}}],
            }
        },
        "metrics": {
            "ld": {"kind": "logit_diff", "invoke": "a", "target": " Mary", "foil": " John"}
        },
    }
    spec = write_spec(tmp_path, data)
    with fake.client() as client:
        remote = run_remote(spec, URL, client=client)
    assert_same_tensors(remote, run_local(spec))
    sent = json.loads(fake.posts()[0].content)["spec"]
    vector = sent["invokes"]["a"]["ops"][0]["vector"]
    assert vector == np.linspace(-1, 1, d_model).tolist()


def test_missing_vector_file_is_located_locally(fake, tmp_path):
    data = yaml.safe_load(BAD_SPEC.replace("zeroo", "add"))
    data["invokes"]["a"]["ops"][0]["vector"] = {"file": "nope.npy"}
    spec = write_spec(tmp_path, data)
    with fake.client() as client, pytest.raises(SpecError) as err:
        run_remote(spec, URL, client=client)
    assert f"{spec}:" in str(err.value) and "nope.npy" in str(err.value)
    assert not fake.posts()


def test_bad_spec_fails_locally_with_position(fake, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(BAD_SPEC)
    with fake.client() as client, pytest.raises(SpecError) as err:
        run_remote(spec, URL, client=client)
    assert f"{spec}:7:" in str(err.value)
    assert not fake.requests  # validation needs no server


def test_server_spec_issues_are_located_in_the_local_file(fake, tmp_path, monkeypatch):
    spec = write_spec(tmp_path, IOI_SPEC)
    issue = {"code": "nope", "message": "the server objects", "path": "", "line": None}
    issue["path_parts"] = ["invokes", "corrupt", "ops", 0, "site"]
    body = P.ErrorBody(error="invalid-spec", message="invalid", issues=[issue])
    monkeypatch.setattr(FakeServer, "_submit", lambda self, r: self._answer(422, body))
    with fake.client() as client, pytest.raises(SpecError) as err:
        run_remote(spec, URL, client=client)
    text = spec.read_text().splitlines()
    line = next(i for i, t in enumerate(text, 1) if "resid_post.{layer}" in t)
    assert f"{spec}:{line}:" in str(err.value)
    assert "invokes.corrupt.ops[0].site: the server objects" in str(err.value)


def test_wrong_key(fake, tmp_path):
    spec = write_spec(tmp_path, IOI_SPEC)
    with fake.client("wrong") as client, pytest.raises(RunError) as err:
        run_remote(spec, URL, client=client)
    assert "refused the API key" in str(err.value) and KEY_HINT in str(err.value)
    with fake.client(None) as client, pytest.raises(RunError, match="needs an API key"):
        client.models()


def test_limit_exceeded_shows_estimate_limit_and_hint(tmp_path):
    fake = FakeServer(limits=P.Limits(max_rows=3))
    spec = write_spec(tmp_path, IOI_SPEC)
    with fake.client() as client, pytest.raises(RunError) as err:
        run_remote(spec, URL, client=client)
    message = str(err.value)
    assert "too large" in message and "batch rows" in message
    assert "limit of 3" in message and "split the spec" in message


def test_full_queue_is_retried_then_fails(fake, tmp_path):
    spec = write_spec(tmp_path, IOI_SPEC)
    fake.queue_full = 2
    slept: list[float] = []
    with fake.client() as client:
        client._sleep = slept.append
        run_remote(spec, URL, client=client)
    assert slept[:2] == [2.0, 2.0] and len(fake.jobs) == 1
    fake.queue_full = 100
    with fake.client(queue_retries=3) as client, pytest.raises(RunError) as err:
        run_remote(spec, URL, client=client)
    assert "still busy after 4 tries: the queue is full" in str(err.value)


def test_submit_retry_reuses_the_idempotency_key(fake, tmp_path):
    spec = write_spec(tmp_path, IOI_SPEC)
    fake.drop_posts = 1
    with fake.client() as client:
        results = run_remote(spec, URL, client=client)
    keys = {r.headers[P.IDEMPOTENCY_HEADER] for r in fake.posts()}
    assert len(fake.posts()) == 2 and len(keys) == 1 and len(fake.jobs) == 1
    assert "ld" in results


def test_server_down_is_a_clear_message():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    client = RemoteClient(f"http://127.0.0.1:{port}", KEY, timeout=5)
    client._sleep = lambda s: None
    with client, pytest.raises(RunError) as err:
        client.models()
    assert f"cannot reach http://127.0.0.1:{port}: is `specsight serve` running?" in str(err.value)


def test_api_version_mismatch(fake):
    fake.api_version = 2
    with fake.client() as client, pytest.raises(RunError, match="speaks API version 2"):
        client.models()


def test_unknown_model_lists_the_servers_models(fake):
    with fake.client() as client, pytest.raises(RunError) as err:
        client.model_entry("gpt-5")
    assert "does not run model 'gpt-5'" in str(err.value) and "tiny-llama" in str(err.value)


@pytest.mark.parametrize("tamper", ["bytes", "header", "manifest"])
def test_checksum_mismatch_is_detected(fake, tmp_path, tamper):
    spec = write_spec(tmp_path, IOI_SPEC)
    fake.tamper = tamper
    with fake.client() as client, pytest.raises(RunError) as err:
        run_remote(spec, URL, client=client, out=tmp_path / "out")
    assert "corrupt" in str(err.value) or "does not match its sha256" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_failed_and_cancelled_jobs(fake, tmp_path):
    spec = write_spec(tmp_path, IOI_SPEC)
    fake.final_state = "failed"
    with fake.client() as client, pytest.raises(RunError) as err:
        run_remote(spec, URL, client=client)
    assert str(err.value) == "remote job job0 failed: CUDA out of memory (retry)"
    fake.final_state = "cancelled"
    with fake.client() as client, pytest.raises(RunError, match="was cancelled"):
        run_remote(spec, URL, client=client)


def test_interrupt_cancels_the_remote_job(fake, tmp_path):
    spec = write_spec(tmp_path, IOI_SPEC)

    def interrupt(status: P.JobStatus) -> None:
        raise KeyboardInterrupt

    with fake.client() as client, pytest.raises(KeyboardInterrupt, match="cancelled remote job"):
        run_remote(spec, URL, client=client, progress=interrupt)
    assert [r.method for r in fake.requests][-1] == "DELETE"
    assert fake.jobs["job0"]["status"].state == "cancelled"


def test_wait_timeout_cancels(fake, tmp_path):
    spec = write_spec(tmp_path, IOI_SPEC)
    fake.polls_before_done = 10**9
    with fake.client() as client, pytest.raises(RunError, match="did not finish within"):
        run_remote(spec, URL, client=client, timeout=0.05, poll=0.01)
    assert fake.jobs["job0"]["status"].state == "cancelled"


def test_cli_remote_run_against_the_fake(fake, tmp_path, monkeypatch):
    spec = write_spec(tmp_path, IOI_SPEC)
    original = RemoteClient.__init__

    def init(self, url, api_key=None, **kwargs):
        original(self, url, api_key, transport=httpx.MockTransport(fake.handle))

    monkeypatch.setattr(RemoteClient, "__init__", init)
    monkeypatch.setenv("SPECSIGHT_API_KEY", KEY)
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(spec), "--remote", URL, "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    local = runner.invoke(main, ["run", str(spec), "--out", str(tmp_path / "l")])
    # the same summary (but for the timing on the first line) and the same files
    assert result.stdout.splitlines()[1:-1] == local.stdout.splitlines()[1:-1]
    assert result.stdout.splitlines()[0].split(",")[0] == local.stdout.splitlines()[0].split(",")[0]
    assert sorted(os.listdir(tmp_path / "o")) == sorted(os.listdir(tmp_path / "l"))
    result = runner.invoke(main, ["run", str(spec), "--remote", URL, "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"] is True
    result = runner.invoke(main, ["run", str(spec), "--remote", URL, "--api-key", "bad"])
    assert result.exit_code == 1 and KEY_HINT in result.stderr and "Traceback" not in result.output
    result = runner.invoke(main, ["run", str(spec), "--remote", URL, "--device", "cpu"])
    assert result.exit_code == 2


def test_cli_ctrl_c_cancels_the_job_and_exits_130(fake, tmp_path, monkeypatch):
    spec = write_spec(tmp_path, IOI_SPEC)
    original = RemoteClient.__init__

    def init(self, url, api_key=None, **kwargs):
        original(self, url, api_key, transport=httpx.MockTransport(fake.handle))

    def interrupted(self, job_id, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RemoteClient, "__init__", init)
    monkeypatch.setattr(RemoteClient, "wait", interrupted)
    args = ["run", str(spec), "--remote", URL, "--api-key", KEY]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130
    assert "cancelled remote job job0" in result.stderr
    assert fake.jobs["job0"]["status"].state == "cancelled"


# --------------------------------------------------------------------------- the real app


@pytest.fixture
def app_client(tmp_path, request):
    """The real server app (create_app, its worker running) behind FastAPI's TestClient."""
    from fastapi.testclient import TestClient

    from specsight.remote.auth import KeyRing
    from specsight.remote.jobs import JobStore
    from specsight.remote.server import create_app

    limits = getattr(request, "param", None) or P.Limits()
    store = JobStore(tmp_path / "jobs.db")
    keys = KeyRing.from_raw_keys({"tester": KEY})
    models = {"tiny-llama": tiny("tiny-llama")}
    app = create_app(models, store=store, keys=keys, limits=limits, start_worker=False)
    try:
        with TestClient(app, base_url="http://testserver") as http:
            client = RemoteClient("http://testserver", KEY, client=http)
            client.start_worker = app.state.server.worker.start  # type: ignore[attr-defined]
            if "batched" not in request.node.name:  # those start it once their jobs queued
                client.start_worker()
            yield client
    finally:
        store.close()


def test_app_remote_run_matches_local_run(app_client, tmp_path):
    spec = write_spec(tmp_path, IOI_SPEC)
    remote = run_remote(spec, "", client=app_client, out=tmp_path / "r", timeout=120)
    local = run_local(spec, out=tmp_path / "l")
    assert_same_tensors(remote, local)
    assert (tmp_path / "r/results.safetensors").read_bytes() == (
        tmp_path / "l/results.safetensors"
    ).read_bytes()
    assert remote.next_tokens == local.next_tokens


def _batched_runs(app_client, tmp_path) -> list[tuple[Results, Results]]:
    """Two jobs queued before the worker starts (so run together in shared forwards), each
    with its local run."""
    second = json.loads(json.dumps(IOI_SPEC))
    second["invokes"]["clean"]["prompt"] = "When Anna and Bob went to the park, Bob gave a ball to"
    specs = [write_spec(tmp_path, IOI_SPEC, "a.yaml"), write_spec(tmp_path, second, "b.yaml")]
    jobs = [app_client.submit(yaml.safe_load(p.read_text()), spec_file=str(p)) for p in specs]
    assert [job.queue_position for job in jobs] == [0, 1]
    app_client.start_worker()
    pairs = []
    for path, job in zip(specs, jobs):
        final = app_client.wait(job.id, timeout=120)
        assert final.state == "succeeded", final.error
        remote = app_client.fetch(job.id)
        assert remote.manifest["timings"]["batched_jobs"] == 2
        pairs.append((remote, run_local(path)))
    return pairs


def test_app_batched_jobs_match_local_runs(app_client, tmp_path):
    """Jobs batched together on the server give each job's local results (to float rounding)."""
    for remote, local in _batched_runs(app_client, tmp_path):
        assert set(remote.tensors) == set(local.tensors)
        for name, tensor in local.tensors.items():
            assert torch.allclose(remote[name], tensor, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("app_client", [P.Limits(max_cells=5)], indirect=True)
def test_app_limit_exceeded(app_client, tmp_path):
    spec = write_spec(tmp_path, IOI_SPEC)
    with pytest.raises(RunError) as err:
        run_remote(spec, "", client=app_client)
    message = str(err.value)
    assert message.startswith("the job is too large for the server: sweep cells: 14 exceeds")
    assert "limit of 5" in message and "split the sweep" in message


def test_app_wrong_key_and_unknown_job(app_client):
    app_client.api_key = "wrong"
    with pytest.raises(RunError, match="refused the API key"):
        app_client.status("nope")
    app_client.api_key = KEY
    with pytest.raises(RunError, match="404|not found|unknown|no job"):
        app_client.status("nope")


# --------------------------------------------------------------------------- a real server process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``specsight serve --model tiny-llama`` in a subprocess on a free port; yields
    (url, key). Always stopped, however the tests end."""
    folder = tmp_path_factory.mktemp("serve")
    key = "integration-key"
    (folder / "keys").write_text(f"tester:{hashlib.sha256(key.encode()).hexdigest()}\n")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", "from specsight.cli import main; main()", "serve"]
    command += ["--model", "tiny-llama", "--device", "cpu", "--port", str(port)]
    command += ["--db", str(folder / "jobs.db"), "--keys", str(folder / "keys")]
    log_path = folder / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail("the server exited:\n" + log_path.read_text()[-3000:])
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server was not ready in 120 s:\n" + log_path.read_text()[-3000:])
            time.sleep(0.2)
        yield url, key
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def bounded_wait(monkeypatch):
    """Every wait for a job (the CLI's too) gives up after 120 s: a test never hangs."""
    original = RemoteClient.wait

    def wait(self, job_id, **kwargs):
        return original(self, job_id, **{**kwargs, "timeout": 120})

    monkeypatch.setattr(RemoteClient, "wait", wait)


def test_real_server_matches_local_run(server, tmp_path, bounded_wait):
    url, key = server
    spec = write_spec(tmp_path, IOI_SPEC)
    remote = run_remote(spec, url, api_key=key, out=tmp_path / "remote", timeout=120)
    local = run_local(spec, out=tmp_path / "local")
    assert_same_tensors(remote, local)
    for name in remote.tensors:
        expected = local.manifest["tensors"][name]["sha256"]
        assert remote.manifest["tensors"][name]["sha256"] == expected
    remote_bytes = (tmp_path / "remote/results.safetensors").read_bytes()
    assert remote_bytes == (tmp_path / "local/results.safetensors").read_bytes()
    assert Results.load(tmp_path / "remote").manifest["remote"]["url"] == url


def test_real_server_cli(server, tmp_path, bounded_wait):
    url, key = server
    spec = write_spec(tmp_path, IOI_SPEC)
    runner = CliRunner()
    args = ["run", str(spec), "--remote", url, "--api-key", key, "--out", str(tmp_path / "r")]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    local = runner.invoke(main, ["run", str(spec), "--out", str(tmp_path / "l")])
    assert local.exit_code == 0
    assert result.stdout.splitlines()[1:-1] == local.stdout.splitlines()[1:-1]
    remote_bytes = (tmp_path / "r/results.safetensors").read_bytes()
    assert remote_bytes == (tmp_path / "l/results.safetensors").read_bytes()
    assert sorted(os.listdir(tmp_path / "r")) == sorted(os.listdir(tmp_path / "l"))
    # the key from the environment; JSON output
    result = runner.invoke(
        main, ["run", str(spec), "--remote", url, "--json"], env={"SPECSIGHT_API_KEY": key}
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"] is True
    # a wrong key: exit 1 with the message, no traceback
    result = runner.invoke(main, ["run", str(spec), "--remote", url, "--api-key", "wrong"])
    assert result.exit_code == 1 and KEY_HINT in result.stderr
    assert "Traceback" not in result.output
    # a bad spec: exit 2, located in the local file
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_SPEC)
    result = runner.invoke(main, ["run", str(bad), "--remote", url, "--api-key", key])
    assert result.exit_code == 2 and f"{bad}:7:" in result.stderr


def test_server_down_cli(tmp_path):
    spec = write_spec(tmp_path, IOI_SPEC)
    url = f"http://127.0.0.1:{_free_port()}"
    result = CliRunner().invoke(main, ["run", str(spec), "--remote", url, "--api-key", "k"])
    assert result.exit_code == 1
    assert f"cannot reach {url}: is `specsight serve` running?" in result.stderr
    assert "Traceback" not in result.output
