"""Serving on a Ray cluster (``specsight serve --ray``), started by the test on loopback: a
local Ray instance (2 CPUs), 2 replicas of ``tiny-llama`` as a Ray Serve deployment, the
PostgreSQL job store from tests/postgres.py, and the ingress (the same FastAPI app as a single
server) on a free port in this process.

- A 420-cell sweep is split over the 2 replicas and equals a local run of the same spec bit for
  bit (both with one torch thread: the replicas get one CPU each).
- The load test: 200 jobs from 8 client threads in 5 rounds; in each round one replica's
  process is killed (SIGKILL) mid-run, a sharded sweep among the jobs. Every job answered 202
  ends succeeded, once (one job per Idempotency-Key, at most 3 starts), every result's sha256
  checks, each sweep equals its local run bit for bit and each small job its local run up to
  float rounding (it shared forwards with other jobs), and the replica failure shows in
  ``/readyz`` and ``/metrics`` while Ray Serve replaces the replica.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import threading
import time
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors

from specsight.remote.protocol import SHA256_HEADER
from specsight.version import __version__
from tests.conftest import CLEAN, CORRUPT, ioi_spec

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="the 'cluster' extra (Ray Serve) is not installed")

KEY = "cluster-key"
HEADERS = {"X-API-Key": KEY}
SEED = 20261129
ROUNDS = 5
JOBS_PER_ROUND = 40
CLIENTS = 8


def big_sweep() -> dict[str, Any]:
    """3 layers x 14 positions x 10 factors = 420 cells: patch the clean residual stream in,
    then scale the last MLP."""
    factors = [round(0.5 + i / 10, 2) for i in range(10)]
    scale = {"op": "scale", "site": "mlp_out.3", "factor": "{f}"}
    spec = ioi_spec(sweep={"layer": [0, 1, 2], "pos": "all", "f": factors}, ops=[scale])
    spec["metrics"]["top"] = {"kind": "top_k", "invoke": "corrupt", "k": 3}
    return spec


def small_spec(factor: float) -> dict[str, Any]:
    ops = [{"op": "scale", "site": "mlp_out.1", "factor": factor}]
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": {"prompt": CLEAN, "ops": ops}, "b": {"prompt": CORRUPT}},
        "metrics": {"p": {"kind": "prob", "invoke": "a", "token": " Mary"}},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(postgres_server, tmp_path_factory):
    """Ray (2 CPUs), 2 replicas of tiny-llama, the ingress on a free loopback port."""
    import uvicorn
    from ray import serve

    from specsight.remote.auth import KeyRing, hash_key
    from specsight.remote.cluster import DeployConfig
    from specsight.remote.cluster.deploy import deploy_models
    from specsight.remote.jobs import open_job_store
    from specsight.remote.serve import server_config
    from specsight.remote.server import create_app

    folder = tmp_path_factory.mktemp("ray")
    with postgres_server.database() as url:
        ray.init(
            num_cpus=2, include_dashboard=False, _temp_dir=str(folder), log_to_driver=False,
            object_store_memory=256 << 20,  # a container's /dev/shm may be small
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        )  # fmt: skip
        config = DeployConfig(
            db=url,
            models=[
                {
                    "id": "tiny-llama",
                    "replicas": 2,
                    "num_cpus": 1,
                    "shard_rows": 200,
                    "batch_jobs": 8,
                }
            ],  # fmt: skip
            grace_s=5,
        )
        store = open_job_store(url)
        deployed = deploy_models(config)
        try:
            keys = KeyRing.parse(f"tester:{hash_key(KEY)}")
            app = create_app(
                deployed.models(), store=store, keys=keys, limits=config.limits,
                start_worker=False, notify=deployed.wake,
                replica_states=deployed.replica_states,
            )  # fmt: skip
            port = _free_port()
            server = uvicorn.Server(server_config(app, host="127.0.0.1", port=port))
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            base = f"http://127.0.0.1:{port}"
            _wait_ready(base)
            yield {"url": base, "deployed": deployed, "store": store, "db": url}
            server.should_exit = True
            thread.join(30)
        finally:
            deployed.delete()
            serve.shutdown()
            ray.shutdown()
            store.close()


def _wait_ready(base: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError("the ingress never became ready")


def _submit(base: str, spec: dict[str, Any], key: str) -> str:
    headers = {**HEADERS, "Idempotency-Key": key}
    for _ in range(200):
        r = httpx.post(
            f"{base}/v1/jobs",
            json={"spec": spec, "client_version": __version__},
            headers=headers,
            timeout=60,
        )
        if r.status_code in (200, 202):
            return r.json()["id"]
        assert r.status_code in (429, 503), r.text
        time.sleep(float(r.headers.get("Retry-After", "0.5")))
    raise AssertionError("the queue never took the job")


def _wait(base: str, job_id: str, timeout: float = 300) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = httpx.get(f"{base}/v1/jobs/{job_id}", headers=HEADERS, timeout=30).json()
        if status["state"] in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never ended")


def _result(base: str, job_id: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    r = httpx.get(f"{base}/v1/jobs/{job_id}/result", headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    assert hashlib.sha256(r.content).hexdigest() == r.headers[SHA256_HEADER]
    manifest = httpx.get(f"{base}/v1/jobs/{job_id}/manifest", headers=HEADERS, timeout=60)
    return load_safetensors(r.content), manifest.json()


@pytest.fixture(scope="module")
def local():
    """Local runs of a spec with one torch thread, as each replica runs."""
    import specsight

    def run(spec: dict[str, Any]) -> dict[str, torch.Tensor]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return dict(specsight.run(spec).tensors)
        finally:
            torch.set_num_threads(threads)

    return run


def _assert_equal(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], exact: bool = True
) -> None:
    """Bit for bit; or (``exact=False``: a job that shared forwards with other jobs) up to
    float rounding."""
    assert set(got) == set(want)
    for name, tensor in want.items():
        if exact:
            assert torch.equal(got[name], tensor.cpu()), name
        else:
            torch.testing.assert_close(got[name], tensor.cpu(), rtol=1e-5, atol=1e-6)


def test_sharded_sweep_equals_the_local_run(cluster, local):
    spec = big_sweep()
    job = _submit(cluster["url"], spec, "sharded-sweep")
    assert _wait(cluster["url"], job)["state"] == "succeeded"
    tensors, manifest = _result(cluster["url"], job)
    assert manifest["timings"]["shards"] == 2.0
    assert tensors["ld"].shape[:3] == (3, 14, 10)
    _assert_equal(tensors, local(spec))


def _wait_running(base: str, replicas: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready = httpx.get(f"{base}/readyz", timeout=10).json()
        if ready.get("replicas", {}).get("tiny-llama", {}).get("RUNNING") == replicas:
            time.sleep(1.1)  # the replicas' view of Ray Serve's status is at most 1 s old
            return
        time.sleep(0.2)
    raise AssertionError(f"{replicas} replicas never ran")


def _replica_pids(deployed) -> set[int]:
    handle = deployed.handles["tiny-llama"]
    return {handle.describe.remote().result(timeout_s=60)["pid"] for _ in range(12)}


def test_load_with_a_replica_killed_each_round(cluster, local):
    base, deployed = cluster["url"], cluster["deployed"]
    rng = random.Random(SEED)
    factors = {f"job-{i}": round(0.2 + (i % 17) / 10, 2) for i in range(ROUNDS * JOBS_PER_ROUND)}
    expected = {f: local(small_spec(f)) for f in sorted(set(factors.values()))}
    sweep_want = local(big_sweep())
    answered: dict[str, str] = {}
    lock = threading.Lock()
    saw_degraded = False
    for round_ in range(ROUNDS):
        keys = list(factors)[round_ * JOBS_PER_ROUND : (round_ + 1) * JOBS_PER_ROUND]
        _wait_running(base, 2)  # Ray Serve replaced the replica killed last round
        sweep_key = f"sweep-{round_}"
        answered[sweep_key] = _submit(base, big_sweep(), sweep_key)
        victims = sorted(_replica_pids(deployed))

        def client(part: list[str]) -> None:
            for key in part:
                job = _submit(base, small_spec(factors[key]), key)
                with lock:
                    answered[key] = job

        threads = [
            threading.Thread(target=client, args=(keys[i::CLIENTS],)) for i in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.2, 1.5))
        os.kill(rng.choice(victims), signal.SIGKILL)
        for t in threads:
            t.join(120)
        end = time.monotonic() + 20
        while time.monotonic() < end and not saw_degraded:
            ready = httpx.get(f"{base}/readyz", timeout=10).json()
            metrics = httpx.get(f"{base}/metrics", timeout=10).text
            running = ready.get("replicas", {}).get("tiny-llama", {}).get("RUNNING")
            if running is not None and running < 2:
                assert 'specsight_replicas{model="tiny-llama",state="RUNNING"} 1.0' in metrics
                saw_degraded = True
            time.sleep(0.1)
        for key in [*keys, sweep_key]:
            status = _wait(base, answered[key])
            assert status["state"] == "succeeded", (key, status)
    assert saw_degraded, "no replica failure was ever visible in /readyz"
    split = 0
    for key, job in answered.items():
        tensors, manifest = _result(base, job)
        if key.startswith("sweep"):  # split across the replicas (or, while only one replica
            # ran, in one process), alone: bit for bit
            if manifest["timings"].get("shards") == 2.0:
                split += 1
            else:  # its replica was killed under it, and it ran again while one replica ran
                assert cluster["store"].record(job).attempts >= 2, key
            _assert_equal(tensors, sweep_want)
        else:
            _assert_equal(tensors, expected[factors[key]], exact=False)
    print(f"\ncluster load: {len(answered)} jobs, {ROUNDS} replicas killed, {split} of "
          f"{ROUNDS} sweeps split across 2 replicas")  # fmt: skip
    assert split >= 1, "no sweep was split across the replicas"
    _assert_store_records(cluster["db"], answered)
    ready = httpx.get(f"{base}/readyz", timeout=10)
    assert ready.status_code == 200


def _assert_store_records(url: str, answered: dict[str, str]) -> None:
    """One job per key, at most 3 starts, a result for exactly the succeeded jobs."""
    import psycopg

    with psycopg.connect(url) as con:
        rows = con.execute(
            "SELECT id, idempotency_key, state, attempts, result_sha256 FROM jobs"
            " WHERE idempotency_key IS NOT NULL"
        ).fetchall()
        stored = dict(con.execute("SELECT job_id, sha256 FROM results").fetchall())
    by_key: dict[str, list[str]] = {}
    for job, key, state, attempts, sha in rows:
        by_key.setdefault(key, []).append(job)
        assert 1 <= attempts <= 3, (job, attempts)
        assert (state == "succeeded") == (job in stored)
        if job in stored:
            assert stored[job] == sha
    missing = set(answered) - set(by_key)
    assert not missing
    assert all(len(jobs) == 1 for key, jobs in by_key.items() if key in answered)
    assert {k: v[0] for k, v in by_key.items() if k in answered} == answered
