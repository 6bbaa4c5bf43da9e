"""A PostgreSQL database shared by a process's threads, through psycopg 3 (imported only when a
``postgresql://`` URL is used: the optional ``postgres`` extra): a small pool of autocommit
connections, transactions that commit when they return, ``?`` parameters as the SQLite side
writes them, and a schema version kept in a ``meta`` table; the schema is created, under a
lock so that servers starting together do not race, when the database is new.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import RunError

__all__ = ["PostgresDatabase", "is_postgres_url", "redact_url"]

_SCHEMA_LOCK = 0x5350_4B53  # pg_advisory_xact_lock key: creating or checking the schema


def is_postgres_url(db: object) -> bool:
    """True for ``postgresql://...`` / ``postgres://...`` (a string, not a path)."""
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def psycopg_module() -> Any:
    """psycopg 3, or a RunError that says how to install it."""
    try:
        import psycopg
    except ImportError as exc:
        raise RunError(
            f"a PostgreSQL job store needs psycopg 3 ({exc})",
            hint="pip install 'specsight[postgres]'",
        ) from None
    return psycopg


@lru_cache(maxsize=256)
def _placeholders(sql: str) -> str:
    """``?`` parameters (shared SQL) as psycopg's ``%s`` (the SQL holds no other ? or %)."""
    return re.sub(r"\?", "%s", sql)


class _Connection:
    """A psycopg connection that takes the stores' ``?`` SQL."""

    def __init__(self, con: Any):
        self.raw = con

    def execute(self, sql: str, args: tuple | list = ()) -> Any:
        return self.raw.execute(_placeholders(sql), tuple(args))


class PostgresDatabase:
    """One database; subclasses give its schema (``schema``, ``schema_version``).
    At most ``pool_size`` connections are open at once; a thread waits for a free one."""

    schema = ""
    schema_version = 1

    def __init__(self, url: str, *, pool_size: int = 8, connect_timeout_s: float = 10.0):
        self._psycopg = psycopg_module()
        self.url = url
        self._connect_timeout = max(1, int(connect_timeout_s))
        self._idle: list[Any] = []
        self._slots = threading.BoundedSemaphore(pool_size)
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._create_schema()
        except BaseException:
            self.close()
            raise

    def _create_schema(self) -> None:
        with self._tx() as con:
            con.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            con.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:  # a new database; DDL only then (it would lock busy tables)
                for stmt in self.schema.split(";"):
                    if stmt.strip():
                        con.execute(stmt)
                version = (str(self.schema_version),)
                con.execute("INSERT INTO meta VALUES ('schema_version', ?)", version)
            elif int(row[0]) != self.schema_version:
                where = redact_url(self.url)
                raise RuntimeError(f"{where}: schema {row[0]}, expected {self.schema_version}")

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(
                self.url, autocommit=True, connect_timeout=self._connect_timeout
            )
        except self._psycopg.OperationalError as exc:
            raise RunError(
                f"cannot reach the job store {redact_url(self.url)}: {exc}".strip(),
                hint="check the --db URL and that PostgreSQL is running",
            ) from None

    @contextmanager
    def _borrow(self) -> Iterator[Any]:
        """A pooled connection for the duration of the block (broken ones are dropped)."""
        if not self._slots.acquire(timeout=60):
            raise RuntimeError("no job store connection became free within 60 s")
        con = None
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the job store is closed")
                con = self._idle.pop() if self._idle else None
            if con is None or con.closed:
                con = self._connect()
            yield con
        finally:
            if con is not None:
                ok = not con.closed and not con.broken
                ok = ok and con.info.transaction_status == self._psycopg.pq.TransactionStatus.IDLE
                with self._lock:
                    if ok and not self._closed:
                        self._idle.append(con)
                        con = None
                if con is not None:
                    with suppress(Exception):
                        con.close()
            self._slots.release()

    @contextmanager
    def _tx(self, immediate: bool = True) -> Iterator[_Connection]:
        """A transaction (READ COMMITTED; rows it changes are locked until it ends)."""
        with self._borrow() as con, con.transaction():
            yield _Connection(con)

    def _one(self, sql: str, *args: object) -> tuple | None:
        with self._borrow() as con:
            return _Connection(con).execute(sql, args).fetchone()

    def _update(self, sql: str, *args: object) -> bool:
        """Run one UPDATE (its own transaction); True when it changed exactly one job."""
        with self._borrow() as con:
            return _Connection(con).execute(sql, args).rowcount == 1

    def close(self) -> None:
        """Close the pooled connections; the store is unusable afterwards."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for con in idle:
            with suppress(Exception):
                con.close()
