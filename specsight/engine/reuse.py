"""Causal position reuse: rows of identical tokens, untouched before position p, need only
positions p.. in every layer; the earlier positions' keys and values come from one run of the
untouched tokens (its KV cache, computed once per token sequence and kept for a few). The
cache handed to a forward is a fresh copy cut at p, one row for the layers a shared prefix
runs once, every row after. Models that return no cache of keys and values run every
position instead: the reuse only ever saves work.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any

import torch

from ..plan import Forward, Plan

__all__ = ["PositionReuse"]

_KEEP = 4  # token sequences whose untouched caches are kept at once


class PositionReuse:
    """The untouched runs' caches of one plan's token sequences, and the caches forwards get."""

    def __init__(self, model: torch.nn.Module, plan: Plan):
        self.model, self.plan = model, plan
        params = inspect.signature(model.forward).parameters
        self.kwarg = "cache" if "cache" in params else "past_key_values"
        self.supported = self.kwarg in params and plan.model_summary.get("inputs", "text") == "text"
        self.bases: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = (
            OrderedDict()
        )

    def start(self, forward: Forward) -> int:
        """Where this forward starts: its ``position_start`` when the model allows it, else 0."""
        return forward.position_start if self.supported else 0

    def _base(self, tokens: tuple[int, ...], device: torch.device) -> list[Any] | None:
        """Per layer (keys, values) of the untouched tokens; None when the model keeps none."""
        if tokens in self.bases:
            self.bases.move_to_end(tokens)
            return self.bases[tokens]
        ids = torch.tensor([tokens], device=device)
        output = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        cache = getattr(output, "past_key_values", None)
        layers = getattr(cache, "layers", None)
        if not layers or not all(hasattr(layer, "keys") for layer in layers):
            self.supported = False
            return None
        self.bases[tokens] = [(layer.keys, layer.values) for layer in layers]
        if len(self.bases) > _KEEP:
            self.bases.popitem(last=False)
        return self.bases[tokens]

    def kwargs(
        self, forward: Forward, batch: int, device: torch.device, runner: Any
    ) -> dict[str, Any] | None:
        """The cache and positions of a forward that starts late; None: run every position."""
        start = self.start(forward)
        if not start:
            return None
        from transformers import DynamicCache

        tokens = self.plan.rows[forward.rows[0]].tokens
        active = runner.active
        runner.active = None  # the untouched run: no op, no expansion
        try:
            base = self._base(tokens, device)
        finally:
            runner.active = active
        if base is None:
            return None
        cache = DynamicCache(config=getattr(self.model, "config", None))
        for layer, (keys, values) in enumerate(base):
            rows = 1 if layer < forward.shared_prefix else len(forward.rows)
            cache.update(
                keys[:, :, :start].expand(rows, -1, -1, -1).contiguous(),
                values[:, :, :start].expand(rows, -1, -1, -1).contiguous(),
                layer,
            )
        positions = torch.arange(start, len(tokens), device=device)[None].expand(batch, -1)
        return {self.kwarg: cache, "position_ids": positions, "use_cache": True}
