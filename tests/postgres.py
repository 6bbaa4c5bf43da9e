"""A throwaway PostgreSQL server for the tests: the machine's ``initdb`` / ``pg_ctl`` /
``postgres`` (on PATH, or Debian's ``/usr/lib/postgresql/<version>/bin``) run a cluster in a
temporary folder, listening on a free loopback port, with trust authentication for the
superuser ``postgres``; every test gets a database of its own (:meth:`PostgresServer.database`).

``initdb`` and ``postgres`` refuse to run as root: as root, they run as the unprivileged user
``nobody`` (Python's ``subprocess`` switches user and group), and the folder is handed to it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PostgresServer", "find_binaries"]

_SUPERUSER = "postgres"


def find_binaries() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres (PATH first, then Debian's newest
    version), or None when PostgreSQL is missing."""

    def version(folder: Path) -> int:
        name = folder.parent.name
        return int(name) if name.isdigit() else 0

    folders = [Path(os.path.realpath(p)).parent for p in filter(None, [shutil.which("initdb")])]
    debian = (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    folders += sorted(debian, key=version, reverse=True)
    for folder in folders:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One cluster in a temporary folder; :meth:`stop` removes it."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="specsight-pg-"))  # under /tmp: reachable
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.port = 0
        self._user: dict[str, object] = {}
        if os.geteuid() == 0:  # initdb: "cannot be run as root"
            nobody = pwd.getpwnam("nobody")
            self._user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
            os.chown(self.folder, nobody.pw_uid, nobody.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            _SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )

    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        out = subprocess.run(
            [str(self.bin / tool), *args],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
            **self._user,  # type: ignore[arg-type]
        )
        if out.returncode != 0:
            raise RuntimeError(f"{tool} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def start(self) -> PostgresServer:
        """Start on a free loopback port (a few tries: another process may take the port)."""
        for _ in range(5):
            self.port = _free_port()
            options = (
                f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder}"
                " -c max_connections=300 -c fsync=off -c full_page_writes=off"
            )
            try:
                self._run(
                    "pg_ctl",
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                )
                return self
            except RuntimeError:
                with contextlib.suppress(Exception):
                    self.stop(remove=False)
        raise RuntimeError(f"PostgreSQL did not start:\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(sql)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh, empty database (dropped afterwards, connections and all); its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.admin(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self, *, remove: bool = True) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)
