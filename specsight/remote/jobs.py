"""The durable job store of ``specsight serve``: jobs in an embedded SQLite database
(:mod:`.sqlite_db`), their results in files beside it (:mod:`.result_files`).

The database runs in WAL mode with ``synchronous=FULL``, so a job is on disk once
:meth:`JobStore.submit` returns (the server answers 202 only after that). A job moves
``queued -> running -> succeeded | failed | cancelled``; ``queued -> cancelled`` directly. A
running job holds a lease (``lease_until``) that its worker extends with
:meth:`JobStore.heartbeat`. After a crash,
:meth:`JobStore.recover` puts every running job back in the queue, or fails it once it has been
started ``max_attempts`` times; :meth:`JobStore.expire_leases` does the same, while the server
lives, for jobs whose lease passed. No job vanishes. A job's result file is written and synced
before the transaction that records it (with the manifest and sha256) and marks the job
succeeded; results are deleted ``retention_s`` after their job finished.

API keys are never stored: the server passes ``owner``, already a hash of the key. Every
owner-facing read (:meth:`~JobStore.get`, :meth:`~JobStore.status`, :meth:`~JobStore.result`,
:meth:`~JobStore.cancel`) answers ``None`` for another owner's job, as for an unknown one.

One server process per database file: :meth:`JobStore.recover` assumes that no other process is
running jobs from it. Each thread gets its own connection; writes use ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import math
import os
import secrets
import sqlite3
import time
from pathlib import Path

from .protocol import TERMINAL_STATES, ErrorBody, JobStatus
from .records import JobRecord, QueueFull
from .result_files import ResultFiles
from .sqlite_db import SqliteDatabase

__all__ = ["SCHEMA_VERSION", "JobRecord", "JobStore", "QueueFull"]

SCHEMA_VERSION = 2
_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
    model TEXT NOT NULL, state TEXT NOT NULL, spec_json TEXT NOT NULL, spec_file TEXT,
    idempotency_key TEXT, result_estimate INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, started REAL, finished REAL,
    progress_done INTEGER NOT NULL DEFAULT 0, progress_total INTEGER NOT NULL DEFAULT 0,
    error TEXT, result_sha256 TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker TEXT, lease_until REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS result_files (
    job_id TEXT PRIMARY KEY REFERENCES jobs (id), manifest TEXT NOT NULL, sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL
);
"""
#: retention of results when the store is not told otherwise
RETENTION_S = 7 * 24 * 3600.0
_COLS = (
    "id, owner, model, state, spec_json, spec_file, attempts, created, started, finished, "
    "progress_done, progress_total, error, result_sha256, cancel_requested, worker, lease_until, "
    "result_estimate, seq"
)
_CRASH_HINT = (
    "the job may need more memory or time than the server has; try a smaller spec, "
    "or ask the server's operator"
)


class JobStore(SqliteDatabase):
    """Jobs in a SQLite file, results in files beside it; safe to share between threads."""

    schema = _SCHEMA
    schema_version = SCHEMA_VERSION

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_attempts: int = 3,
        lease_s: float = 30.0,
        results_dir: str | os.PathLike | None = None,
        retention_s: float = RETENTION_S,
    ):
        if max_attempts < 1 or lease_s <= 0:
            raise ValueError("max_attempts must be >= 1 and lease_s > 0")
        self.max_attempts, self.lease_s, self.retention_s = max_attempts, lease_s, retention_s
        self.files = ResultFiles(results_dir) if results_dir else ResultFiles.beside(path)
        super().__init__(path, {1: lambda con: _migrate_from_1(con, self.files)})

    def _record(self, con: sqlite3.Connection, job_id: str, owner: str | None) -> JobRecord | None:
        q = f"SELECT {_COLS} FROM jobs WHERE id=? AND (? IS NULL OR owner=?)"
        row = con.execute(q, (job_id, owner, owner)).fetchone()
        return JobRecord.from_row(row) if row else None

    def _status(self, con: sqlite3.Connection, rec: JobRecord) -> JobStatus:
        pos = None
        if rec.state == "queued":
            q = "SELECT COUNT(*) FROM jobs WHERE state='queued' AND seq<?"
            pos = con.execute(q, (rec.seq,)).fetchone()[0]
        return rec.to_status(pos)

    # -- submitting and reading --------------------------------------------------------------
    def submit(
        self,
        *,
        owner: str,
        model: str,
        spec_json: str,
        spec_file: str | None,
        idempotency_key: str | None,
        result_estimate: int = 0,
        max_queue: int | None = None,
        max_per_owner: int | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a new queued job; durable on return. ``(job, created)``; a repeated
        ``idempotency_key`` of the same owner returns the existing job with ``created=False``.
        QueueFull when ``max_queue`` jobs are queued, or ``max_per_owner`` of this owner's."""
        with self._tx() as con:
            if idempotency_key is not None:
                q = "SELECT id FROM jobs WHERE owner=? AND idempotency_key=?"
                row = con.execute(q, (owner, idempotency_key)).fetchone()
                if row:
                    return self._record(con, row[0], None), False  # type: ignore[return-value]
            if max_queue is not None:
                queued = con.execute("SELECT COUNT(*) FROM jobs WHERE state='queued'").fetchone()[0]
                if queued >= max_queue:
                    raise QueueFull(queued, max_queue, self._retry_after(con))
            if max_per_owner is not None:
                q = "SELECT COUNT(*) FROM jobs WHERE state='queued' AND owner=?"
                mine = con.execute(q, (owner,)).fetchone()[0]
                if mine >= max_per_owner:
                    retry = self._retry_after(con)
                    raise QueueFull(mine, max_per_owner, retry, whose="this key's")
            job_id = secrets.token_urlsafe(12)
            row = (job_id, owner, model, spec_json, spec_file, idempotency_key, result_estimate)
            con.execute(
                "INSERT INTO jobs (id, owner, model, state, spec_json, spec_file, idempotency_key,"
                " result_estimate, created) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                (*row, time.time()),
            )
            return self._record(con, job_id, None), True  # type: ignore[return-value]

    def _retry_after(self, con: sqlite3.Connection) -> int:
        """Seconds until a queue slot likely frees: the mean of the last 20 run durations."""
        q = (
            "SELECT AVG(finished - started) FROM (SELECT finished, started FROM jobs WHERE "
            "state='succeeded' AND started IS NOT NULL ORDER BY finished DESC LIMIT 20)"
        )
        mean = con.execute(q).fetchone()[0]
        return 5 if mean is None else max(1, min(300, math.ceil(mean)))

    def get(self, job_id: str, owner: str) -> JobRecord | None:
        """The job, or None when unknown or another owner's."""
        return self._record(self._con(), job_id, owner)

    def status(self, job_id: str, owner: str) -> JobStatus | None:
        """The wire status with ``queue_position`` (0 = next) for a queued job."""
        with self._tx(immediate=False) as con:
            rec = self._record(con, job_id, owner)
            return self._status(con, rec) if rec else None

    def result(self, job_id: str, owner: str) -> tuple[Path, str, str] | None:
        """``(results.safetensors file, manifest json, sha256)`` of a succeeded job of
        ``owner`` whose result is still kept."""
        row = self._one(
            "SELECT r.manifest, r.sha256 FROM result_files r JOIN jobs j ON j.id = r.job_id"
            " WHERE r.job_id=? AND j.owner=? AND j.state='succeeded'",
            job_id,
            owner,
        )
        return None if row is None else (self.files.path(job_id), row[0], row[1])

    def expire_results(self, now: float | None = None) -> int:
        """Delete the results of jobs finished more than ``retention_s`` ago; the count (their
        jobs stay, succeeded, with the result gone)."""
        before = (time.time() if now is None else now) - self.retention_s
        with self._tx() as con:
            rows = con.execute(
                "SELECT r.job_id FROM result_files r JOIN jobs j ON j.id = r.job_id"
                " WHERE j.finished < ?",
                (before,),
            ).fetchall()
            for (job_id,) in rows:
                con.execute("DELETE FROM result_files WHERE job_id=?", (job_id,))
        for (job_id,) in rows:
            self.files.delete(job_id)
        return len(rows)

    def queued_count(self) -> int:
        return self._one("SELECT COUNT(*) FROM jobs WHERE state='queued'")[0]  # type: ignore[index]

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, zeros included)."""
        out = dict.fromkeys(_STATES, 0)
        out.update(self._con().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        return out

    # -- the worker side ---------------------------------------------------------------------
    def claim(self, worker: str, *, model: str | None = None, limit: int = 1) -> list[JobRecord]:
        """Move up to ``limit`` oldest queued jobs (all of one model: ``model``, or the oldest
        job's) to running under ``worker`` with a fresh lease; ``attempts`` += 1.

        A job run before (its batch crashed, or its lease ran out) runs alone: the job that
        crashed a batch then crashes only itself, and the others succeed."""
        with self._tx() as con:
            where, args = (
                ("state='queued'", ())
                if model is None
                else (
                    "state='queued' AND model=?",
                    (model,),
                )
            )
            q = f"SELECT id, model, attempts FROM jobs WHERE {where} ORDER BY seq LIMIT 1"
            first = con.execute(q, args).fetchone()
            if first is None:
                return []
            if first[2] > 0:
                ids = [first[0]]
            else:
                q = (
                    "SELECT id FROM jobs WHERE state='queued' AND model=? AND attempts=0"
                    " ORDER BY seq LIMIT ?"
                )
                ids = [r[0] for r in con.execute(q, (first[1], max(0, limit)))]
            now = time.time()
            for job_id in ids:
                con.execute(
                    "UPDATE jobs SET state='running', attempts=attempts+1, worker=?,"
                    " lease_until=?, started=COALESCE(started, ?), progress_done=0,"
                    " progress_total=0 WHERE id=?",
                    (worker, now + self.lease_s, now, job_id),
                )
            return [self._record(con, i, None) for i in ids]  # type: ignore[misc]

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Extend the lease; False when the job no longer runs under ``worker``."""
        q = "UPDATE jobs SET lease_until=? WHERE id=? AND worker=? AND state='running'"
        return self._update(q, time.time() + self.lease_s, job_id, worker)

    def progress(self, job_id: str, done: int, total: int) -> None:
        """Record rows done / total of a running job (ignored for any other state)."""
        q = "UPDATE jobs SET progress_done=?, progress_total=? WHERE id=? AND state='running'"
        self._update(q, done, total, job_id)

    def cancel_requested(self, job_id: str) -> bool:
        """True when the owner asked to cancel (or the job is no longer running at all)."""
        row = self._one("SELECT cancel_requested, state FROM jobs WHERE id=?", job_id)
        return row is None or bool(row[0]) or row[1] != "running"

    def _finish_cancelled(self, con: sqlite3.Connection, job_id: str, worker: str | None) -> bool:
        cur = con.execute(
            "UPDATE jobs SET state='cancelled', finished=?, worker=NULL, lease_until=NULL"
            " WHERE id=? AND state='running' AND cancel_requested=1 AND (? IS NULL OR worker=?)",
            (time.time(), job_id, worker, worker),
        )
        return cur.rowcount == 1

    def acknowledge_cancel(self, job_id: str, worker: str) -> bool:
        """The worker stopped a job whose cancel was requested: mark it cancelled."""
        with self._tx() as con:
            return self._finish_cancelled(con, job_id, worker)

    def succeed(
        self, job_id: str, worker: str, *, result: bytes, manifest_json: str, sha256: str
    ) -> bool:
        """Write the result file, then record it and mark the job succeeded in one
        transaction. False (nothing kept) when the job no longer runs under ``worker``; a job
        whose cancel was requested becomes cancelled instead (also False)."""
        running = "SELECT 1 FROM jobs WHERE id=? AND worker=? AND state='running'"
        written = self._one(running, job_id, worker) is not None
        if written:
            self.files.write(job_id, result)
        done = False
        with self._tx() as con:
            if not self._finish_cancelled(con, job_id, worker):
                cur = con.execute(
                    "UPDATE jobs SET state='succeeded', finished=?, result_sha256=?, worker=NULL,"
                    " lease_until=NULL WHERE id=? AND worker=? AND state='running'",
                    (time.time(), sha256, job_id, worker),
                )
                done = cur.rowcount == 1
            if done:
                con.execute(
                    "INSERT OR REPLACE INTO result_files VALUES (?, ?, ?, ?)",
                    (job_id, manifest_json, sha256, len(result)),
                )
        if written and not done:
            self.files.delete(job_id)
        return done

    def fail(self, job_id: str, worker: str | None, error: ErrorBody) -> bool:
        """Mark the job failed with ``error``. With ``worker``: only while it runs under that
        worker; with None: any queued or running job. A pending cancel wins (-> cancelled).
        True when this call ended the job."""
        with self._tx() as con:
            if self._finish_cancelled(con, job_id, worker):
                return True
            cur = con.execute(
                "UPDATE jobs SET state='failed', finished=?, error=?, worker=NULL, lease_until=NULL"
                " WHERE id=? AND state IN ('queued', 'running') AND (? IS NULL OR"
                " (worker=? AND state='running'))",
                (time.time(), error.model_dump_json(), job_id, worker, worker),
            )
            return cur.rowcount == 1

    def requeue(self, job_id: str, worker: str) -> bool:
        """Give a running job back to the queue (a draining server). Not a failed attempt:
        ``attempts`` is decremented. A job whose cancel was requested becomes cancelled."""
        with self._tx() as con:
            if self._finish_cancelled(con, job_id, worker):
                return True
            cur = con.execute(
                "UPDATE jobs SET state='queued', attempts=MAX(attempts-1, 0), worker=NULL,"
                " lease_until=NULL, progress_done=0, progress_total=0"
                " WHERE id=? AND worker=? AND state='running'",
                (job_id, worker),
            )
            return cur.rowcount == 1

    # -- the owner's cancel --------------------------------------------------------------------
    def cancel(self, job_id: str, owner: str) -> JobStatus | None:
        """Queued -> cancelled now; running -> ``cancel_requested`` (the worker stops it);
        terminal -> unchanged. None for an unknown job or another owner's."""
        with self._tx() as con:
            rec = self._record(con, job_id, owner)
            if rec is None:
                return None
            if rec.state == "queued":
                q = "UPDATE jobs SET state='cancelled', finished=? WHERE id=?"
                con.execute(q, (time.time(), job_id))
            elif rec.state not in TERMINAL_STATES:  # running
                con.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
            return self._status(con, self._record(con, job_id, None))  # type: ignore[arg-type]

    # -- crash recovery ------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """At server start: every running job is orphaned. Re-queue it (attempts kept) while
        ``attempts < max_attempts``, else fail it (``crashed``); a pending cancel -> cancelled.
        Result files the store does not name (a crash between writing and recording) go."""
        counts = self._reclaim(None, "the server stopped {n} times while running this job")
        kept = {row[0] for row in self._con().execute("SELECT job_id FROM result_files")}
        self.files.remove_others(kept)
        return counts

    def expire_leases(self) -> dict[str, int]:
        """As :meth:`recover`, for running jobs whose lease passed (a stuck or lost worker)."""
        return self._reclaim(time.time(), "the job's worker stopped responding {n} times")

    def _reclaim(self, before: float | None, message: str) -> dict[str, int]:
        out = {"requeued": 0, "failed": 0, "cancelled": 0}
        with self._tx() as con:
            rows = con.execute(
                "SELECT id, attempts, cancel_requested FROM jobs WHERE state='running'"
                " AND (? IS NULL OR lease_until IS NULL OR lease_until < ?)",
                (before, before),
            ).fetchall()
            now = time.time()
            for job_id, attempts, cancel in rows:
                if cancel:
                    state, err = "cancelled", None
                elif attempts < self.max_attempts:
                    state, err = "queued", None
                else:
                    state = "failed"
                    msg = message.format(n=attempts)
                    err = ErrorBody(error="crashed", message=msg, hint=_CRASH_HINT)
                finished = None if state == "queued" else now
                con.execute(
                    "UPDATE jobs SET state=?, error=?, finished=?, worker=NULL, lease_until=NULL,"
                    " progress_done=0, progress_total=0 WHERE id=?",
                    (state, err.model_dump_json() if err else None, finished, job_id),
                )
                out["requeued" if state == "queued" else state] += 1
        return out


def _migrate_from_1(con: sqlite3.Connection, files: ResultFiles) -> None:
    """Schema 1 kept results as blobs in the database: move them into files."""
    rows = con.execute("SELECT job_id, data, manifest, sha256 FROM results").fetchall()
    con.execute(
        "CREATE TABLE result_files (job_id TEXT PRIMARY KEY REFERENCES jobs (id),"
        " manifest TEXT NOT NULL, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL)"
    )
    for job_id, data, manifest, sha256 in rows:
        files.write(job_id, bytes(data))
        con.execute(
            "INSERT INTO result_files VALUES (?, ?, ?, ?)", (job_id, manifest, sha256, len(data))
        )
    con.execute("DROP TABLE results")
