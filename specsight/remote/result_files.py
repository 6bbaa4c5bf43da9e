"""Finished jobs' results as files beside the job store, not rows in it: the database stays
small, a download streams from disk instead of holding the result in memory, and results past
their retention period are deleted.

A file is written under a temporary name, synced, and renamed into place before the job is
marked succeeded, so a result the store names is whole. Files are private (0600), named by job
id (URL-safe characters only).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

__all__ = ["ResultFiles"]

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ResultFiles:
    """The folder of result files of one job store."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    @classmethod
    def beside(cls, store_path: str | os.PathLike[str]) -> ResultFiles:
        """The folder ``<store>.results`` beside a store's database file; a temporary folder
        for an in-memory database (not a ':memory:.results' folder in the working directory)."""
        name = os.fspath(store_path)
        if name == ":memory:" or name.startswith("file:"):
            return cls(tempfile.mkdtemp(prefix="specsight-results-"))
        return cls(f"{name}.results")

    def path(self, job_id: str) -> Path:
        if not _JOB_ID.fullmatch(job_id):  # ids come from the store; never a path
            raise ValueError(f"not a job id: {job_id!r}")
        return self.folder / f"{job_id}.safetensors"

    def write(self, job_id: str, data: bytes) -> None:
        """Write ``data`` durably as the job's result (replacing an earlier attempt's)."""
        target = self.path(job_id)
        tmp = target.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._sync_folder()

    def delete(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(job_id).unlink()

    def remove_others(self, keep: set[str]) -> int:
        """Delete files of jobs not in ``keep`` (left by a crash before the store recorded
        them, or by a failed write); the count."""
        removed = 0
        for path in self.folder.iterdir():
            job_id = path.name.split(".", 1)[0]
            if path.suffix in (".safetensors", ".tmp") and job_id not in keep:
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
        return removed

    def _sync_folder(self) -> None:
        with contextlib.suppress(OSError):  # not every file system syncs directories
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
