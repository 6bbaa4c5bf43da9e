"""The width (last dimension) of every module's input and output, measured with one short
forward of the real model: what a raw module path's saved value is as wide as, for sizing a
job's result before running it."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .hooks import hidden_of, module_table

__all__ = ["module_widths"]


def module_widths(model: torch.nn.Module, *, pad_id: int = 0) -> dict[tuple[str, str], int]:
    """``{(module, "input" | "output"): width}`` from a two-token forward (text models)."""
    widths: dict[tuple[str, str], int] = {}
    handles = []

    def recorder(name: str, io: str) -> Any:
        def record(_module: Any, args: Any, output: Any = None) -> None:
            value = output if io == "output" else (args[0] if args else None)
            with contextlib.suppress(Exception):  # no tensor there (a cache, a tuple of scalars)
                widths[(name, io)] = int(hidden_of(value).shape[-1])

        return record

    for name, module in module_table(model).items():
        if name:
            handles.append(module.register_forward_pre_hook(recorder(name, "input")))
            handles.append(module.register_forward_hook(recorder(name, "output")))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return widths
