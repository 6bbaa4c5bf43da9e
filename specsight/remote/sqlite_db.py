"""A SQLite database shared by a process's threads: WAL mode and ``synchronous=FULL`` (a
commit is on disk when it returns), one connection per thread, ``BEGIN IMMEDIATE``
transactions, a private file, and a schema version kept in a ``meta`` table.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

__all__ = ["SqliteDatabase"]


class SqliteDatabase:
    """One database file; subclasses give its schema (``schema``, ``schema_version``) and the
    migrations from older versions (``migrations``: version -> function of a connection)."""

    schema = ""
    schema_version = 1

    def __init__(
        self,
        path: str | os.PathLike,
        migrations: dict[int, Callable[[sqlite3.Connection], None]] | None = None,
    ):
        self.path = os.fspath(path)
        if self.path == ":memory:" or self.path.startswith("file:"):
            raise ValueError("a shared database needs a file path (each thread connects)")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        if not os.path.exists(self.path):  # private: the -wal/-shm files follow suit
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        con = self._con()
        if con.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode")
        with self._tx() as c:
            found = _schema_version(c)
            if found is not None and found != self.schema_version:
                migrate = (migrations or {}).get(found)
                if migrate is None:
                    raise RuntimeError(
                        f"{self.path}: schema {found}, expected {self.schema_version}"
                    )
                migrate(c)
            for stmt in self.schema.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            c.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (self.schema_version,)
            )

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the job store is closed")
                con = sqlite3.connect(
                    self.path, timeout=30.0, isolation_level=None, check_same_thread=False
                )
                con.execute("PRAGMA busy_timeout=30000")
                con.execute("PRAGMA synchronous=FULL")
                con.execute("PRAGMA foreign_keys=ON")
                self._conns.append(con)
            self._local.con = con
        return con

    @contextmanager
    def _tx(self, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        con = self._con()
        con.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise

    def _one(self, sql: str, *args: object) -> tuple | None:
        return self._con().execute(sql, args).fetchone()

    def _update(self, sql: str, *args: object) -> bool:
        """Run one UPDATE in its own transaction; True when it changed exactly one job."""
        with self._tx() as con:
            return con.execute(sql, args).rowcount == 1

    def close(self) -> None:
        """Close every thread's connection; the store is unusable afterwards."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for con in conns:
            with suppress(sqlite3.Error):
                con.close()
        self._local = threading.local()

    def __enter__(self) -> SqliteDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _schema_version(con: sqlite3.Connection) -> int | None:
    """The schema version a database holds (None: a new one)."""
    con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return None if row is None else int(row[0])
