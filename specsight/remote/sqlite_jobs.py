"""The default job store of ``specsight serve``: jobs in an embedded SQLite database
(:mod:`.sqlite_db`), their results in files beside it (:mod:`.result_files`); the logic it
shares with the PostgreSQL store is :mod:`.store_base`'s.

The database runs in WAL mode with ``synchronous=FULL``, so a job is on disk once
:meth:`SqliteJobStore.submit` returns (the server answers 202 only after that). After a crash,
:meth:`SqliteJobStore.recover` puts every running job back in the queue, or fails it once it
has been started ``max_attempts`` times; :meth:`SqliteJobStore.expire_leases` does the same,
while the server lives, for jobs whose lease passed. A job's result file is written and synced
before the transaction that records it (with the manifest and sha256) and marks the job
succeeded; results are deleted ``retention_s`` after their job finished.

One server process per database file: :meth:`SqliteJobStore.recover` assumes that no other
process is running jobs from it. Each thread gets its own connection; writes use
``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

from .result_files import ResultFiles
from .sqlite_db import SqliteDatabase
from .store_base import RETENTION_S, SERVER_STOPPED, WORKER_SILENT, JobStoreBase

__all__ = ["SCHEMA_VERSION", "SqliteJobStore"]

SCHEMA_VERSION = 2
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


class SqliteJobStore(SqliteDatabase, JobStoreBase):
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
        self._configure(max_attempts, lease_s, retention_s)
        self.files = ResultFiles(results_dir) if results_dir else ResultFiles.beside(path)
        try:
            super().__init__(path, {1: lambda con: _migrate_from_1(con, self.files)})
        except BaseException:
            name = os.fspath(path)
            if not results_dir and (name == ":memory:" or name.startswith("file:")):
                shutil.rmtree(self.files.folder, ignore_errors=True)  # its temporary folder
            raise

    @property
    def location(self) -> str:
        return self.path

    def result(self, job_id: str, owner: str) -> tuple[Path, str, str] | None:
        row = self._one(
            "SELECT r.manifest, r.sha256 FROM result_files r JOIN jobs j ON j.id = r.job_id"
            " WHERE r.job_id=? AND j.owner=? AND j.state='succeeded'",
            job_id,
            owner,
        )
        return None if row is None else (self.files.path(job_id), row[0], row[1])

    def expire_results(self, now: float | None = None) -> int:
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
        with self._tx() as con:
            done = self._mark_succeeded(con, job_id, worker, sha256)
            if done:
                con.execute(
                    "INSERT OR REPLACE INTO result_files VALUES (?, ?, ?, ?)",
                    (job_id, manifest_json, sha256, len(result)),
                )
        if written and not done:
            self.files.delete(job_id)
        return done

    def recover(self) -> dict[str, int]:
        """At server start: every running job is orphaned. Re-queue it (attempts kept) while
        ``attempts < max_attempts``, else fail it (``crashed``); a pending cancel -> cancelled.
        Result files the store does not name (a crash between writing and recording) go."""
        counts = self._reclaim(None, SERVER_STOPPED)
        kept = {row[0] for row in self._con().execute("SELECT job_id FROM result_files")}
        self.files.remove_others(kept)
        return counts

    def expire_leases(self) -> dict[str, int]:
        return self._reclaim(time.time(), WORKER_SILENT)

    def _reclaim(self, before: float | None, message: str) -> dict[str, int]:
        with self._tx() as con:
            q = "SELECT id, attempts, cancel_requested FROM jobs WHERE state='running'"
            if before is not None:
                q += " AND (lease_until IS NULL OR lease_until < ?)"
            rows = con.execute(q, () if before is None else (before,)).fetchall()
            return self._reclaim_rows(con, ((*row, message) for row in rows))


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
