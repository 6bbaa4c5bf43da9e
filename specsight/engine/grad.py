"""Gradients for the engine: a backward pass from one metric with frozen parameters.

Parameters never require grad: during a backward forward, the input embedding's output is made
a leaf that requires grad, so exactly the activations downstream of it carry gradients. A
``grad`` op registers a tensor hook at its site that keeps the gradient of its row and
positions when the backward pass reaches it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import RunError
from ..plan import Forward
from .readout import metric_rows

__all__ = ["grad_scope", "backward_from", "keep_grad", "attribution"]


def attribution(metric: Any, store: dict[str, torch.Tensor]) -> torch.Tensor:
    """grad . (clean - corrupt) per site and position: [site, pos]."""
    keys = metric.store_keys
    out = []
    for i in range(0, len(keys), 3):
        clean, corrupt, grad = (store[k].float() for k in keys[i : i + 3])
        out.append((grad * (clean - corrupt)).sum(-1))
    return torch.stack(out).cpu()


@contextlib.contextmanager
def grad_scope(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Grad mode for one forward: parameters frozen, the embedding output a leaf."""
    if not enabled:
        yield
        return
    frozen = [p for p in model.parameters() if p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        raise RunError("gradients need the model's input embedding module; none was found")

    def leaf(_mod: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
        # a copy of the leaf flows on, so ops may change it in place (a leaf can't be)
        return output.detach().requires_grad_(True).clone()

    handle = embed.register_forward_hook(leaf, prepend=True)
    try:
        with torch.enable_grad():
            yield
    finally:
        handle.remove()
        for param in frozen:
            param.requires_grad_(True)


def backward_from(
    metric: Any,
    slots: dict[int, int],
    forward: Forward,
    logits: torch.Tensor,
    column: Callable[[int], int],
) -> None:
    """Backward from the sum of ``metric`` over the rows of this forward it reads."""
    kind = "logit_diff" if metric.kind == "attribution" else metric.kind
    picked = metric_rows(metric, kind, slots, forward, logits, column)
    if picked is None:
        return
    values = picked[0]
    if not values.requires_grad:
        raise RunError(f"no gradient reaches metric '{metric.name}'")
    values.sum().backward()


def keep_grad(
    hidden: torch.Tensor,
    row: int,
    positions: torch.Tensor,
    cols: torch.Tensor | None,
    store: dict[str, torch.Tensor],
    key: str,
    head_dim: int | None,
    origin: str,
    site: str,
) -> None:
    """Keep ``hidden``'s gradient at one row's positions (and columns) when backward runs."""
    if not hidden.requires_grad:
        raise RunError(
            f"{origin}: no gradient reaches '{site}'",
            hint="gradients flow from the input embedding's output on, in the forward that "
            "the backward metric reads",
        )

    def hook(grad: torch.Tensor) -> None:
        value = grad[row, positions]
        if cols is not None:
            value = value[:, cols]
        value = value.detach().clone()
        if head_dim:
            value = value.reshape(len(positions), -1, head_dim)
        store[key] = value

    hidden.register_hook(hook)
