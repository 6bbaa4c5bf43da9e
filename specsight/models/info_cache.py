"""A model's ModelInfo and tokenizer remembered on disk (torch-free), so that ``specsight
validate`` and ``specsight plan`` of a model read once before import neither torch nor
transformers: the tiny models, the converted built-in and local model folders.

An entry lives in ``<cache>/info/<key>.json``; the key covers the specsight version, the
model's id, revision, dtype and seed, and what the model's files look like (the built-in's
``modelinfo.json``, a folder's ``config.json`` and tokenizer files: path, size, mtime), so a
changed folder is read again. Hub models are not remembered (their snapshot is found through
huggingface_hub). A missing or unreadable entry is no error: the model is read as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import tokenizers

from ..version import __version__
from .catalog import BUILTIN_MODELS, TINY_MODELS, builtin_dir, cache_dir, is_cached
from .info import ModelInfo
from .tokenizer import LabelTokenizer, Tokenizer

__all__ = ["cached_info", "remember_info"]

_FOLDER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
)


def _file_stamp(path: Path) -> list[Any]:
    try:
        stat = path.stat()
    except OSError:
        return [str(path), None]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def _stamp(ref: Any) -> list[Any] | None:
    """What the model's files look like now (None: a model that is not remembered)."""
    if ref.factory is not None:
        return None
    if ref.id in TINY_MODELS:
        return ["tiny"]
    if ref.id in BUILTIN_MODELS:
        return _file_stamp(builtin_dir() / "modelinfo.json") if is_cached() else None
    folder = Path(ref.id).expanduser()
    if folder.is_dir():
        return [_file_stamp(folder.resolve() / name) for name in _FOLDER_FILES]
    return None


def _entry(ref: Any) -> Path | None:
    stamp = _stamp(ref)
    if stamp is None:
        return None
    key = [__version__, ref.id, ref.revision, ref.dtype, ref.seed, stamp]
    digest = hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:32]
    return cache_dir() / "info" / f"{digest}.json"


def cached_info(ref: Any) -> tuple[ModelInfo, Tokenizer] | None:
    """The remembered ModelInfo and tokenizer of a spec's ``model:`` entry, or None."""
    path = _entry(ref)
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        info = ModelInfo.from_dict(data["info"])
        if data.get("labels") is not None:
            return info, LabelTokenizer(data["labels"])
        backend = tokenizers.Tokenizer.from_str(data["tokenizer"])
        return info, Tokenizer(backend, pad_id=data["pad_id"])
    except Exception:  # a stale or torn entry, or one of another tokenizers version
        return None


def remember_info(ref: Any, info: ModelInfo, tokenizer: Tokenizer) -> None:
    """Remember a model's ModelInfo and tokenizer (quietly skipped when it cannot be)."""
    path = _entry(ref)
    if path is None:
        return
    data: dict[str, Any] = {"info": info.to_dict()}
    if isinstance(tokenizer, LabelTokenizer):
        data["labels"] = list(tokenizer.labels)
    else:
        data["tokenizer"] = tokenizer.backend.to_str()
        data["pad_id"] = tokenizer.pad_id
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8"
        ) as handle:
            json.dump(data, handle)
        os.replace(handle.name, path)
    except OSError:
        return
