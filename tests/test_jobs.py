"""The durable job store (specsight.remote.jobs): states, owners, idempotency, the queue, leases,
crash recovery and durability across processes.

The conformance suite: every test taking ``store``, ``db`` or ``open_store`` runs against both
stores, SQLite (a file in tmp_path) and PostgreSQL (a fresh database on the session's server,
tests/postgres.py); the others check what only the SQLite store has (its file, pragmas,
migrations). PostgreSQL's own tests are in tests/test_postgres_jobs.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from specsight.remote.jobs import SCHEMA_VERSION, JobStore, JobStoreBase, QueueFull, open_job_store
from specsight.remote.protocol import ErrorBody

ROOT = Path(__file__).resolve().parent.parent
OWNER, OTHER = "a" * 64, "b" * 64


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


SHA_BYTES = sha(b"bytes")


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path):
    """Where a store's jobs are: a SQLite file, or a PostgreSQL database of this test's own."""
    if request.param == "sqlite":
        yield str(tmp_path / "jobs.db")
        return
    with request.getfixturevalue("postgres_server").database() as url:
        yield url


@pytest.fixture
def open_store(db: str):
    """Open a store on the test's database (several: as many servers); all closed after."""
    opened: list[JobStoreBase] = []

    def open_(**options) -> JobStoreBase:
        opened.append(open_job_store(db, **options))
        return opened[-1]

    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store):
    return open_store()


@pytest.fixture
def sqlite_store(tmp_path: Path):
    s = JobStore(tmp_path / "jobs.db")
    yield s
    s.close()


def submit(
    store: JobStoreBase, model: str = "tiny", owner: str = OWNER, key: str | None = None, **kw
):
    job, _ = store.submit(
        owner=owner,
        model=model,
        spec_json=json.dumps({"model": model}),
        spec_file="s.yaml",
        idempotency_key=key,
        **kw,
    )
    return job


def test_pragmas_and_schema(sqlite_store: JobStore, tmp_path: Path) -> None:
    con = sqlite_store._con()
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    fresh = sqlite3.connect(tmp_path / "jobs.db")
    assert fresh.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    version = fresh.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    assert int(version) == SCHEMA_VERSION
    fresh.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    fresh.commit()
    fresh.close()
    with pytest.raises(RuntimeError, match="schema 99"):
        JobStore(tmp_path / "jobs.db")
    with pytest.raises(ValueError):
        JobStore(":memory:")


def test_submit_get_status(store: JobStoreBase) -> None:
    before = time.time()
    job, created = store.submit(
        owner=OWNER, model="tiny", spec_json="{}", spec_file=None, idempotency_key=None
    )
    assert created and job.state == "queued" and job.attempts == 0
    assert before <= job.created <= time.time() and job.started is None
    assert len(job.id) >= 16 and job.owner == OWNER
    assert store.get(job.id, OWNER) == job
    st = store.status(job.id, OWNER)
    assert st is not None and st.state == "queued" and st.queue_position == 0
    assert st.model == "tiny" and st.progress.done == 0 and st.error is None
    assert store.counts() == {
        "queued": 1,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert store.get("nope", OWNER) is None and store.status("nope", OWNER) is None


def test_owner_isolation(store: JobStoreBase) -> None:
    job = submit(store)
    assert store.get(job.id, OTHER) is None
    assert store.status(job.id, OTHER) is None
    assert store.cancel(job.id, OTHER) is None
    assert store.get(job.id, OWNER).state == "queued"  # the other owner's cancel did nothing
    [claimed] = store.claim("w")
    assert store.succeed(claimed.id, "w", result=b"x", manifest_json="{}", sha256=sha(b"x"))
    assert store.result(job.id, OTHER) is None
    path, manifest, digest = store.result(job.id, OWNER)
    assert (path.read_bytes(), manifest, digest) == (b"x", "{}", sha(b"x"))


def test_idempotency(store: JobStoreBase) -> None:
    a = submit(store, key="k1")
    again, created = store.submit(
        owner=OWNER, model="tiny", spec_json="{}", spec_file=None, idempotency_key="k1"
    )
    assert not created and again.id == a.id
    other = submit(store, owner=OTHER, key="k1")
    assert other.id != a.id and other.owner == OTHER
    assert submit(store, key="k2").id != a.id
    assert submit(store).id != submit(store).id  # no key: always new
    assert store.queued_count() == 5


def test_queue_positions(store: JobStoreBase) -> None:
    jobs = [submit(store) for _ in range(3)]
    assert [store.status(j.id, OWNER).queue_position for j in jobs] == [0, 1, 2]
    store.claim("w")
    assert store.status(jobs[0].id, OWNER).queue_position is None
    assert [store.status(j.id, OWNER).queue_position for j in jobs[1:]] == [0, 1]
    store.cancel(jobs[1].id, OWNER)
    assert store.status(jobs[2].id, OWNER).queue_position == 0


def test_queue_full(store: JobStoreBase) -> None:
    submit(store, key="k", max_queue=2)
    submit(store, max_queue=2)
    with pytest.raises(QueueFull) as exc:
        submit(store, max_queue=2)
    assert isinstance(exc.value.retry_after, int) and exc.value.retry_after >= 1
    assert store.queued_count() == 2
    # a repeated idempotency key still answers with its job while the queue is full
    assert submit(store, key="k", max_queue=2).state == "queued"
    store.claim("w")  # running jobs do not count against the queue
    submit(store, max_queue=2)
    assert store.queued_count() == 2


def test_claim_order_and_model(store: JobStoreBase) -> None:
    a, b, c, d = (submit(store, m) for m in ("m1", "m2", "m1", "m1"))
    got = store.claim("w", limit=2)
    assert [j.id for j in got] == [a.id, c.id]
    assert all(j.state == "running" and j.attempts == 1 and j.worker == "w" for j in got)
    assert all(j.started is not None and j.lease_until > time.time() for j in got)
    assert [j.id for j in store.claim("w", model="m2", limit=5)] == [b.id]
    assert store.claim("w", model="m2") == []
    assert [j.id for j in store.claim("w", limit=5)] == [d.id]
    assert store.claim("w") == []


def test_concurrent_claims_never_share_a_job(open_store) -> None:
    shared, separate = open_store(), open_store()  # threads on one store, and on two
    ids = {submit(shared, f"m{i % 3}").id for i in range(200)}
    claimed: list[list[str]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def work(i: int) -> None:
        s = shared if i < 2 else separate
        start.wait()
        while batch := s.claim(f"w{i}", limit=1 + i % 3):
            claimed[i].extend(j.id for j in batch)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [j for c in claimed for j in c]
    assert len(flat) == len(set(flat)) == 200 and set(flat) == ids
    assert shared.counts()["running"] == 200


def test_lease_and_heartbeat(open_store) -> None:
    store = open_store(lease_s=5.0)
    job = submit(store)
    [run] = store.claim("w")
    assert run.lease_until == pytest.approx(time.time() + 5.0, abs=1.0)
    time.sleep(0.01)
    assert store.heartbeat(job.id, "w")
    assert store.get(job.id, OWNER).lease_until > run.lease_until
    assert not store.heartbeat(job.id, "someone-else")
    store.progress(job.id, 3, 10)
    st = store.status(job.id, OWNER)
    assert (st.progress.done, st.progress.total) == (3, 10)
    assert store.succeed(job.id, "w", result=b"r", manifest_json="{}", sha256="s")
    assert not store.heartbeat(job.id, "w")
    store.progress(job.id, 5, 10)  # ignored once finished
    assert store.status(job.id, OWNER).progress.done == 3


def test_succeed_writes_result_atomically(store: JobStoreBase) -> None:
    job = submit(store)
    assert store.result(job.id, OWNER) is None  # queued
    [run] = store.claim("w")
    assert store.result(job.id, OWNER) is None  # running
    assert not store.succeed(job.id, "other", result=b"x", manifest_json="{}", sha256="h")
    data = os.urandom(100_000)
    assert store.succeed(job.id, "w", result=data, manifest_json='{"a": 1}', sha256=sha(data))
    path, manifest, digest = store.result(job.id, OWNER)
    assert (path.read_bytes(), manifest, digest) == (data, '{"a": 1}', sha(data))
    st = store.status(job.id, OWNER)
    assert st.state == "succeeded" and st.result_sha256 == sha(data) and st.finished >= st.started
    assert not store.succeed(job.id, "w", result=b"y", manifest_json="{}", sha256="h2")
    assert store.result(job.id, OWNER)[0].read_bytes() == data


def test_succeed_refused_after_cancel(store: JobStoreBase) -> None:
    job = submit(store)
    store.claim("w")
    st = store.cancel(job.id, OWNER)
    assert st.state == "running" and store.cancel_requested(job.id)
    assert not store.succeed(job.id, "w", result=b"x", manifest_json="{}", sha256="h")
    assert store.get(job.id, OWNER).state == "cancelled"
    assert store.result(job.id, OWNER) is None
    table = "result_files" if isinstance(store, JobStore) else "results"
    assert store._one(f"SELECT COUNT(*) FROM {table}")[0] == 0
    assert list(store.files.folder.iterdir()) == []  # the file written for it is gone too


def test_cancel_queued_running_terminal(store: JobStoreBase) -> None:
    queued, running = submit(store), submit(store)
    store.claim("w")  # claims `queued`, the oldest
    running, queued = queued, running
    st = store.cancel(queued.id, OWNER)
    assert st.state == "cancelled" and st.finished is not None
    assert store.claim("w2") == []  # a cancelled job is never claimed
    assert not store.cancel_requested(running.id)
    st = store.cancel(running.id, OWNER)
    assert st.state == "running" and store.cancel_requested(running.id)
    assert not store.acknowledge_cancel(running.id, "someone-else")
    assert store.acknowledge_cancel(running.id, "w")
    assert store.status(running.id, OWNER).state == "cancelled"
    # terminal: unchanged
    done = submit(store)
    store.claim("w")
    store.succeed(done.id, "w", result=b"", manifest_json="{}", sha256="h")
    assert store.cancel(done.id, OWNER).state == "succeeded"
    assert store.counts()["cancelled"] == 2


def test_fail(store: JobStoreBase) -> None:
    a, b = submit(store), submit(store)
    store.claim("w")
    err = ErrorBody(error="run-failed", message="boom", hint="try less")
    assert not store.fail(a.id, "other", err)
    assert store.fail(a.id, "w", err)
    st = store.status(a.id, OWNER)
    assert st.state == "failed" and st.error == err and st.finished is not None
    assert not store.fail(a.id, "w", err)  # already terminal
    assert store.fail(b.id, None, ErrorBody(error="invalid-spec", message="bad"))  # queued
    assert store.get(b.id, OWNER).error.error == "invalid-spec"
    c = submit(store)
    store.claim("w")
    store.cancel(c.id, OWNER)
    assert store.fail(c.id, "w", err)  # a pending cancel wins
    assert store.get(c.id, OWNER).state == "cancelled"


def test_requeue_does_not_count_an_attempt(store: JobStoreBase) -> None:
    a, b = submit(store), submit(store)
    [run] = store.claim("w")
    assert run.id == a.id and run.attempts == 1
    assert not store.requeue(a.id, "other")
    assert store.requeue(a.id, "w")
    rec = store.get(a.id, OWNER)
    assert rec.state == "queued" and rec.attempts == 0 and rec.worker is None
    assert rec.started == run.started  # the first start time is kept
    assert store.status(a.id, OWNER).queue_position == 0  # back at the front
    [again] = store.claim("w2")
    assert again.id == a.id and again.attempts == 1 and again.started == run.started
    assert not store.succeed(a.id, "w", result=b"", manifest_json="{}", sha256="h")
    assert b.id in {j.id for j in store.claim("w2")}


def test_recover_requeues_then_fails(open_store) -> None:
    store = open_store(max_attempts=3)
    job, other = submit(store), submit(store, "m2")
    for attempt in (1, 2, 3):
        [run] = store.claim(f"w{attempt}", model="tiny")
        assert run.id == job.id and run.attempts == attempt
        store.progress(job.id, 1, 2)
        store.close()  # "crash": the worker never finishes
        store = open_store(max_attempts=3)
        got = store.recover()
        rec = store.get(job.id, OWNER)
        if attempt < 3:
            assert got == {"requeued": 1, "failed": 0, "cancelled": 0}
            assert rec.state == "queued" and rec.attempts == attempt and rec.worker is None
            assert rec.progress_done == 0
        else:
            assert got == {"requeued": 0, "failed": 1, "cancelled": 0}
            assert rec.state == "failed" and rec.error.error == "crashed"
            assert "3 times" in rec.error.message and rec.error.hint
    assert store.get(other.id, OWNER).state == "queued"  # untouched, nothing vanished
    assert sum(store.counts().values()) == 2
    assert store.recover() == {"requeued": 0, "failed": 0, "cancelled": 0}


def test_recover_honours_pending_cancel(store: JobStoreBase) -> None:
    job = submit(store)
    store.claim("w")
    store.cancel(job.id, OWNER)
    assert store.recover()["cancelled"] == 1
    assert store.get(job.id, OWNER).state == "cancelled"


def test_expire_leases(open_store) -> None:
    short, long = open_store(lease_s=0.05), open_store(lease_s=60)
    a, b = submit(short), submit(short)
    short.claim("stuck")
    long.claim("alive")
    time.sleep(0.1)
    assert long.expire_leases() == {"requeued": 1, "failed": 0, "cancelled": 0}
    assert long.get(a.id, OWNER).state == "queued" and long.get(b.id, OWNER).state == "running"
    assert not short.heartbeat(a.id, "stuck")  # the stuck worker lost the job
    assert not short.succeed(a.id, "stuck", result=b"", manifest_json="{}", sha256="h")


def _run_child(db: str, code: str) -> subprocess.CompletedProcess:
    prog = (
        f"from specsight.remote.jobs import open_job_store\nstore = open_job_store({db!r})\n{code}"
    )
    return subprocess.run(
        [sys.executable, "-c", prog], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_visible_from_a_new_process(store: JobStoreBase, db: str) -> None:
    job = submit(store)
    out = _run_child(db, f"print(store.get({job.id!r}, {OWNER!r}).state)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "queued"


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_submit_survives_sigkill(db: str, open_store) -> None:
    code = (
        "import os, sys\n"
        "job, _ = store.submit(owner='o', model='tiny', spec_json='{}', spec_file=None,"
        " idempotency_key='k')\n"
        "sys.stdout.write(job.id + '\\n'); sys.stdout.flush()\n"
        "os.kill(os.getpid(), 9)\n"
    )
    out = _run_child(db, code)
    assert out.returncode == -signal.SIGKILL, out.stderr
    job_id = out.stdout.strip()
    store = open_store()
    rec = store.get(job_id, "o")
    assert rec is not None and rec.state == "queued"
    # the same key after the crash finds it: the client's retry does not duplicate the job
    again, created = store.submit(
        owner="o", model="tiny", spec_json="{}", spec_file=None, idempotency_key="k"
    )
    assert again.id == job_id and not created


def test_closed_store_refuses(open_store) -> None:
    store = open_store()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        submit(store)


# --------------------------------------------------------------------------- results on disk


def test_results_are_files_deleted_after_the_retention_period(open_store, tmp_path: Path) -> None:
    store = open_store(retention_s=3600)
    job = submit(store)
    store.claim("w")
    assert store.succeed(job.id, "w", result=b"bytes", manifest_json="{}", sha256=SHA_BYTES)
    path = store.result(job.id, OWNER)[0]  # SQLite: its file; PostgreSQL: downloaded
    assert path.read_bytes() == b"bytes" and path.stat().st_mode & 0o777 == 0o600
    if isinstance(store, JobStore):
        assert path.parent == tmp_path / "jobs.db.results"
    assert store.expire_results() == 0  # not yet
    assert store.expire_results(now=time.time() + 3601) == 1
    assert store.result(job.id, OWNER) is None and not path.exists()
    assert store.status(job.id, OWNER).state == "succeeded"  # the job stays


def test_a_crash_between_writing_and_recording_leaves_no_file(sqlite_store: JobStore) -> None:
    store = sqlite_store
    job = submit(store)
    store.claim("w")
    store.files.write(job.id, b"written, never recorded")  # the process died here
    (store.files.folder / "x.tmp").write_bytes(b"half")  # or here, mid-write
    assert store.recover()["requeued"] == 1
    assert list(store.files.folder.iterdir()) == []


def test_a_schema_1_store_moves_its_results_into_files(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
            model TEXT NOT NULL, state TEXT NOT NULL, spec_json TEXT NOT NULL, spec_file TEXT,
            idempotency_key TEXT, result_estimate INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, started REAL,
            finished REAL, progress_done INTEGER NOT NULL DEFAULT 0,
            progress_total INTEGER NOT NULL DEFAULT 0, error TEXT, result_sha256 TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0, worker TEXT, lease_until REAL);
        CREATE TABLE results (job_id TEXT PRIMARY KEY REFERENCES jobs (id), data BLOB NOT NULL,
            manifest TEXT NOT NULL, sha256 TEXT NOT NULL);
        """
    )
    now = time.time()
    con.execute(
        "INSERT INTO jobs (id, owner, model, state, spec_json, created, finished)"
        " VALUES ('job1', ?, 'tiny', 'succeeded', '{}', ?, ?)",
        (OWNER, now, now),
    )
    con.execute("INSERT INTO results VALUES ('job1', ?, '{\"m\": 1}', 'sha')", (b"\x00blob",))
    con.commit()
    con.close()
    store = JobStore(path)
    try:
        file, manifest, digest = store.result("job1", OWNER)
        assert (file.read_bytes(), manifest, digest) == (b"\x00blob", '{"m": 1}', "sha")
        tables = {r[0] for r in store._con().execute("SELECT name FROM sqlite_master")}
        assert "results" not in tables and "result_files" in tables
    finally:
        store.close()
