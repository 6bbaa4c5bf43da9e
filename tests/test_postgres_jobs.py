"""The PostgreSQL job store (specsight.remote.postgres_jobs) beyond the conformance suite that it
shares with SQLite (tests/test_jobs.py): claims from several processes, idempotent submits and
queue limits across stores, a dead server's jobs reclaimed at once while a live one's are not,
results served by any replica, the server on PostgreSQL, and the SIGKILL crash test of
tests/test_crash.py with ``specsight serve --db postgresql://...``.

PostgreSQL runs from the machine's initdb/pg_ctl for the session (tests/postgres.py); every
test gets a database of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from specsight.errors import RunError
from specsight.remote import postgres_jobs
from specsight.remote.auth import KeyRing
from specsight.remote.jobs import JobStore, QueueFull, is_postgres_url, open_job_store
from specsight.remote.postgres_db import redact_url
from specsight.remote.postgres_jobs import PostgresJobStore

ROOT = Path(__file__).resolve().parent.parent
OWNER = "a" * 64


@pytest.fixture
def pg_url(postgres_server):
    with postgres_server.database() as url:
        yield url


@pytest.fixture
def stores(pg_url):
    """Open PostgreSQL stores on the test's database (as many servers); closed after."""
    opened: list[PostgresJobStore] = []

    def open_(**options) -> PostgresJobStore:
        opened.append(open_job_store(pg_url, **options))  # type: ignore[arg-type]
        return opened[-1]

    yield open_
    for store in opened:
        store.close()


def submit(store, key: str | None = None, model: str = "tiny", **kw):
    return store.submit(
        owner=OWNER, model=model, spec_json="{}", spec_file=None, idempotency_key=key, **kw
    )


def child(url: str, code: str, *args: str) -> subprocess.Popen:
    prog = f"from specsight.remote.jobs import open_job_store\nstore = open_job_store({url!r})\n"
    return subprocess.Popen(
        [sys.executable, "-c", prog + code, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (got := predicate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def test_the_url_picks_the_store(pg_url: str, tmp_path: Path) -> None:
    assert is_postgres_url(pg_url) and is_postgres_url("postgres://h/db")
    assert not is_postgres_url(str(tmp_path / "jobs.sqlite")) and not is_postgres_url(tmp_path)
    with open_job_store(pg_url) as pg, open_job_store(tmp_path / "j.sqlite") as lite:
        assert isinstance(pg, PostgresJobStore) and isinstance(lite, JobStore)
        assert pg.location == pg_url
    assert redact_url("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    with pytest.raises(RunError, match="cannot reach") as exc:
        open_job_store("postgresql://u:secret@127.0.0.1:1/db")
    assert "secret" not in str(exc.value)


def test_without_psycopg_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    pg_url = "postgresql://u@127.0.0.1:1/db"
    with pytest.raises(RunError) as exc:
        open_job_store(pg_url)
    assert "pip install 'specsight[postgres]'" in str(exc.value)
    from click.testing import CliRunner

    from specsight.cli import main

    out = CliRunner().invoke(main, ["serve", "--model", "tiny-llama", "--db", pg_url])
    assert out.exit_code == 2 and "specsight[postgres]" in out.output


def test_schema_version_is_checked(stores, pg_url: str) -> None:
    stores().close()
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(RuntimeError, match="schema 99"):
        stores()


def test_claims_from_processes_never_share_a_job(stores, pg_url: str) -> None:
    store = stores()
    ids = {submit(store, model=f"m{i % 3}")[0].id for i in range(300)}
    code = (
        "import json, sys, time\n"
        "start, me = float(sys.argv[1]), sys.argv[2]\n"
        "while time.time() < start: time.sleep(0.001)\n"
        "got = []\n"
        "while batch := store.claim(me, limit=1 + len(me) % 3): got += [j.id for j in batch]\n"
        "print(json.dumps(got))\n"
    )
    start = time.time() + 4.0  # every child connected and waiting by then
    procs = [child(pg_url, code, str(start), "w" * (i + 1)) for i in range(3)]
    claimed = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        claimed.append(json.loads(out))
    flat = [j for got in claimed for j in got]
    assert len(flat) == len(set(flat)) == 300 and set(flat) == ids
    assert sum(bool(got) for got in claimed) >= 2, [len(got) for got in claimed]
    assert store.counts()["running"] == 300


def test_idempotent_submits_and_queue_limits_across_stores(stores) -> None:
    a, b = stores(), stores()
    results: list[tuple[str, bool]] = []
    full: list[int] = []
    start = threading.Barrier(8)

    def same_key(i: int) -> None:
        start.wait()
        job, created = submit(a if i % 2 else b, key="k")
        results.append((job.id, created))
        try:
            submit(b if i % 2 else a, max_queue=5)
        except QueueFull:
            full.append(i)

    threads = [threading.Thread(target=same_key, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({job_id for job_id, _ in results}) == 1  # one job for the key
    assert sum(created for _, created in results) == 1
    assert a.queued_count() == 5 and len(full) == 4  # the key's job + 4 under max_queue=5


def test_a_dead_servers_jobs_are_reclaimed_at_once_a_live_ones_never(stores, pg_url) -> None:
    live = stores()
    (kept, _), (doomed, _) = submit(live), submit(live)
    [running] = live.claim("alive")
    code = (
        "import os, sys\n"
        "[job] = store.claim('doomed')\n"
        "sys.stdout.write(job.id + '\\n'); sys.stdout.flush()\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = child(pg_url, code)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    assert out.strip() == doomed.id and running.id == kept.id
    other = stores(max_attempts=1)  # another replica; its lease is 30 s: none has passed
    reclaimed = wait_until(lambda: other.expire_leases()["failed"])
    assert reclaimed == 1  # the dead server's job, at its last attempt: failed
    rec = other.get(doomed.id, OWNER)
    assert rec.state == "failed" and rec.error.error == "crashed"
    assert "server stopped" in rec.error.message
    assert other.recover() == {"requeued": 0, "failed": 0, "cancelled": 0}
    assert other.get(kept.id, OWNER).state == "running"  # the live server keeps its job
    assert live.heartbeat(kept.id, "alive")
    live.close()  # that server stops too
    assert other.expire_leases()["failed"] == 1


def test_a_lost_liveness_connection_is_replaced(stores, monkeypatch) -> None:
    monkeypatch.setattr(postgres_jobs, "_CHECK_S", 0.0)  # check at every claim and heartbeat
    live, other = stores(), stores()
    job, _ = submit(live)
    live.claim("w")
    pid = live._alive.info.backend_pid
    with other._tx() as con:  # the connection drops (a restart, a network fault): locks go
        con.execute("SELECT pg_terminate_backend(?)", (pid,))
    assert wait_until(lambda: other.expire_leases()["requeued"]) == 1  # "w" looked dead
    [again] = live.claim("w")  # the lock is taken again, on a new connection
    assert again.id == job.id and live._alive.info.backend_pid != pid
    assert live.heartbeat(job.id, "w")
    assert other.expire_leases()["requeued"] == 0  # alive again


def test_results_are_served_by_any_replica(stores, monkeypatch) -> None:
    monkeypatch.setattr(postgres_jobs, "_CHUNK", 4096)  # several chunks per download
    a, b = stores(), stores()
    job, _ = submit(a)
    a.claim("w")
    data = os.urandom(50_000)
    digest = hashlib.sha256(data).hexdigest()
    assert a.succeed(job.id, "w", result=data, manifest_json='{"m": 1}', sha256=digest)
    path, manifest, sha = b.result(job.id, OWNER)
    assert (path.read_bytes(), manifest, sha) == (data, '{"m": 1}', digest)
    assert path.parent == b.files.folder and not list(a.files.folder.iterdir())
    assert b.result(job.id, OWNER)[0] == path  # downloaded once
    with b._tx() as con:  # a corrupted row is never served
        con.execute("UPDATE results SET data=? WHERE job_id=?", (b"x" * 50_000, job.id))
    c = stores()
    with pytest.raises(RuntimeError, match="sha256"):
        c.result(job.id, OWNER)
    assert not list(c.files.folder.iterdir())  # no partial file left
    folder = c.files.folder
    c.close()
    assert not folder.exists()  # the store's own cache goes with it


def test_two_servers_on_one_database(stores) -> None:
    """Submit to one app, run it there, read status and result from the other (no worker)."""
    from fastapi.testclient import TestClient

    from specsight.remote.server import create_app
    from tests.conftest import tiny
    from tests.test_server import ALICE, KEYS, body, fetch, spec, wait

    keys = KeyRing.from_raw_keys(KEYS)
    model = {"tiny-llama": tiny("tiny-llama")}
    runner = create_app(model, store=stores(), keys=keys, idle_s=0.01)
    reader = create_app(model, store=stores(), keys=keys, start_worker=False)
    with TestClient(runner) as one, TestClient(reader) as two:
        headers = {**ALICE, "Idempotency-Key": "same"}
        first = one.post("/v1/jobs", json=body(spec(0.5)), headers=headers)
        assert first.status_code == 202, first.text
        again = two.post("/v1/jobs", json=body(spec(0.5)), headers=headers)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        job_id = first.json()["id"]
        assert wait(one, job_id).state == "succeeded"
        assert wait(two, job_id).state == "succeeded"
        assert fetch(two, job_id).keys() == fetch(one, job_id).keys()
        assert two.get(f"/v1/jobs/{job_id}/manifest", headers=ALICE).status_code == 200


class PostgresJobs:
    """The crash test's view of a PostgreSQL store (tests/test_crash.py's JobsDb)."""

    def __init__(self, url: str):
        self.arg = url

    def _rows(self, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.arg) as con:
            return con.execute(sql).fetchall()  # type: ignore[arg-type]

    def running(self) -> list[tuple[str, int]]:
        return self._rows("SELECT id, attempts FROM jobs WHERE state='running'")

    def jobs(self) -> list[tuple]:
        return self._rows("SELECT id, idempotency_key, state, result_sha256, attempts FROM jobs")

    def results(self) -> dict[str, tuple[str, bytes]]:
        rows = self._rows("SELECT job_id, sha256, data FROM results")
        return {job: (sha, bytes(data)) for job, sha, data in rows}


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_job_on_postgres(
    tmp_path: Path, pg_url: str, monkeypatch
) -> None:
    from tests.test_crash import crash_rounds

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the killed servers' result caches

    report = crash_rounds(tmp_path, PostgresJobs(pg_url))
    print("\ncrash test (PostgreSQL):", json.dumps(report))
