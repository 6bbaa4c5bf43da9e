"""Tensor views the engine acts on: column windows, token-major views, attention weights.

Ops act on ``hidden[row, position]`` of a ``[batch, pos, width]`` tensor. Per-head sites act on
a window of the last dimension (``RowOp.cols``); modules that flatten batch and positions into
one dimension (a mixture-of-experts router, fused experts) are viewed as ``[batch, pos, width]``;
attention weights ``[batch, head, query, key]`` are viewed as ``[batch, query, head, key]``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import RunError

__all__ = ["attention_weights", "col_index", "pos_index", "row_major", "token_major"]

_COLS: dict[tuple[Any, ...], torch.Tensor] = {}


def pos_index(positions: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Positions as an index tensor on ``device``, cached: a fresh host-to-device copy inside a
    hook would make the CPU wait for the GPU at every site."""
    key = ("pos", positions, str(device))
    index = _COLS.get(key)
    if index is None:
        if len(_COLS) > 4096:
            _COLS.clear()
        with torch.inference_mode(False):  # a cached tensor may serve a later backward pass
            index = _COLS[key] = torch.tensor(positions, dtype=torch.long).to(device)
    return index


def col_index(
    cols: tuple[tuple[int, int], ...] | None, device: torch.device
) -> torch.Tensor | None:
    """The column indices of ``(start, stop)`` ranges (None stays None), cached per device."""
    if cols is None:
        return None
    key = (cols, str(device))
    index = _COLS.get(key)
    if index is None:
        if len(_COLS) > 4096:
            _COLS.clear()
        with torch.inference_mode(False):
            parts = [torch.arange(start, stop, dtype=torch.long) for start, stop in cols]
            index = _COLS[key] = torch.cat(parts).to(device)
    return index


def token_major(hidden: torch.Tensor, batch: int, seq_len: int, module: str) -> torch.Tensor:
    """A ``[batch * pos, width]`` tensor viewed as ``[batch, pos, width]`` (writes go through)."""
    if hidden.shape[0] != batch * seq_len:
        raise RunError(
            f"module '{module}' holds a tensor of shape {list(hidden.shape)}, neither "
            f"[batch, pos, ...] nor [batch * pos, ...] (batch {batch}, {seq_len} positions)",
            hint="pick a site whose tensor has a position axis (`specsight sites MODEL`)",
        )
    return hidden.view(batch, seq_len, *hidden.shape[1:])


def row_major(hidden: torch.Tensor, batch: int, seq_len: int, module: str) -> torch.Tensor:
    """A tensor of more than three axes (a conv feature map, say) viewed as [batch, pos, rest]:
    positions when its second axis is the sequence, else one position holding the whole
    flattened value of each row (writes go through)."""
    if hidden.shape[0] != batch or seq_len not in (1, hidden.shape[1]):
        raise RunError(
            f"module '{module}' holds a tensor of shape {list(hidden.shape)}, which has no "
            f"[batch, pos, ...] layout (batch {batch}, {seq_len} positions)",
            hint="pick another module (`specsight sites MODEL` lists them)",
        )
    try:
        return hidden.view(batch, seq_len, -1)
    except RuntimeError:
        raise RunError(
            f"module '{module}' holds a non-contiguous tensor of shape {list(hidden.shape)}",
            hint="act on this module's output, or on a module whose tensor is contiguous",
        ) from None


def attention_weights(output: Any, module: str) -> torch.Tensor:
    """The attention probabilities an attention module returns, as [batch, query, head, key]."""
    weights = None
    if isinstance(output, tuple | list) and len(output) > 1:
        weights = output[1]
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
        raise RunError(
            f"module '{module}' returned no attention weights: its attention implementation "
            "does not compute them",
            hint="set model: {id: ..., attn_implementation: eager}",
        )
    return weights.transpose(1, 2)
