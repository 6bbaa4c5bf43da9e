"""Crash safety of ``specsight serve``: SIGKILL the server at random moments, restart it on
the same job database, and check that no accepted job vanishes or stays stuck.

Each round starts ``specsight serve`` (tiny-llama) on the database kept across rounds, submits
a few jobs concurrently from threads (each with an ``Idempotency-Key``), sleeps a random time
from a seeded RNG (about 0 s: the kill lands while submits are in flight; longer: while a big
sweep runs or its result is written) and sends SIGKILL. After the last round the server starts
once more: every job that was answered 202 must end ``succeeded`` or ``failed`` (a job killed
``max_attempts`` times mid-run fails as ``crashed``), succeeded results must download with
their sha256, and re-submitting any key, answered or not, must give one job, never two.

The rounds (:func:`crash_rounds`) run against any job store through a :class:`JobsDb`: SQLite
here, PostgreSQL in tests/test_postgres_jobs.py. Besides the outcomes, the store's records are
checked: one job per key, at most ``max_attempts`` starts, exactly the succeeded jobs hold a
result and its bytes match the sha256, and no job's run completed more often than it started
(the server logs every completed run).

Only loopback (127.0.0.1) is used; every wait is bounded. The server runs with one torch thread:
the test's own threads share the same few cores, and oversubscribed intra-op threads would make
job times swing by orders of magnitude.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors

from specsight.remote.auth import hash_key
from tests.conftest import CLEAN, CORRUPT

ROOT = Path(__file__).resolve().parent.parent
KEY = "crash-key"
HEADERS = {"X-API-Key": KEY}
ROUNDS = int(os.environ.get("SPECSIGHT_CRASH_ROUNDS", "20"))
SEED = 20261126
READY_TIMEOUT_S = 90.0
DRAIN_TIMEOUT_S = 150.0

SMALL_FACTORS = (0.0, 0.5, 1.5, 2.0)
MAX_ATTEMPTS = 3  # the store's default


class JobsDb(Protocol):
    """A job store's database as the crash test reads it, behind the server's back."""

    arg: str  # what `specsight serve --db` is given

    def running(self) -> list[tuple[str, int]]:
        """(id, attempts) of the jobs left 'running'."""
        ...

    def jobs(self) -> list[tuple[str, str | None, str, str | None, int]]:
        """(id, idempotency_key, state, result_sha256, attempts) of every job."""
        ...

    def results(self) -> dict[str, tuple[str, bytes]]:
        """job id -> (recorded sha256, the stored result's bytes)."""
        ...


@dataclass
class SqliteJobs:
    """The SQLite store: a database file, results in the folder beside it."""

    db: Path

    @property
    def arg(self) -> str:
        return str(self.db)

    def running(self) -> list[tuple[str, int]]:
        with sqlite3.connect(self.db) as con:
            return con.execute("SELECT id, attempts FROM jobs WHERE state='running'").fetchall()

    def jobs(self) -> list[tuple[str, str | None, str, str | None, int]]:
        with sqlite3.connect(self.db) as con:
            q = "SELECT id, idempotency_key, state, result_sha256, attempts FROM jobs"
            return con.execute(q).fetchall()

    def results(self) -> dict[str, tuple[str, bytes]]:
        with sqlite3.connect(self.db) as con:
            shas = dict(con.execute("SELECT job_id, sha256 FROM result_files").fetchall())
        folder = self.db.parent / f"{self.db.name}.results"
        files = {p.name.removesuffix(".safetensors"): p for p in folder.iterdir()}
        assert set(files) == set(shas), "result files the store does not name, or missing"
        return {job: (sha, files[job].read_bytes()) for job, sha in shas.items()}


def small_spec(factor: float) -> dict[str, Any]:
    """One forward: scale an MLP output, read a probability and the top 3 tokens."""
    ops = [{"op": "scale", "site": "mlp_out.1", "factor": factor}]
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": {"prompt": CLEAN, "ops": ops}},
        "metrics": {
            "p": {"kind": "prob", "invoke": "a", "token": " Mary"},
            "top": {"kind": "top_k", "invoke": "a", "k": 3},
        },
    }


def sweep_spec(n_factors: int, repeats: int, save: bool) -> dict[str, Any]:
    """Patching over layer x position x factor on a prompt repeated ``repeats`` times:
    4 x (14 * repeats) x ``n_factors`` cells; with ``save`` every row also returns the last
    layer's residual stream at every position (a result of a few MB: a longer result write)."""
    ops: list[dict[str, Any]] = [
        {"op": "patch", "site": "resid_post.{layer}", "positions": ["{pos}"], "from": "clean"},
        {"op": "scale", "site": "mlp_out.{layer}", "factor": "{f}"},
    ]
    if save:
        ops.append({"op": "save", "site": "resid_post.3", "positions": "all", "name": "rp3"})
    factors = [round(0.5 + i / 10, 2) for i in range(n_factors)]
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {
            "clean": {"prompt": " ".join([CLEAN] * repeats)},
            "corrupt": {
                "prompt": " ".join([CORRUPT] * repeats),
                "sweep": {"layer": "all", "pos": "all", "f": factors},
                "ops": ops,
            },
        },
        "metrics": {
            "ld": {"kind": "logit_diff", "invoke": "corrupt", "target": " Mary", "foil": " John"}
        },
    }


#: name -> spec; jobs of the same name must give the same tensors
SPECS: dict[str, dict[str, Any]] = {
    **{f"small-{f}": small_spec(f) for f in SMALL_FACTORS},
    "big-sweep": sweep_spec(10, 3, save=False),  # 1760 cells
    "big-result": sweep_spec(3, 2, save=True),  # 696 cells, ~3.4 MB of saved activations
}


@dataclass
class Submit:
    """One submit attempt and what came back."""

    key: str
    spec_name: str
    round: int
    code: int | None = None  # None: no response (the server died first)
    job_id: str | None = None
    error: str | None = None


@dataclass
class Tally:
    """What the rounds did, for the final report."""

    submits: list[Submit] = field(default_factory=list)
    mid_run_kills: int = 0  # rounds whose kill found a job running
    jobs_killed_running: int = 0
    round_seconds: list[float] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``specsight serve`` in a subprocess on a fresh loopback port."""

    def __init__(self, folder: Path, log: Path, db: str | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-c", "from specsight.cli import main; main()", "serve"]
        command += ["--model", "tiny-llama", "--device", "cpu", "--port", str(self.port)]
        command += ["--db", db or str(folder / "jobs.sqlite"), "--keys", str(folder / "keys")]
        command += ["--max-queue", "10000", "--max-queue-per-key", "10000", "--grace", "1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        pytest.fail(f"the server was not ready in {timeout} s:\n{self.tail()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _submit(url: str, attempt: Submit) -> None:
    """POST the job; record the status code and id, or that no response came."""
    body = {"spec": SPECS[attempt.spec_name], "client_version": "crash-test"}
    headers = {**HEADERS, "Idempotency-Key": attempt.key}
    try:
        r = httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=15)
    except httpx.TransportError as exc:
        attempt.error = type(exc).__name__
        return
    attempt.code = r.status_code
    if r.status_code in (200, 202):
        attempt.job_id = r.json()["id"]
    else:
        attempt.error = r.text[:300]


def _round(rnd: int, rng: random.Random, folder: Path, log: Path, tally: Tally, db: JobsDb) -> None:
    server = Server(folder, log, db.arg)
    try:
        server.wait_ready()
        started = time.monotonic()
        names = [f"small-{rng.choice(SMALL_FACTORS)}" for _ in range(4)]
        names.insert(rng.randrange(5), "big-sweep" if rnd % 2 == 0 else "big-result")
        attempts = [Submit(f"r{rnd}-j{i}", name, rnd) for i, name in enumerate(names)]
        threads = [
            threading.Thread(target=_submit, args=(server.url, a), daemon=True) for a in attempts
        ]
        for t in threads:
            t.start()
        kind = rng.random()
        if kind < 0.25:  # while the submits are in flight
            delay = 0.0
        elif kind < 0.6:  # just after: the new sweep is likely running
            delay = rng.uniform(0.05, 0.5)
        else:  # later: mid-run, mid-write or idle
            delay = rng.uniform(0.5, 2.5)
        time.sleep(delay)
    finally:
        server.kill()
    for t in threads:
        t.join(timeout=20)
        assert not t.is_alive(), "a submit thread hung after the kill"
    tally.submits += attempts
    running = len(db.running())  # jobs the killed server left 'running': it died mid-run
    tally.jobs_killed_running += running
    tally.mid_run_kills += running > 0
    tally.round_seconds.append(time.monotonic() - started)


def _resubmit(url: str, attempt: Submit) -> tuple[int, str]:
    body = {"spec": SPECS[attempt.spec_name], "client_version": "crash-test"}
    headers = {**HEADERS, "Idempotency-Key": attempt.key}
    r = httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=60)
    assert r.status_code in (200, 202), (attempt, r.status_code, r.text)
    return r.status_code, r.json()["id"]


def _drain(url: str, job_ids: set[str]) -> dict[str, dict[str, Any]]:
    """Poll until every job is terminal (bounded); their final statuses."""
    final: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as client:
        while time.monotonic() < deadline:
            for job_id in sorted(job_ids - set(final)):
                status = client.get(f"/v1/jobs/{job_id}")
                assert status.status_code == 200, (job_id, status.status_code, status.text)
                data = status.json()
                if data["state"] in ("succeeded", "failed", "cancelled"):
                    final[job_id] = data
            if len(final) == len(job_ids):
                return final
            time.sleep(0.25)
        stuck = {j: client.get(f"/v1/jobs/{j}").json()["state"] for j in job_ids - set(final)}
    raise AssertionError(f"jobs not terminal after {DRAIN_TIMEOUT_S} s: {stuck}")


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_job(tmp_path: Path) -> None:
    report = crash_rounds(tmp_path, SqliteJobs(tmp_path / "jobs.sqlite"))
    print("\ncrash test:", json.dumps(report))


def crash_rounds(tmp_path: Path, db: JobsDb) -> dict[str, Any]:
    """``ROUNDS`` rounds of start, submit, SIGKILL on ``db``, then a last start that must
    finish every job; the report (asserting everything on the way)."""
    (tmp_path / "keys").write_text(f"crash:{hash_key(KEY)}\n")
    log = tmp_path / "server.log"
    rng = random.Random(SEED)
    tally = Tally()
    began = time.monotonic()
    for rnd in range(ROUNDS):
        _round(rnd, rng, tmp_path, log, tally, db)

    accepted = [a for a in tally.submits if a.job_id is not None]
    unanswered = [a for a in tally.submits if a.code is None]
    refused = [a for a in tally.submits if a.code is not None and a.job_id is None]
    assert not refused, [(a.key, a.code, a.error) for a in refused]
    assert len({a.job_id for a in accepted}) == len(accepted), "two keys got the same job"
    # the test really hit both windows it is about
    assert tally.mid_run_kills >= 1, "no kill landed while a job ran"
    assert unanswered, "no kill landed while a submit was in flight"

    server = Server(tmp_path, log, db.arg)
    try:
        server.wait_ready()
        # an answered key: the same job again (200), whatever its state
        for attempt in accepted:
            assert _resubmit(server.url, attempt) == (200, attempt.job_id), attempt
        # an unanswered key: the job may exist (200) or not (202, created now), never twice
        recovered_unanswered = 0
        for attempt in unanswered:
            code, job_id = _resubmit(server.url, attempt)
            recovered_unanswered += code == 200
            assert _resubmit(server.url, attempt) == (200, job_id), attempt
            attempt.job_id = job_id
        tracked = {a.job_id for a in tally.submits if a.job_id is not None}
        final = _drain(server.url, tracked)
        outcome = _check_outcomes(server.url, tally.submits, final)
    finally:
        server.kill()
    duplicated = _check_database(db, tally.submits, final, log)

    return {
        "rounds": ROUNDS,
        "submits": len(tally.submits),
        "answered_202": len(accepted),
        "unanswered": len(unanswered),
        "unanswered_but_stored": recovered_unanswered,
        "rounds_killed_mid_run": tally.mid_run_kills,
        "jobs_killed_while_running": tally.jobs_killed_running,
        **outcome,
        "lost": 0,  # every accepted job ended succeeded or failed, checked above
        **duplicated,
        "seconds": round(time.monotonic() - began, 1),
    }


def _check_outcomes(
    url: str, submits: list[Submit], final: dict[str, dict[str, Any]]
) -> dict[str, int]:
    """Every job ended succeeded or failed (crashed); results verify and agree per spec."""
    counts = {"succeeded": 0, "failed": 0, "re_run": 0, "re_run_succeeded": 0}
    reference: dict[str, dict[str, torch.Tensor]] = {}
    with httpx.Client(base_url=url, headers=HEADERS, timeout=60) as client:
        for attempt in submits:
            status = final[attempt.job_id]
            state = status["state"]
            assert state in ("succeeded", "failed"), (attempt, status)
            counts[state] += 1
            counts["re_run"] += status["attempts"] > 1
            if state == "failed":
                assert status["error"]["error"] == "crashed", (attempt, status)
                continue
            counts["re_run_succeeded"] += status["attempts"] > 1
            r = client.get(f"/v1/jobs/{attempt.job_id}/result")
            assert r.status_code == 200, (attempt, r.status_code, r.text)
            digest = hashlib.sha256(r.content).hexdigest()
            assert digest == r.headers["X-Specsight-Sha256"] == status["result_sha256"]
            manifest = client.get(f"/v1/jobs/{attempt.job_id}/manifest")
            assert manifest.status_code == 200 and "tensors" in manifest.json()
            tensors = load_safetensors(r.content)
            first = reference.setdefault(attempt.spec_name, tensors)
            assert set(tensors) == set(first), attempt
            for name, tensor in tensors.items():  # batched with other jobs or alone: the same
                torch.testing.assert_close(tensor, first[name], atol=1e-4, rtol=1e-4)
    assert counts["succeeded"] > 0
    return counts


_RAN = re.compile(r"specsight\.serve: ran \d+ job\(s\) in [\d.]+s: (\[.*\])$", re.M)


def _check_database(
    db: JobsDb, submits: list[Submit], final: dict[str, dict[str, Any]], log: Path
) -> dict[str, int]:
    """One job per key; exactly the succeeded jobs have a result, with the right sha256; no
    job started more than ``MAX_ATTEMPTS`` times, nor completed a run more often than it
    started one. The counts of jobs stored twice (0), and of jobs whose run completed again
    (a kill came after their run completed, before its result was recorded)."""
    rows = db.jobs()
    results = db.results()
    by_key = {key: job_id for job_id, key, _, _, _ in rows}
    assert len(by_key) == len(rows), "a key has two jobs"
    assert by_key == {a.key: a.job_id for a in submits}
    completed: dict[str, int] = {}  # completed runs per job, from the servers' log
    for match in _RAN.finditer(log.read_text(errors="replace")):
        for job_id in ast.literal_eval(match.group(1)):
            completed[job_id] = completed.get(job_id, 0) + 1
    for job_id, _, state, sha, attempts in rows:
        assert state == final[job_id]["state"]
        assert 1 <= attempts <= MAX_ATTEMPTS, (job_id, attempts)
        assert completed.get(job_id, 0) <= attempts, (job_id, completed.get(job_id), attempts)
        if state == "succeeded":
            assert job_id in completed, job_id
            recorded, data = results[job_id]
            assert recorded == sha and hashlib.sha256(data).hexdigest() == sha, job_id
        else:
            assert job_id not in results, job_id
    assert set(results) <= {job_id for job_id, _, state, _, _ in rows if state == "succeeded"}
    return {
        "duplicated_jobs": len(rows) - len(by_key),
        "completed_again_after_kill": sum(n > 1 for n in completed.values()),
    }
