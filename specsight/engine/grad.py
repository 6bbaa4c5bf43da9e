"""Gradients for the engine: a backward pass from the plan's backward metrics with frozen
parameters.

Parameters never require grad: during a backward forward, the input embedding's output is made
a leaf that requires grad (a hook of the run's :class:`~.hooks.HookScope`), so exactly the
activations downstream of it carry gradients. A ``grad`` op keeps the gradient of its row and
positions when the backward pass reaches its site (a tensor hook of the same scope).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import RunError
from ..plan import Metric
from .hooks import HookScope
from .readout import MetricBatch

__all__ = ["grad_scope", "backward_from"]


@contextlib.contextmanager
def grad_scope(model: torch.nn.Module, enabled: bool) -> Iterator[HookScope | None]:
    """Grad mode for one forward: parameters frozen (and given back their flags after), the
    embedding output a leaf. Yields the scope that owns the forward's gradient hooks."""
    if not enabled:
        yield None
        return
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        raise RunError("gradients need the model's input embedding module; none was found")
    frozen = [p for p in model.parameters() if p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)

    def leaf(output: torch.Tensor) -> torch.Tensor:
        # a copy of the leaf flows on, so ops may change it in place (a leaf can't be)
        return output.detach().requires_grad_(True).clone()

    try:
        with HookScope(model) as scope, torch.enable_grad():
            scope.replace_output(embed, leaf)
            yield scope
    finally:
        for param in frozen:
            param.requires_grad_(True)


def backward_from(metrics: list[tuple[Metric, MetricBatch]]) -> None:
    """Backward from the sum of the backward metrics over the rows of this forward each
    reads (several jobs' metrics: their rows are independent, so each gets its own
    gradients)."""
    total: Any = None
    for metric, batch in metrics:
        if not batch:
            continue
        batch.metric = metric
        values = metric.read(batch)[0]
        if not values.requires_grad:
            raise RunError(f"no gradient reaches metric '{metric.name}'")
        total = values.sum() if total is None else total + values.sum()
    if total is not None:
        total.backward()
