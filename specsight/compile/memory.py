"""Memory (torch-free): the estimate of a plan (weights, the largest forward's activations,
stored values and a workspace allowance) and the activation budget a run sizes forwards by.

The estimate is a planning aid shown by ``specsight plan``, not a guarantee. Activation memory
under ``no_grad`` is dominated by the widest live tensors of one layer (attention scores, the
MLP's hidden width) plus the logits. The budget is half of the memory the OS reports available
on CPU, 80% of a CUDA device's free memory (measured by the caller, which has torch).
"""

from __future__ import annotations

import os

from ..models import ModelInfo
from ..plan import Plan
from ..plan.ops import Capture, Save

__all__ = [
    "CPU_BATCH_CAP",
    "GPU_BATCH_CAP",
    "activation_budget",
    "batch_cap",
    "dtype_bytes",
    "estimate_memory",
    "row_bytes",
    "rows_for_budget",
    "untouched_run_bytes",
]

CPU_BATCH_CAP = 64  # on CPU, throughput stops improving past ~64 rows (bench/README.md)
GPU_BATCH_CAP = 256


def dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)


def _param_count(info: ModelInfo) -> int:
    if info.n_params:
        return info.n_params
    d, layers = info.d_model, info.n_layers
    d_mlp = info.d_mlp or 4 * d
    kv = info.n_kv_heads * info.d_head
    attn = d * (info.n_heads * info.d_head) * 2 + d * kv * 2
    mlp = 3 * d * d_mlp if info.family == "llama" else 2 * d * d_mlp
    embed = info.vocab_size * d
    return layers * (attn + mlp) + 2 * embed


def row_bytes(
    info: ModelInfo, seq_len: int, dtype: str, *, logits_positions: int | None = None
) -> int:
    """Estimated activation bytes one row adds to a forward (the widest live tensors)."""
    width = dtype_bytes(dtype)
    d_mlp = info.d_mlp or 4 * info.d_model
    # live at once inside a layer: residual, normed input, q/k/v/attention output (~8 x d_model)
    # and the MLP's gate, up, activation and product (4 x d_mlp)
    hidden = seq_len * (8 * info.d_model + 4 * d_mlp) * width
    attention = info.n_heads * seq_len * seq_len * width
    kept = seq_len if logits_positions is None else logits_positions
    logits = kept * info.vocab_size * 4
    return hidden + attention + logits


def rows_for_budget(
    info: ModelInfo,
    seq_len: int,
    dtype: str,
    budget_bytes: int,
    *,
    cap: int,
    logits_positions: int | None = None,
) -> int:
    """How many rows fit the activation budget (at least 1, at most ``cap``)."""
    per_row = max(1, row_bytes(info, seq_len, dtype, logits_positions=logits_positions))
    return max(1, min(cap, budget_bytes // per_row))


def untouched_run_bytes(info: ModelInfo, seq_len: int, dtype: str) -> int:
    """What the engine keeps of one sequence's untouched run: keys, values and the layer
    inputs of every position, in every layer (an upper bound: it keeps the inputs it uses)."""
    width = 2 * info.n_kv_heads * info.d_head + info.d_model
    return seq_len * info.n_layers * width * dtype_bytes(dtype)


def estimate_memory(plan: Plan, info: ModelInfo) -> dict[str, int]:
    """Bytes for weights, peak activations of the largest forward, captured/saved values."""
    dtype = str(plan.model.get("dtype", "float32"))
    width = dtype_bytes(dtype)
    peak = runs = 0
    for forward in plan.forwards:
        kept = None if forward.keep_logits is None else len(forward.keep_logits)
        if forward.from_base:  # positions from the start run, attending to every position
            seq, tail = forward.seq_len, forward.seq_len - forward.position_start
            per_row = row_bytes(info, tail, dtype, logits_positions=kept)
            per_row += seq * info.n_heads * (2 * info.d_head + tail) * width
            sequences = len({plan.rows[r].tokens for r in forward.rows})
            runs = max(runs, sequences * untouched_run_bytes(info, seq, dtype))
        else:
            per_row = row_bytes(info, forward.seq_len, dtype, logits_positions=kept)
        peak = max(peak, len(forward.rows) * per_row)
    stored = runs  # the untouched runs the largest from_base forward reads
    for op in plan.ops:
        if isinstance(op, Capture | Save):
            stored += len(op.positions) * info.d_model * width
    weights = _param_count(info) * width
    # Kernel workspaces, allocator slack and the first forward's one-off buffers: measured on
    # CPU as about a quarter of the weights on SmolLM2-135M (bench/README.md).
    workspace = max(64 << 20, weights // 4)
    return {
        "weights": weights,
        "activations": peak,
        "stored": stored,
        "workspace": workspace,
        "total": weights + peak + stored + workspace,
    }


def _available_cpu_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def activation_budget(device: str, free_bytes: int | None = None) -> int:
    """Bytes of activations one forward may use on ``device`` ('cpu', 'cuda:0', ...);
    ``free_bytes`` is a CUDA device's free memory."""
    if device.startswith("cuda"):
        if free_bytes is None:
            raise ValueError("a CUDA budget needs the device's free memory")
        return int(free_bytes * 0.8)
    return max(256 << 20, int(_available_cpu_bytes() * 0.5))


def batch_cap(device: str) -> int:
    """Rows per forward at most on ``device``."""
    return GPU_BATCH_CAP if device.startswith("cuda") else CPU_BATCH_CAP
