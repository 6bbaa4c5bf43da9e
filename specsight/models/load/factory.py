"""Models built by a factory: ``model: {factory: "package.module:function", args: {...}}``.

The function is imported (a module beside the spec is importable) and called with ``args`` under
the spec's model seed, so randomly initialised modules come out the same every run. It must
return a ``torch.nn.Module``. Such a model has no site table and no tokenizer: ops name raw module
paths, invokes give ``input`` tensors, and metrics name output indices (or the labels of a
``labels`` attribute on the module, when it has one). Servers refuse factories: they would run
code named by a spec.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ...errors import ModelLoadError, did_you_mean
from ..info import ModelInfo
from ..tokenizer import LabelTokenizer

__all__ = ["build_factory_model", "factory_info"]


@contextlib.contextmanager
def _importable(folder: str | None) -> Iterator[None]:
    """``folder`` (the spec's) first on sys.path while the factory's module is imported."""
    if folder is None:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def build_factory_model(
    factory: str, args: dict[str, Any], *, seed: int, base_dir: str | None
) -> torch.nn.Module:
    """Import and call ``package.module:function``; the result in eval mode, gradients off."""
    module_name, _, function_name = factory.partition(":")
    where = f"model.factory '{factory}'"
    try:
        with _importable(base_dir):
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"{where}: cannot import '{module_name}': {exc}",
            hint=f"put {module_name.replace('.', '/')}.py beside the spec, or install its package",
        ) from None
    except Exception as exc:
        raise ModelLoadError(
            f"{where}: importing '{module_name}' failed: {type(exc).__name__}: {exc}"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        hint = did_you_mean(function_name, names) or f"'{module_name}' defines: {', '.join(names)}"
        raise ModelLoadError(
            f"{where}: '{module_name}' has no function '{function_name}'", hint=hint
        )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = function(**args)
    except TypeError as exc:
        raise ModelLoadError(
            f"{where}: calling it with args {sorted(args)} failed: {exc}",
            hint="check model.args against the function's parameters",
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"{where} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(
            f"{where} returned an object of type {type(model).__name__}, not a torch.nn.Module",
            hint="return the model itself",
        )
    return model


def factory_info(model: torch.nn.Module, name: str, dtype: str) -> tuple[ModelInfo, LabelTokenizer]:
    """ModelInfo of a factory model: its module tree, tensor inputs, no canonical sites."""
    labels = getattr(model, "labels", None)
    labels = tuple(str(x) for x in labels) if isinstance(labels, list | tuple) else None
    modules = tuple((n, type(m).__name__) for n, m in model.named_modules() if n)
    info = ModelInfo(
        model_id=name,
        architecture=type(model).__name__,
        family=None,
        n_layers=0,
        d_model=0,
        n_heads=0,
        n_kv_heads=0,
        d_head=0,
        vocab_size=len(labels) if labels else 0,
        dtype=dtype,
        n_params=sum(p.numel() for p in model.parameters()),
        modules=modules,
        inputs="tensor",
        labels=labels,
    )
    return info, LabelTokenizer(labels)
