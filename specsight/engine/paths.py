"""The engine's side of ``path_patch`` (:class:`~specsight.plan.ops.PathPatch`): a receiver's
new input from captured rows, through the head's norm and projection columns when the
receiver is a head's q, k or v."""

from __future__ import annotations

from typing import Any

import torch

from .circuit import loaded, output_weights, projection_weights

__all__ = ["path_value"]


def path_value(op: Any, store: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module]) -> torch.Tensor:  # fmt: skip
    """``[positions, width]``: the unpatched input plus every sender's change, at the op's
    positions (float32 until the projection, which runs in the weights' dtype)."""
    positions = list(op.positions)
    value = store[op.base_input][positions].float()
    for sender in op.senders:
        change = (store[sender.source][positions] - store[sender.base][positions]).float()
        if sender.head >= 0:
            w_o = output_weights(modules[sender.o_proj], op.n_heads, op.d_head)
            own = change[:, sender.head * op.d_head : (sender.head + 1) * op.d_head]
            change = own @ w_o[sender.head].float().to(own.device)
        value = value + change.to(value.device)
    norm = modules[op.norm]
    with loaded(norm):
        weight = next(norm.parameters(), None)
        if weight is not None:
            value = value.to(weight.device, weight.dtype)
        # ``forward``, not the call: the op may be a hook of this very norm's output
        normed = norm.forward(value)
    if not op.project:
        return normed
    w, b = projection_weights(modules[op.module], op.first, 1, op.d_head)
    out = normed @ w[0].T
    return out if b is None else out + b[0]
