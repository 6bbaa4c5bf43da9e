"""Run folders on disk, written atomically: the files go into a temporary folder beside the
target, which replaces the target only once everything is written, so an interrupted or failed
write (Ctrl-C, a full disk) never leaves a partial folder or mixes two runs' files.

Files and folders are fsynced before the rename, so a power cut cannot leave a renamed folder
of empty files. Temporary folders carry the writing process's id: one left behind by a killed
run (its process gone) is removed by the next write beside it, and a previous run caught
mid-replacement is put back first.

A target that holds another spec's run is replaced only with ``force``; a folder that is not a
run (other files) is never replaced. :func:`check_out_dir` makes these checks, and checks that
the parent folder can be written, before a run starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from ..errors import OutputError

__all__ = ["MANIFEST_FILE", "RESULTS_FILE", "check_out_dir", "write_folder"]

RESULTS_FILE = "results.safetensors"
MANIFEST_FILE = "manifest.json"


def _recorded_spec(folder: Path) -> tuple[str | None, str | None] | None:
    """(spec sha256, spec name) of the run in ``folder``; None when it is no run folder."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        spec = manifest["spec"]
        return spec.get("sha256"), spec.get("name")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_out_dir(folder: Path, spec_sha256: str, *, force: bool = False) -> None:
    """Raise OutputError when ``folder`` cannot take this spec's run."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file", hint="name a folder")
    if folder.is_dir() and any(folder.iterdir()):
        recorded = _recorded_spec(folder)
        if recorded is None:
            raise OutputError(
                f"--out {folder} holds files but no run of specsight",
                hint="choose an empty or new folder; specsight never replaces other files",
            )
        sha, name = recorded
        if sha != spec_sha256 and not force:
            which = f"'{name}'" if name else f"sha256 {str(sha)[:12]}"
            raise OutputError(
                f"--out {folder} holds a run of another spec ({which})",
                hint="choose another folder, or pass --force to replace that run",
            )
    parent = _existing_parent(folder)
    if not parent.is_dir():
        raise OutputError(f"cannot write --out {folder}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write --out {folder}: {parent} is not writable")


def _existing_parent(folder: Path) -> Path:
    parent = folder.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _readable(path: Path) -> None:
    """Files readable by everyone (0644), folders (a run's ``circuits/``) listable (0755),
    each synced to disk."""
    if path.is_dir():
        for inner in path.iterdir():
            _readable(inner)
        path.chmod(0o755)
    else:
        path.chmod(0o644)
    _fsync(path)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk; a file system that cannot fsync
    a folder is left as it is."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _writer_pid(path: Path, prefix: str) -> int | None:
    """The process id in a temporary folder's name (``.run.tmp-1234-abcd``), None when none."""
    head = path.name[len(prefix) :].partition("-")[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def clean_stale(folder: Path) -> list[Path]:
    """Remove the temporary folders that killed writes of ``folder`` left beside it (their
    process is gone); a previous run moved aside by a write that died is put back first when
    ``folder`` is missing. Returns what was removed."""
    removed = []
    for kind in ("old", "tmp"):  # the previous run back before anything is deleted
        prefix = f".{folder.name}.{kind}-"
        for path in sorted(folder.parent.glob(prefix + "*")):
            pid = _writer_pid(path, prefix)
            if not path.is_dir() or pid is None or _alive(pid):
                continue
            if kind == "old" and (path / "run").is_dir() and not folder.exists():
                with contextlib.suppress(OSError):
                    os.replace(path / "run", folder)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def write_folder(
    folder: Path, write: Callable[[Path], None], spec_sha256: str, *, force: bool = False
) -> Path:
    """Run ``write(tmp)`` into a temporary folder, then make it ``folder`` (files 0644)."""
    if folder.parent.is_dir():
        clean_stale(folder)
    check_out_dir(folder, spec_sha256, force=force)
    pid = os.getpid()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{pid}-", dir=folder.parent))
    except OSError as exc:
        raise OutputError(f"cannot write --out {folder}: {exc.strerror or exc}") from None
    old: Path | None = None
    try:
        write(tmp)
        for path in tmp.iterdir():
            _readable(path)
        tmp.chmod(0o755)  # mkdtemp makes it private
        _fsync(tmp)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-{pid}-", dir=folder.parent))
            os.replace(folder, old / "run")
        os.replace(tmp, folder)
        _fsync(folder.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():  # put the previous run back
            with contextlib.suppress(OSError):
                os.replace(old / "run", folder)
        if isinstance(exc, OSError | SafetensorError):
            reason = getattr(exc, "strerror", None) or exc
            raise OutputError(f"cannot write --out {folder}: {reason}") from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return folder
