"""Where a ``device_map`` puts a model, known before loading it: the model built on the meta
device from its config (no weights), placed by accelerate as ``from_pretrained`` would place it,
and the bytes of weights each device then holds (what ``specsight plan`` shows)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from .folder import auto_class, config_of
from .loader import _require_accelerate, _resolve, _torch_dtype, accelerate_placement

__all__ = ["planned_placement"]


def planned_placement(ref: Any, *, base_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """{device: {"bytes": weights there, "modules": [module names]}} for a spec's ``model:``
    with a ``device_map`` (an empty dict without one)."""
    if ref.device_map is None or ref.factory is not None:
        return {}
    _require_accelerate()
    _kind, folder = _resolve(ref.id, ref.revision)
    if folder is None:
        return {}
    dtype = _torch_dtype(ref.dtype)
    with torch.device("meta"):
        model = auto_class(config_of(folder)).from_config(config_of(folder), dtype=dtype)
    placement = accelerate_placement(ref.device_map, ref.max_memory, None)
    device_map = placement["device_map"]
    if isinstance(device_map, str):
        device_map = _as_from_pretrained(model, device_map, placement.get("max_memory"))
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"bytes": 0, "modules": []})
    for name, param in model.named_parameters():
        where = _device_of(name, device_map)
        out[where]["bytes"] += param.numel() * param.element_size()
    for prefix, where in device_map.items():
        out[_name(where)]["modules"].append(prefix or "(the whole model)")
    return dict(out)


def _as_from_pretrained(model: torch.nn.Module, how: str, memory: Any) -> dict[str, Any]:
    """The placement from_pretrained computes for ``device_map: how`` (transformers' own
    steps: balanced memory unless 'sequential', then accelerate's inference)."""
    from transformers.integrations import accelerate as hf

    keep = getattr(model, "_no_split_modules", None) or []
    if how == "sequential":
        budget = hf.get_max_memory(memory)
    else:
        budget = hf.get_balanced_memory(
            model, max_memory=memory, no_split_module_classes=keep, hf_quantizer=None,
            low_zero=how == "balanced_low_0",
        )  # fmt: skip
    return hf.infer_auto_device_map(
        model,
        max_memory=budget,
        no_split_module_classes=keep,
        hf_quantizer=None,
        no_placement_params=getattr(model, "_no_placement_params", None),
    )


def _name(where: Any) -> str:
    return f"cuda:{where}" if isinstance(where, int) else str(where)


def _device_of(parameter: str, device_map: dict[str, Any]) -> str:
    """The device of the longest prefix of ``parameter`` in ``device_map``."""
    best, where = -1, "cpu"
    for prefix, device in device_map.items():
        if (prefix == "" or parameter == prefix or parameter.startswith(prefix + ".")) and len(
            prefix
        ) > best:
            best, where = len(prefix), _name(device)
    return where
