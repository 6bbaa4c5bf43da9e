"""Loading the model a spec names, by id: the built-in ``smollm2-135m`` (:mod:`.builtin`), a
tiny random ``tiny-<family>`` model (:mod:`.tiny`), a local folder or a Hugging Face id already
in the local hub cache (:mod:`.folder`; nothing is ever downloaded), or a factory
(:mod:`.factory`). The model comes back in eval mode, gradients off, on its device, with its
tokenizer, :class:`ModelInfo` and weights hash.

:func:`load_model_info` answers shape questions without loading weights (meta device or the
cached ``modelinfo.json``), so compiling a spec stays cheap.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ...errors import ModelLoadError, ModelNotFoundError, did_you_mean
from ..catalog import BUILTIN_MODELS, TINY_MODELS, is_cached
from ..info import ModelInfo
from ..tokenizer import LabelTokenizer, Tokenizer
from .builtin import builtin_hash, builtin_info, ensure_builtin
from .folder import OFFLINE_HINT, auto_class, config_of, folder_tokenizer, from_pretrained
from .identity import checkpoint_files, checkpoint_identity
from .introspect import hash_weights, model_info_from_module
from .tiny import build_tiny, tiny_tokenizer
from .vision import with_processor

__all__ = [
    "LoadedModel",
    "list_models",
    "load_model",
    "load_model_info",
    "load_model_ref",
    "load_ref_info",
    "resolve_device",
]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready for the engine, with everything a run records about it."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    info: ModelInfo
    model_id: str
    revision: str | None
    #: the weights' sha256 identity, or its computation still running (a checkpoint's files
    #: are hashed in a thread once the weights are loaded, while the run starts)
    identity: str | Future[str]
    device: str
    dtype: str
    #: ``{(module, io): width}`` measured on the model, for sizing results before running
    #: (filled in by a server; see :func:`specsight.engine.module_widths`)
    module_widths: dict[tuple[str, str], int] | None = None
    #: a model placed by device_map: {module: device} as accelerate placed it (None: one
    #: device, ``device``)
    placement: dict[str, Any] | None = None
    #: SAEs specs may name by id on this model (a server's ``--sae ID=PATH``): id -> folder
    saes: dict[str, str] = field(default_factory=dict)

    @property
    def weights_sha256(self) -> str:
        """The weights' identity (waits for the hashing of a checkpoint's files to finish)."""
        if isinstance(self.identity, Future):
            self.identity = self.identity.result()
        return self.identity


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


def list_models() -> list[dict]:
    """The built-in and tiny models, for ``specsight models``."""
    out: list[dict] = [
        {"name": name, "kind": "builtin", "description": desc, "cached": is_cached()}
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
    device_map: Any = None,
    max_memory: dict[str, Any] | None = None,
    offload_folder: str | None = None,
) -> LoadedModel:
    """Load a model in eval mode with gradients off, in ``dtype``, straight onto ``device``, or
    across devices by ``device_map`` (accelerate: 'auto', 'balanced', 'sequential' or
    {module prefix: device}, with ``max_memory`` and ``offload_folder``). A checkpoint's
    identity is hashed in a thread once the weights are loaded: ``weights_sha256`` waits for
    it when first read (when the run's manifest is written)."""
    torch_dtype = _torch_dtype(dtype)
    kind, folder = _resolve(model_id, revision)
    target = resolve_device(device)
    if device_map is not None:
        if folder is None:
            raise ModelLoadError(
                f"device_map needs a model with a checkpoint folder; '{model_id}' is built "
                "from its config",
                hint="save it with save_pretrained and name the folder, or remove device_map",
            )
        _require_accelerate()
        placement = accelerate_placement(device_map, max_memory, offload_folder)
    elif _has_accelerate():  # straight onto the device; without accelerate, moved after
        placement = {"device_map": target}
    else:
        placement = {}
    # a checkpoint's identity covers the files listed before the load, hashed off the critical
    # path: after the load (which it would slow) and while a run starts
    loaded_files = checkpoint_files(folder) if kind in ("dir", "hub") else None
    if kind == "tiny":
        model = build_tiny(model_id, seed=seed, attn_implementation=attn_implementation)
        model = model.to(torch_dtype)
    else:
        model = from_pretrained(folder, model_id, torch_dtype, attn_implementation, kind, placement)
    identity: Future[str] | None = None
    if loaded_files is not None:
        assert folder is not None
        identity = _identity_in_background(folder, loaded_files, model)
    if device_map is not None:
        target = execution_device(model)
    if kind == "builtin":  # shape info and the float32 hash were stored at conversion
        cached = builtin_info(folder)  # recorded at conversion: the default implementation
        impl = attn_implementation or cached.attn_implementation
        info = replace(cached, model_id=model_id, dtype=dtype, attn_implementation=impl)
        sha = builtin_hash(folder, dtype, model)
    else:
        info = with_processor(model_info_from_module(model, model_id, dtype), folder)
        sha = identity if identity is not None else hash_weights(model)
    tokenizer = _tokenizer_for(info, folder, model_id)
    model.train(False)  # inference mode: no dropout
    model.requires_grad_(False)
    if device_map is None:
        model.to(target)  # a no-op for folders (loaded there), the tiny models' move
    placed = dict(getattr(model, "hf_device_map", {}) or {}) if device_map is not None else None
    return LoadedModel(
        model, tokenizer, info, model_id, revision, sha, target, dtype, placement=placed
    )


def load_model_ref(
    ref: Any, *, device: str | None = None, base_dir: str | None = None
) -> LoadedModel:
    """Load the model a spec's ``model:`` entry names: an id, or a factory (called here, with
    ``base_dir``, the spec's folder, importable)."""
    if ref.factory is None:
        offload = ref.offload_folder
        if offload is not None and base_dir is not None:
            offload = str(Path(base_dir) / Path(offload).expanduser())
        return load_model(
            ref.id,
            dtype=ref.dtype,
            device=device or ref.device,
            revision=ref.revision,
            attn_implementation=ref.attn_implementation,
            seed=ref.seed,
            device_map=ref.device_map,
            max_memory=ref.max_memory,
            offload_folder=offload,
        )
    from .factory import build_factory_model, factory_info

    torch_dtype, target = _torch_dtype(ref.dtype), resolve_device(device or ref.device)
    model = build_factory_model(ref.factory, dict(ref.args), seed=ref.seed, base_dir=base_dir)
    model = model.to(torch_dtype)
    model.train(False)
    model.requires_grad_(False)
    info, tokenizer = factory_info(model, ref.name, ref.dtype)
    sha = hash_weights(model)
    model.to(target)
    return LoadedModel(model, tokenizer, info, ref.name, None, sha, target, ref.dtype)


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _require_accelerate() -> None:
    """A placement (device_map) needs accelerate: a load error saying how to install it."""
    if not _has_accelerate():
        raise ModelLoadError(
            "device_map needs the accelerate package", hint="pip install 'specsight[big]'"
        )


def _identity_in_background(folder: Path, files: list[Path], model: torch.nn.Module) -> Future[str]:
    """The checkpoint's identity, hashed in a daemon thread (a run that ends early does not
    wait for it at exit). Files that cannot be read by then (a checkpoint rotated away during
    the run) fall back to the loaded tensors' hash, so a finished run is never lost to it."""
    future: Future[str] = Future()

    def work() -> None:
        try:
            future.set_result(checkpoint_identity(folder, files=files))
        except Exception:
            try:
                future.set_result(hash_weights(model))
            except Exception as exc:  # offloaded tensors are not in memory either
                future.set_exception(exc)

    threading.Thread(target=work, name="specsight-hash", daemon=True).start()
    return future


def accelerate_placement(
    device_map: Any, max_memory: dict[str, Any] | None, offload_folder: str | None
) -> dict[str, Any]:
    """from_pretrained's placement arguments from a spec's: GPU indices as integers (YAML
    keys are strings), 'cuda:N' as N."""

    def device(value: Any) -> Any:
        text = str(value)
        if text.isdigit():
            return int(text)
        match = re.fullmatch(r"cuda:(\d+)", text)
        return int(match.group(1)) if match else value

    placement: dict[str, Any] = {
        "device_map": device_map
        if isinstance(device_map, str)
        else {prefix: device(d) for prefix, d in device_map.items()}
    }
    if max_memory:
        placement["max_memory"] = {device(k): v for k, v in max_memory.items()}
    if offload_folder:
        placement["offload_folder"] = offload_folder
    return placement


def execution_device(model: torch.nn.Module) -> str:
    """Where a model placed by accelerate runs its inputs: :func:`compute_device` of its
    placement."""
    return compute_device((getattr(model, "hf_device_map", None) or {}).values())


def compute_device(devices: Iterable[Any]) -> str:
    """The device a placement over ``devices`` (in module order) computes on, as accelerate
    decides: the first that is neither the CPU nor disk (modules placed on either run there),
    else the CPU."""
    for where in devices:
        if str(where) in ("cpu", "disk", "meta"):
            continue
        return f"cuda:{where}" if isinstance(where, int) else str(where)
    return "cpu"


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
        info = replace(builtin_info(folder), model_id=model_id, dtype=dtype)
        return info, folder_tokenizer(folder, model_id)
    try:
        config = config_of(folder)
        with torch.device("meta"):
            model = auto_class(config).from_config(config)
    except Exception as exc:
        hint = OFFLINE_HINT.format(id=model_id) if kind == "hub" else "is it a model folder?"
        msg = f"cannot read the config of '{model_id}' in {folder}: {exc}"
        raise ModelLoadError(msg, hint=hint) from None
    info = with_processor(model_info_from_module(model, model_id, dtype), folder)
    return info, _tokenizer_for(info, folder, model_id)


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
            raise ModelNotFoundError(
                f"'{model_id}' has no revisions", field="revision", hint="remove model.revision"
            )
        return ("tiny", None) if model_id in TINY_MODELS else ("builtin", ensure_builtin())
    if Path(model_id).expanduser().is_dir():
        return "dir", Path(model_id).expanduser()
    if os.path.isabs(model_id) or model_id.startswith((".", "~")) or model_id.count("/") > 1:
        hint = did_you_mean(model_id, known) or f"known models: {', '.join(known)}"
        raise ModelNotFoundError(f"model folder '{model_id}' does not exist", hint=hint)
    try:
        from huggingface_hub import snapshot_download

        return "hub", Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except Exception:
        raise ModelNotFoundError(
            f"model '{model_id}' is not built in, not a local folder and not in the Hugging Face "
            "cache (specsight never downloads)",
            hint=did_you_mean(model_id, known) or OFFLINE_HINT.format(id=model_id),
        ) from None
