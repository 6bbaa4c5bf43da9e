"""What every job store of ``specsight serve`` does, written once: :class:`JobStoreBase`, the
interface the server and its worker use, with the logic the SQLite store (:mod:`.sqlite_jobs`)
and the PostgreSQL store (:mod:`.postgres_jobs`) share. A store gives its transactions
(``_tx``), where results live, and how running jobs are reclaimed; the SQL here is portable
(``?`` parameters; PostgreSQL's connections turn them into its own).

A job moves ``queued -> running -> succeeded | failed | cancelled``; ``queued -> cancelled``
directly. A running job holds a lease (``lease_until``) that its worker extends with
:meth:`~JobStoreBase.heartbeat`; a job whose lease passed, or whose server died, goes back to
the queue, and fails (``crashed``) once it has been started ``max_attempts`` times. No job
vanishes; a job is recorded succeeded at most once (only under the worker that holds it).

API keys are never stored: the server passes ``owner``, already a hash of the key. Every
owner-facing read (:meth:`~JobStoreBase.get`, :meth:`~JobStoreBase.status`,
:meth:`~JobStoreBase.result`, :meth:`~JobStoreBase.cancel`) answers ``None`` for another
owner's job, as for an unknown one.
"""

from __future__ import annotations

import math
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from .protocol import TERMINAL_STATES, ErrorBody, JobStatus
from .records import JobRecord, QueueFull

__all__ = ["RETENTION_S", "SERVER_STOPPED", "STATES", "WORKER_SILENT", "JobStoreBase"]

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
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
#: the messages of a job failed as ``crashed``: its server stopped, or its lease passed
SERVER_STOPPED = "the server stopped {n} times while running this job"
WORKER_SILENT = "the job's worker stopped responding {n} times"


class JobStoreBase(ABC):
    """The durable job queue; safe to share between threads."""

    max_attempts: int
    lease_s: float
    retention_s: float
    #: appended to a SELECT of the rows a transaction goes on to change (PostgreSQL's row
    #: locks; SQLite's write transactions already exclude each other)
    _row_lock = ""
    #: appended to the SELECT of the jobs a claim takes (rows other claims hold are skipped)
    _skip_locked = ""

    def _configure(self, max_attempts: int, lease_s: float, retention_s: float) -> None:
        if max_attempts < 1 or lease_s <= 0:
            raise ValueError("max_attempts must be >= 1 and lease_s > 0")
        self.max_attempts, self.lease_s, self.retention_s = max_attempts, lease_s, retention_s

    # -- what a store provides ----------------------------------------------------------------
    @property
    @abstractmethod
    def location(self) -> str:
        """Where the jobs are, for logs (no password)."""

    @abstractmethod
    def _tx(self, immediate: bool = True) -> AbstractContextManager[Any]:
        """A transaction: a connection whose ``execute(sql, args)`` gives a cursor."""

    @abstractmethod
    def _one(self, sql: str, *args: object) -> tuple | None: ...

    @abstractmethod
    def _update(self, sql: str, *args: object) -> bool:
        """One UPDATE in its own transaction; True when it changed exactly one job."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def result(self, job_id: str, owner: str) -> tuple[Path, str, str] | None:
        """``(results.safetensors file, manifest json, sha256)`` of a succeeded job of
        ``owner`` whose result is still kept."""

    @abstractmethod
    def succeed(
        self, job_id: str, worker: str, *, result: bytes, manifest_json: str, sha256: str
    ) -> bool:
        """Keep the result and mark the job succeeded, atomically. False (nothing kept) when
        the job no longer runs under ``worker``; a job whose cancel was requested becomes
        cancelled instead (also False)."""

    @abstractmethod
    def expire_results(self, now: float | None = None) -> int:
        """Delete the results of jobs finished more than ``retention_s`` ago; the count (their
        jobs stay, succeeded, with the result gone)."""

    @abstractmethod
    def recover(self) -> dict[str, int]:
        """At server start: put the jobs its stopped predecessor ran back in the queue (or
        fail them, ``crashed``, after ``max_attempts``); a pending cancel -> cancelled."""

    @abstractmethod
    def expire_leases(self) -> dict[str, int]:
        """As :meth:`recover`, for running jobs whose lease passed (a stuck or lost worker)."""

    def _claiming(self, worker: str) -> None:
        """Called before ``worker`` claims jobs (PostgreSQL marks the worker alive)."""
        return None  # SQLite: one server per file, nothing to mark

    def _lock_submits(self, con: Any) -> None:
        """Called first in a submit's transaction: submits must not interleave."""
        return None  # SQLite: BEGIN IMMEDIATE already excludes other writers

    def __enter__(self) -> JobStoreBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------------
    def _record(
        self, con: Any, job_id: str, owner: str | None, lock: bool = False
    ) -> JobRecord | None:
        q = f"SELECT {_COLS} FROM jobs WHERE id=?" + ("" if owner is None else " AND owner=?")
        q += self._row_lock if lock else ""
        row = con.execute(q, (job_id,) if owner is None else (job_id, owner)).fetchone()
        return JobRecord.from_row(row) if row else None

    def _status(self, con: Any, rec: JobRecord) -> JobStatus:
        pos = None
        if rec.state == "queued":
            q = "SELECT COUNT(*) FROM jobs WHERE state='queued' AND seq<?"
            pos = con.execute(q, (rec.seq,)).fetchone()[0]
        return rec.to_status(pos)

    def _all(self, sql: str, *args: object) -> list[tuple]:
        with self._tx(immediate=False) as con:
            return list(con.execute(sql, args).fetchall())

    def get(self, job_id: str, owner: str) -> JobRecord | None:
        """The job, or None when unknown or another owner's."""
        with self._tx(immediate=False) as con:
            return self._record(con, job_id, owner)

    def record(self, job_id: str) -> JobRecord | None:
        """The job whoever owns it: for the server's own processes (a replica running one
        shard of a job another replica claimed), never for a request."""
        with self._tx(immediate=False) as con:
            return self._record(con, job_id, None)

    def status(self, job_id: str, owner: str) -> JobStatus | None:
        """The wire status with ``queue_position`` (0 = next) for a queued job."""
        with self._tx(immediate=False) as con:
            rec = self._record(con, job_id, owner)
            return self._status(con, rec) if rec else None

    def queued_count(self) -> int:
        return self._one("SELECT COUNT(*) FROM jobs WHERE state='queued'")[0]  # type: ignore[index]

    def active_jobs(self, model: str) -> int:
        """Queued and running jobs of ``model`` (what its replicas have to do)."""
        q = "SELECT COUNT(*) FROM jobs WHERE model=? AND state IN ('queued', 'running')"
        return self._one(q, model)[0]  # type: ignore[index]

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, zeros included)."""
        out = dict.fromkeys(STATES, 0)
        out.update(self._all("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        return out

    # -- submitting ---------------------------------------------------------------------------
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
            self._lock_submits(con)
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

    def _retry_after(self, con: Any) -> int:
        """Seconds until a queue slot likely frees: the mean of the last 20 run durations."""
        q = (
            "SELECT AVG(finished - started) FROM (SELECT finished, started FROM jobs WHERE "
            "state='succeeded' AND started IS NOT NULL ORDER BY finished DESC LIMIT 20) AS recent"
        )
        mean = con.execute(q).fetchone()[0]
        return 5 if mean is None else max(1, min(300, math.ceil(mean)))

    # -- the worker side ---------------------------------------------------------------------
    def claim(self, worker: str, *, model: str | None = None, limit: int = 1) -> list[JobRecord]:
        """Move up to ``limit`` oldest queued jobs (all of one model: ``model``, or the oldest
        job's) to running under ``worker`` with a fresh lease; ``attempts`` += 1.

        A job run before (its batch crashed, or its lease ran out) runs alone: the job that
        crashed a batch then crashes only itself, and the others succeed."""
        self._claiming(worker)
        with self._tx() as con:
            where, args = "state='queued'", ()
            if model is not None:
                where, args = "state='queued' AND model=?", (model,)
            q = f"SELECT id, model, attempts FROM jobs WHERE {where} ORDER BY seq LIMIT 1"
            first = con.execute(q + self._skip_locked, args).fetchone()
            if first is None:
                return []
            if first[2] > 0:
                ids = [first[0]]
            else:
                q = (
                    "SELECT id FROM jobs WHERE state='queued' AND model=? AND attempts=0"
                    " ORDER BY seq LIMIT ?"
                )
                ids = [r[0] for r in con.execute(q + self._skip_locked, (first[1], max(0, limit)))]
            now = time.time()
            taken = []
            for job_id in ids:
                cur = con.execute(
                    "UPDATE jobs SET state='running', attempts=attempts+1, worker=?,"
                    " lease_until=?, started=COALESCE(started, ?), progress_done=0,"
                    " progress_total=0 WHERE id=? AND state='queued'",
                    (worker, now + self.lease_s, now, job_id),
                )
                if cur.rowcount == 1:
                    taken.append(job_id)
            return [self._record(con, i, None) for i in taken]  # type: ignore[misc]

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

    def _finish_cancelled(self, con: Any, job_id: str, worker: str | None) -> bool:
        q = (
            "UPDATE jobs SET state='cancelled', finished=?, worker=NULL, lease_until=NULL"
            " WHERE id=? AND state='running' AND cancel_requested=1"
        )
        args: tuple = (time.time(), job_id)
        if worker is not None:
            q, args = q + " AND worker=?", (*args, worker)
        return con.execute(q, args).rowcount == 1

    def acknowledge_cancel(self, job_id: str, worker: str) -> bool:
        """The worker stopped a job whose cancel was requested: mark it cancelled."""
        with self._tx() as con:
            return self._finish_cancelled(con, job_id, worker)

    def _mark_succeeded(self, con: Any, job_id: str, worker: str, sha256: str) -> bool:
        """In a transaction: the job succeeded, when it still runs under ``worker`` and no
        cancel is pending (then it becomes cancelled). True when it is now succeeded."""
        if self._finish_cancelled(con, job_id, worker):
            return False
        cur = con.execute(
            "UPDATE jobs SET state='succeeded', finished=?, result_sha256=?, worker=NULL,"
            " lease_until=NULL WHERE id=? AND worker=? AND state='running'",
            (time.time(), sha256, job_id, worker),
        )
        return cur.rowcount == 1

    def fail(self, job_id: str, worker: str | None, error: ErrorBody) -> bool:
        """Mark the job failed with ``error``. With ``worker``: only while it runs under that
        worker; with None: any queued or running job. A pending cancel wins (-> cancelled).
        True when this call ended the job."""
        with self._tx() as con:
            if self._finish_cancelled(con, job_id, worker):
                return True
            q = (
                "UPDATE jobs SET state='failed', finished=?, error=?, worker=NULL, lease_until=NULL"
                " WHERE id=? AND state IN ('queued', 'running')"
            )
            args: tuple = (time.time(), error.model_dump_json(), job_id)
            if worker is not None:
                q, args = q + " AND worker=? AND state='running'", (*args, worker)
            return con.execute(q, args).rowcount == 1

    def fail_unserved(self, models: set[str], error: ErrorBody) -> int:
        """Fail the queued jobs of models not in ``models`` (a cluster started without a model
        some queued jobs wait for: nothing would ever claim them); the count."""
        rows = self._all("SELECT id, model FROM jobs WHERE state='queued'")
        return sum(self.fail(job, None, error) for job, model in rows if model not in models)

    def requeue(self, job_id: str, worker: str) -> bool:
        """Give a running job back to the queue (a draining server). Not a failed attempt:
        ``attempts`` is decremented. A job whose cancel was requested becomes cancelled."""
        with self._tx() as con:
            if self._finish_cancelled(con, job_id, worker):
                return True
            cur = con.execute(
                "UPDATE jobs SET state='queued', attempts=CASE WHEN attempts > 0 THEN"
                " attempts - 1 ELSE 0 END, worker=NULL, lease_until=NULL, progress_done=0,"
                " progress_total=0 WHERE id=? AND worker=? AND state='running'",
                (job_id, worker),
            )
            return cur.rowcount == 1

    # -- the owner's cancel --------------------------------------------------------------------
    def cancel(self, job_id: str, owner: str) -> JobStatus | None:
        """Queued -> cancelled now; running -> ``cancel_requested`` (the worker stops it);
        terminal -> unchanged. None for an unknown job or another owner's."""
        with self._tx() as con:
            rec = self._record(con, job_id, owner, lock=True)
            if rec is None:
                return None
            if rec.state == "queued":
                q = "UPDATE jobs SET state='cancelled', finished=? WHERE id=?"
                con.execute(q, (time.time(), job_id))
            elif rec.state not in TERMINAL_STATES:  # running
                con.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
            return self._status(con, self._record(con, job_id, None))  # type: ignore[arg-type]

    # -- reclaiming running jobs -----------------------------------------------------------------
    def _reclaim_rows(self, con: Any, rows: Iterator[tuple[str, int, int, str]]) -> dict[str, int]:
        """In a transaction: requeue, fail or cancel each running job of ``rows`` (id,
        attempts, cancel_requested, the message of a ``crashed`` failure); the counts."""
        out = {"requeued": 0, "failed": 0, "cancelled": 0}
        now = time.time()
        for job_id, attempts, cancel, message in rows:
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
                " progress_done=0, progress_total=0 WHERE id=? AND state='running'",
                (state, err.model_dump_json() if err else None, finished, job_id),
            )
            out["requeued" if state == "queued" else state] += 1
        return out
