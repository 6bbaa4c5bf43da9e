"""Gradients for the engine: a backward pass from the plan's backward metrics, to the input
embedding's output only.

During a backward forward, the input embedding's output is made a leaf that requires grad (a
hook of a :class:`~.hooks.HookScope` for that forward), so exactly the activations downstream
of it carry gradients, and the pass computes the gradients with respect to that leaf alone
(``torch.autograd.grad``): parameters keep their flags and get no ``.grad``. A ``grad`` op
keeps the gradient of its row and positions when the pass reaches its site (a tensor hook of
the same scope).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import RunError
from ..plan import Metric
from .hooks import HookScope
from .readout import MetricBatch

__all__ = ["grad_scope", "backward_from"]


@dataclass
class GradScope:
    """One backward forward's hooks, and the leaves its gradients flow from."""

    hooks: HookScope
    leaves: list[torch.Tensor] = field(default_factory=list)


@contextlib.contextmanager
def grad_scope(model: torch.nn.Module, enabled: bool) -> Iterator[GradScope | None]:
    """Grad mode for one forward, the embedding output a leaf; yields the forward's
    :class:`GradScope` (None when not enabled)."""
    if not enabled:
        yield None
        return
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        raise RunError("gradients need the model's input embedding module; none was found")
    with HookScope(model) as hooks, torch.enable_grad():
        scope = GradScope(hooks)

        def leaf(output: torch.Tensor) -> torch.Tensor:
            # a copy of the leaf flows on, so ops may change it in place (a leaf can't be)
            made = output.detach().requires_grad_(True)
            scope.leaves.append(made)
            return made.clone()

        hooks.replace_output(embed, leaf)
        yield scope


def backward_from(scope: GradScope, metrics: list[tuple[Metric, MetricBatch]]) -> None:
    """The backward pass from the sum of the backward metrics over the rows of this forward
    each reads (several jobs' metrics: their rows are independent, so each gets its own
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
        torch.autograd.grad(total, scope.leaves, allow_unused=True)
