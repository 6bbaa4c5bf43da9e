"""The durable job store of ``specsight serve``, behind one interface
(:class:`~.store_base.JobStoreBase`), in one of two databases:

- SQLite (:class:`JobStore`, the default): a file beside one server process, results in files
  beside it (:mod:`.sqlite_jobs`);
- PostgreSQL (:class:`~.postgres_jobs.PostgresJobStore`, a ``postgresql://`` URL and the
  ``postgres`` extra): one database that every ingress and replica can reach, results in it
  (:mod:`.postgres_jobs`).

:func:`open_job_store` picks by the name it is given. Either way a job answered 202 is on disk,
is never lost or recorded succeeded twice, runs at most ``max_attempts`` times when its server
dies or its lease passes, and a repeated ``Idempotency-Key`` finds the same job.
"""

from __future__ import annotations

import os
from typing import Any

from .postgres_db import is_postgres_url
from .records import JobRecord, QueueFull
from .sqlite_jobs import SCHEMA_VERSION, SqliteJobStore
from .store_base import RETENTION_S, JobStoreBase

__all__ = [
    "RETENTION_S",
    "SCHEMA_VERSION",
    "JobRecord",
    "JobStore",
    "JobStoreBase",
    "QueueFull",
    "SqliteJobStore",
    "is_postgres_url",
    "open_job_store",
]

#: the SQLite store, by its historical name: ``JobStore(path, retention_s=...)``
JobStore = SqliteJobStore


def open_job_store(db: str | os.PathLike[str], **options: Any) -> JobStoreBase:
    """The job store named by ``db``: PostgreSQL for a ``postgresql://`` (or ``postgres://``)
    URL, else a SQLite file at that path. ``options``: ``max_attempts``, ``lease_s``,
    ``retention_s``, ``results_dir`` (and ``pool_size`` for PostgreSQL)."""
    if is_postgres_url(db):
        from .postgres_jobs import PostgresJobStore

        return PostgresJobStore(str(db), **options)
    return SqliteJobStore(db, **options)
