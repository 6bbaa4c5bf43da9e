"""The width (last dimension) of every module's input and output, measured with one short
forward of the real model: what a raw module path's saved value is as wide as, for sizing a
job's result before running it."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .hooks import HookScope, hidden_of, module_table

__all__ = ["module_widths"]


def module_widths(model: torch.nn.Module, *, pad_id: int = 0) -> dict[tuple[str, str], int]:
    """``{(module, "input" | "output"): width}`` from a two-token forward (text models)."""
    widths: dict[tuple[str, str], int] = {}

    def recorder(name: str, io: str) -> Any:
        def record(value: Any) -> None:
            with contextlib.suppress(Exception):  # no tensor there (a cache, a tuple of scalars)
                widths[(name, io)] = int(hidden_of(value).shape[-1])

        return record

    def first_argument(record: Any) -> Any:
        return lambda args, _kwargs: record(args[0] if args else None)

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    with HookScope(model) as scope:
        for name, module in module_table(model).items():
            if name:
                scope.on_call(module, first_argument(recorder(name, "input")))
                scope.on_output(module, recorder(name, "output"))
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return widths
