"""The job store that every ingress and replica of ``specsight serve`` can share: jobs, and their
results as ``bytea``, in PostgreSQL (:mod:`.postgres_db`), with the same guarantees as the
SQLite store (the logic they share is :mod:`.store_base`'s).

- Durable: a submit's transaction has committed before the server answers 202.
- Idempotent: a submit takes a transaction-scoped advisory lock, so the check for the owner's
  ``Idempotency-Key`` (and the queue limits) and the insert cannot interleave with another
  replica's; the unique index on ``(owner, idempotency_key)`` backs it up.
- One claim per job: a claim locks the queued rows it takes with ``FOR UPDATE SKIP LOCKED``
  (another replica's claim skips them) and moves them to ``running`` in the same transaction.
- A job is recorded succeeded once, with its result, in one transaction, and only under the
  worker that holds it.
- Leases and liveness: a running job's lease is extended by its worker's heartbeats. Each
  worker also holds a session advisory lock (keyed by its name) on a connection of its own for
  as long as its server lives; PostgreSQL drops it when that server dies (SIGKILL included).
  :meth:`~PostgresJobStore.recover` and :meth:`~PostgresJobStore.expire_leases` reclaim the
  running jobs whose lease passed *or* whose worker's lock is gone, never those of a live
  replica: back to the queue, or failed (``crashed``) after ``max_attempts`` starts.

A result is downloaded from the database into a file in a local cache folder the first time
it is asked for (in chunks, its sha256 checked), so that a download streams from disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .postgres_db import PostgresDatabase, redact_url
from .result_files import ResultFiles
from .store_base import RETENTION_S, SERVER_STOPPED, WORKER_SILENT, JobStoreBase

__all__ = ["PG_SCHEMA_VERSION", "PostgresJobStore"]

PG_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL, model TEXT NOT NULL, state TEXT NOT NULL, spec_json TEXT NOT NULL,
    spec_file TEXT, idempotency_key TEXT, result_estimate BIGINT NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, created DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION, finished DOUBLE PRECISION,
    progress_done BIGINT NOT NULL DEFAULT 0, progress_total BIGINT NOT NULL DEFAULT 0,
    error TEXT, result_sha256 TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker TEXT, lease_until DOUBLE PRECISION
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT PRIMARY KEY REFERENCES jobs (id), manifest TEXT NOT NULL, sha256 TEXT NOT NULL,
    bytes BIGINT NOT NULL, data BYTEA NOT NULL
);
ALTER TABLE results ALTER COLUMN data SET STORAGE EXTERNAL
"""
#: advisory lock keys (first half): submits, and the workers alive (second half: the name's)
_SUBMIT_LOCK = 0x5350_4B51
_WORKER_LOCK = 0x5350_4B57
#: a worker's liveness lock (psycopg parameters: the key, the worker's name)
_LOCK_WORKER = "SELECT pg_try_advisory_lock(%s, ('x' || substr(md5(%s), 1, 8))::bit(32)::int)"
_DEAD = (
    "NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype='advisory' AND l.granted"
    " AND l.database=(SELECT oid FROM pg_database WHERE datname=current_database())"
    f" AND l.classid::bigint={_WORKER_LOCK} AND l.objsubid=2"
    " AND l.objid::bigint=('x' || substr(md5(j.worker), 1, 8))::bit(32)::bigint)"
)
_CHUNK = 8 << 20  # bytes of a result read from the database at a time
_CHECK_S = 2.0  # seconds between checks that the liveness locks' connection still works


class PostgresJobStore(PostgresDatabase, JobStoreBase):
    """Jobs and results in a PostgreSQL database (a URL); safe to share between threads and
    between processes on any machine that reaches the database."""

    schema = _SCHEMA
    schema_version = PG_SCHEMA_VERSION
    _row_lock = " FOR UPDATE"
    _skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self,
        url: str,
        *,
        max_attempts: int = 3,
        lease_s: float = 30.0,
        results_dir: str | os.PathLike | None = None,
        retention_s: float = RETENTION_S,
        pool_size: int = 8,
    ):
        self._configure(max_attempts, lease_s, retention_s)
        self._results_dir = results_dir  # None: a temporary folder of its own
        self._files: ResultFiles | None = None
        self._files_lock = threading.Lock()
        self._alive: Any = None  # the connection holding the workers' liveness locks
        self._held: set[str] = set()
        self._alive_lock = threading.Lock()
        self._alive_checked = 0.0  # time.monotonic() of the last check that it still works
        super().__init__(url, pool_size=pool_size)

    @property
    def location(self) -> str:
        return redact_url(self.url)

    @property
    def files(self) -> ResultFiles:
        """The cache of downloaded results (created when first needed)."""
        with self._files_lock:
            if self._files is None:
                folder = self._results_dir or tempfile.mkdtemp(prefix="specsight-results-")
                self._files = ResultFiles(folder)
            return self._files

    # -- liveness -------------------------------------------------------------------------------
    def _claiming(self, worker: str) -> None:
        """Hold ``worker``'s liveness lock before its first claim commits. Checked every few
        seconds (claims and heartbeats come often): a lost connection lost its locks, which
        are then taken again on a new one."""
        with self._alive_lock:
            if self._alive is not None and time.monotonic() - self._alive_checked > _CHECK_S:
                with contextlib.suppress(Exception):
                    self._alive.execute("SELECT 1")
                self._alive_checked = time.monotonic()
            if self._alive is not None and (self._alive.closed or self._alive.broken):
                with contextlib.suppress(Exception):
                    self._alive.close()
                self._alive, lost = None, self._held
                self._held = set()
            else:
                lost = set()
            if worker in self._held and self._alive is not None:
                return
            if self._alive is None:
                self._alive, self._alive_checked = self._connect(), time.monotonic()
            for name in sorted(lost | {worker}):
                self._alive.execute(_LOCK_WORKER, (_WORKER_LOCK, name))  # or held elsewhere
                self._held.add(name)

    def heartbeat(self, job_id: str, worker: str) -> bool:
        if worker in self._held:  # a long run keeps its worker's lock checked too
            self._claiming(worker)
        return super().heartbeat(job_id, worker)

    def _lock_submits(self, con: Any) -> None:
        con.execute("SELECT pg_advisory_xact_lock(?, 0)", (_SUBMIT_LOCK,))

    # -- results --------------------------------------------------------------------------------
    def succeed(
        self, job_id: str, worker: str, *, result: bytes, manifest_json: str, sha256: str
    ) -> bool:
        """Record the result and mark the job succeeded in one transaction."""
        with self._tx() as con:
            done = self._mark_succeeded(con, job_id, worker, sha256)
            if done:
                con.raw.execute(
                    "INSERT INTO results (job_id, manifest, sha256, bytes, data)"
                    " VALUES (%s, %s, %s, %s, %b) ON CONFLICT (job_id) DO UPDATE SET"
                    " manifest=EXCLUDED.manifest, sha256=EXCLUDED.sha256,"
                    " bytes=EXCLUDED.bytes, data=EXCLUDED.data",
                    (job_id, manifest_json, sha256, len(result), result),
                )
        return done

    def result(self, job_id: str, owner: str) -> tuple[Path, str, str] | None:
        row = self._one(
            "SELECT r.manifest, r.sha256, r.bytes FROM results r JOIN jobs j ON j.id = r.job_id"
            " WHERE r.job_id=? AND j.owner=? AND j.state='succeeded'",
            job_id,
            owner,
        )
        if row is None:
            return None
        manifest, sha256, size = row
        path = self.files.path(job_id)
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == size:
                return path, manifest, sha256
        return (self._download(job_id, path, sha256), manifest, sha256)

    def _download(self, job_id: str, path: Path, sha256: str) -> Path:
        """Copy a result from the database into the cache (a temporary name, then renamed)."""
        fd, tmp = tempfile.mkstemp(prefix=f"{job_id}.", suffix=".tmp", dir=self.files.folder)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, self._tx() as con:
                q = "SELECT substring(data FROM %s FOR %s) FROM results WHERE job_id=%s"
                offset = 1
                while True:
                    row = con.raw.execute(q, (offset, _CHUNK, job_id), binary=True).fetchone()
                    if row is None:
                        raise RuntimeError(f"the result of job {job_id} was deleted")
                    chunk = bytes(row[0])
                    out.write(chunk)
                    digest.update(chunk)
                    offset += len(chunk)
                    if len(chunk) < _CHUNK:
                        break
            if digest.hexdigest() != sha256:
                raise RuntimeError(f"the stored result of job {job_id} does not match its sha256")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def expire_results(self, now: float | None = None) -> int:
        before = (time.time() if now is None else now) - self.retention_s
        with self._tx() as con:
            rows = con.execute(
                "DELETE FROM results r USING jobs j WHERE j.id = r.job_id AND j.finished < ?"
                " RETURNING r.job_id",
                (before,),
            ).fetchall()
        cache = self._files  # downloads of results that expired (here or on another replica)
        if cache is not None and (rows or any(cache.folder.iterdir())):
            kept = {r[0] for r in self._all("SELECT job_id FROM results")}
            cache.remove_others(kept)
        return len(rows)

    # -- reclaiming ---------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """At server start: reclaim the running jobs whose server died (its workers' locks
        are gone) or whose lease passed; a live replica's jobs keep running. As with SQLite,
        no worker of this store runs yet: jobs claimed through it count as orphaned too."""
        self._release_workers()
        return self._reclaim()

    def expire_leases(self) -> dict[str, int]:
        """Reclaim the running jobs whose lease passed, or whose server died."""
        return self._reclaim()

    def _reclaim(self) -> dict[str, int]:
        with self._tx() as con:
            rows = con.execute(
                "SELECT j.id, j.attempts, j.cancel_requested, j.lease_until IS NULL OR"
                " j.lease_until < ? FROM jobs j WHERE j.state='running' AND (j.lease_until IS"
                f" NULL OR j.lease_until < ? OR j.worker IS NULL OR {_DEAD})"
                " ORDER BY j.seq FOR UPDATE OF j SKIP LOCKED",
                (time.time(),) * 2,
            ).fetchall()
            reasons = (
                (i, n, c, WORKER_SILENT if late else SERVER_STOPPED) for i, n, c, late in rows
            )
            return self._reclaim_rows(con, reasons)

    def _release_workers(self) -> None:
        """Drop this store's liveness locks (now, not when their connection ends)."""
        with self._alive_lock:
            alive, self._alive, self._held = self._alive, None, set()
        if alive is not None:
            with contextlib.suppress(Exception):
                alive.execute("SELECT pg_advisory_unlock_all()")
            with contextlib.suppress(Exception):
                alive.close()

    def close(self) -> None:
        self._release_workers()
        super().close()
        if self._files is not None and self._results_dir is None:
            shutil.rmtree(self._files.folder, ignore_errors=True)
