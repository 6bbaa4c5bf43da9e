"""A memory estimate for a plan (torch-free): weights, the largest forward's activations, stored values.

It is a planning aid shown by ``specsight plan``, not a guarantee. Activation memory under
``no_grad`` is dominated by the widest live tensors of one layer (attention scores, the MLP's
hidden width) plus the logits.
"""

from __future__ import annotations

from .modelinfo import ModelInfo
from .plan import Plan

__all__ = ["estimate_memory", "dtype_bytes"]


def dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)


def _param_count(info: ModelInfo) -> int:
    d, layers = info.d_model, info.n_layers
    d_mlp = info.d_mlp or 4 * d
    kv = info.n_kv_heads * info.d_head
    attn = d * (info.n_heads * info.d_head) * 2 + d * kv * 2
    mlp = 3 * d * d_mlp if info.family == "llama" else 2 * d * d_mlp
    embed = info.vocab_size * d
    return layers * (attn + mlp) + 2 * embed


def estimate_memory(plan: Plan, info: ModelInfo) -> dict[str, int]:
    """Bytes for weights, peak activations of the largest forward, captured/saved values."""
    width = dtype_bytes(str(plan.model.get("dtype", "float32")))
    d_mlp = info.d_mlp or 4 * info.d_model
    peak = 0
    for forward in plan.forwards:
        b, t = len(forward.rows), forward.seq_len
        per_layer = (
            b * t * (4 * info.d_model + 2 * d_mlp) * width + b * info.n_heads * t * t * width
        )
        logits = b * t * info.vocab_size * 4
        peak = max(peak, per_layer + logits)
    stored = 0
    for op in plan.ops:
        if op.kind in ("capture", "save"):
            stored += len(op.positions) * info.d_model * width
    weights = _param_count(info) * width
    return {
        "weights": weights,
        "activations": peak,
        "stored": stored,
        "total": weights + peak + stored,
    }
