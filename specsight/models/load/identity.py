"""The identity of a model folder's weights without hashing every tensor after loading: the
sha256 of its checkpoint files (weights, config), each hashed once.

A file's sha256 is streamed from disk through one reused buffer (files in parallel threads:
hashlib releases the GIL), and cached by absolute path, size, modification and change times
and inode in ``<cache>/file-hashes.json``, so loading the same checkpoint again hashes nothing.
A file of the Hugging Face cache is a link to a blob named by its own sha256 (large files):
that name is used as is. The identity is the sha256 over the sorted (file name, file sha256)
pairs: any changed byte of any shard changes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..catalog import cache_dir

__all__ = ["checkpoint_files", "checkpoint_identity", "HashStats"]

#: what a checkpoint's identity covers: weight files and what shapes their meaning
_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "config.json")
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LOCK = threading.Lock()


class HashStats:
    """Counters of the last :func:`checkpoint_identity` call (what tests and benches read)."""

    files = 0
    hashed_files = 0
    hashed_bytes = 0
    from_cache = 0
    from_blob_names = 0


def checkpoint_files(folder: Path) -> list[Path]:
    """The files whose bytes make the model: weights in any format, and its config."""
    found = {p for pattern in _PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def _cache_path() -> Path:
    return cache_dir() / "file-hashes.json"


def _read_cache() -> dict[str, dict]:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(entries: dict[str, dict]) -> None:
    path = _cache_path()
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".file-hashes.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(entries, sort_keys=True))
        os.replace(tmp, path)


def _stream_sha256(path: Path) -> str:
    """The file's sha256, read into one reused buffer (no allocation per block)."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _blob_sha256(path: Path) -> str | None:
    """The sha256 a Hugging Face cache file's blob is named by (None: not such a file)."""
    if not path.is_symlink():
        return None
    target = Path(os.readlink(path))
    name = target.name
    return name if target.parent.name == "blobs" and _SHA256.fullmatch(name) else None


def checkpoint_identity(folder: Path, *, files: list[Path] | None = None, workers: int = 4) -> str:
    """sha256 identity of ``folder``'s checkpoint files (see the module docstring).

    ``files``: the list taken when the weights were loaded; one of them gone by now raises
    (the identity never covers a subset of the shards that were loaded)."""
    files = checkpoint_files(folder) if files is None else files
    if not files:
        raise FileNotFoundError(f"no weight files in {folder}")
    with _LOCK:
        cache = _read_cache()
    stats = dict.fromkeys(("hashed_files", "hashed_bytes", "from_cache", "from_blob_names"), 0)
    stats["files"] = len(files)
    known: dict[Path, str] = {}
    todo: list[tuple[Path, str, dict]] = []
    for path in files:
        blob = _blob_sha256(path)
        if blob is not None:
            known[path] = blob
            stats["from_blob_names"] += 1
            continue
        real = path.resolve()
        info = real.stat()
        key = {  # a copy keeping the mtime (cp -p, rsync -t) still changes inode and ctime
            "size": info.st_size,
            "mtime_ns": info.st_mtime_ns,
            "ctime_ns": info.st_ctime_ns,
            "inode": info.st_ino,
        }
        entry = cache.get(str(real))
        if entry and all(entry.get(k) == v for k, v in key.items()):
            known[path] = entry["sha256"]
            stats["from_cache"] += 1
        else:
            todo.append((path, str(real), key))
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            hashes = list(pool.map(lambda item: _stream_sha256(item[0]), todo))
        fresh = {}
        for (path, real, key), sha in zip(todo, hashes):
            known[path] = sha
            fresh[real] = {**key, "sha256": sha}
        stats["hashed_files"] = len(todo)
        stats["hashed_bytes"] = sum(key["size"] for _, _, key in todo)
        with _LOCK:  # entries other processes wrote meanwhile are kept
            _write_cache({**_read_cache(), **fresh})
    for name, value in stats.items():
        setattr(HashStats, name, value)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{known[path]}\n".encode())
    return digest.hexdigest()
