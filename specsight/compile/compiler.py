"""The compiler: Spec + ModelInfo + tokenizer -> Plan. Imports no torch.

It tokenizes every prompt, orders invokes into stages by what they read from each other,
expands sweeps into cells, resolves sites and positions per row, and packs rows into forwards.
Every problem it finds is collected and raised as one :class:`SpecError` with file positions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .. import spec as S
from ..errors import SpecError
from ..models import ModelInfo, Tokenizer
from ..plan import Plan, Row
from ..sites import family_table
from .cells import compile_invoke_ops, expand_invoke
from .context import Context, Items
from .dataset import check_metric_columns
from .expectations import compile_expectations
from .generation import check_generation, check_generation_length, generate_forwards
from .gradients import check_backward
from .inputs import compile_inputs
from .layout import after_layer_modules, logit_positions, plan_saves, result_axes
from .memory import CPU_BATCH_CAP, estimate_memory, untouched_run_bytes
from .metrics import compile_metric
from .packing import first_layers, first_positions, pack_rows, rows_for_budget
from .stages import collect_save_names, order_stages
from .sweep import MAX_CELLS

__all__ = ["compile_plan", "DEFAULT_MAX_BATCH"]

DEFAULT_MAX_BATCH = CPU_BATCH_CAP


def compile_plan(
    spec: S.Spec,
    info: ModelInfo,
    tokenizer: Tokenizer,
    *,
    doc: S.LoadedDoc | None = None,
    max_batch: int | None = None,
    memory_budget: int | None = None,
    batch_cap: int = DEFAULT_MAX_BATCH,
    prefix_reuse: bool = True,
    position_reuse: bool = True,
    allow_files: bool = True,
    max_cells: int = MAX_CELLS,
    items: Items | None = None,
) -> Plan:
    """Compile a validated spec for one model. ``doc`` supplies file positions for errors.

    Rows per forward: ``max_batch`` when given; else as many as ``memory_budget`` bytes of
    activations allow (at most ``batch_cap``); else ``batch_cap``. ``items``: the dataset's
    items already read (a window of them, for a run in blocks), instead of reading it.
    """
    if max_batch is not None and max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    doc = doc or S.document_of(spec)
    ctx = Context(
        spec=spec, doc=doc, info=info, tok=tokenizer, allow_files=allow_files, given_items=items
    )
    compile_inputs(ctx)
    for name, metric in spec.metrics.items():  # with the prompts' columns, in one report
        if getattr(metric, "invoke", None) in spec.invokes:
            check_metric_columns(ctx, name, metric)
    _check_issues(ctx)
    collect_save_names(ctx)
    stages = order_stages(ctx)
    _check_issues(ctx)
    check_generation(ctx)
    check_generation_length(ctx)
    _check_issues(ctx)
    order = sorted(spec.invokes, key=lambda name: (stages[name], list(spec.invokes).index(name)))
    for name in order:
        expand_invoke(ctx, name, max_cells)
    _check_issues(ctx)
    for name in order:
        compile_invoke_ops(ctx, name)
    metrics = [compile_metric(ctx, name, metric) for name, metric in spec.metrics.items()]
    backward = check_backward(ctx)
    _check_issues(ctx)
    ops = list(ctx.captures.values()) + ctx.ops
    ops.sort(key=lambda op: (op.row, op.kind == "capture"))
    after_layers, logits_module = after_layer_modules(info)
    first = first_layers(ctx.rows, ops, info.n_layers, after_layers)
    keep = logit_positions(ctx, metrics, ops, logits_module)
    if max_batch is None:
        max_batch = batch_cap
        if memory_budget is not None:
            seq = max(len(r.tokens) for r in ctx.rows)
            kept = None if keep is None else max((len(v) for v in keep.values()), default=1)
            max_batch = rows_for_budget(
                info, seq, spec.model.dtype, memory_budget, cap=batch_cap, logits_positions=kept
            )
    generating = generate_forwards(ctx, stages, max_batch)
    reuse_positions = position_reuse and prefix_reuse and info.inputs == "text"
    forwards = pack_rows(
        ctx.rows,
        stages,
        first,
        max_batch,
        info.n_layers,
        prefix_reuse=prefix_reuse,
        keep_logits=keep,
        skip={r for f in generating for r in f.rows},
        starts=first_positions(ctx.rows, ops, keep) if reuse_positions else None,
        block=_untouched_runs_per_block(info, ctx.rows, spec.model.dtype, memory_budget, max_batch),
    )
    if generating:
        forwards = sorted(forwards + generating, key=lambda f: f.stage)
    saves = plan_saves(ctx)
    expectations = compile_expectations(ctx, metrics, saves)
    _check_issues(ctx)
    axis_values, axis_labels = result_axes(ctx)
    invoke_info = {
        name: {
            "prompts": len(ctx.tokens[name]),
            "tokens": [len(t) for t in ctx.tokens[name]],
            "stage": stages[name],
            "cells": len(ctx.grids[name].cells()) if ctx.grids[name].axes else 1,
            "axes": list(ctx.grids[name].axes),
            **({"inputs": ctx.input_names[name]} if name in ctx.input_names else {}),
        }
        for name in order
    }
    plan = Plan(
        spec_name=spec.name,
        spec_sha256=doc.sha256,
        model=spec.model.model_dump(),
        model_summary=_model_summary(info),
        rows=tuple(ctx.rows),
        ops=tuple(ops),
        forwards=tuple(forwards),
        metrics=tuple(m for m in metrics if m is not None),
        saves=tuple(saves),
        vectors=ctx.vectors,
        inputs=ctx.inputs,
        axis_values=axis_values,
        axis_labels=axis_labels,
        invoke_info=invoke_info,
        max_batch=max_batch,
        expectations=tuple(expectations),
        deterministic=spec.deterministic,
        seed=spec.seed,
        backward=backward,
        dataset=None
        if ctx.items is None
        else {**ctx.items.describe(), "invokes": sorted(ctx.item_invokes)},
    )
    return replace(plan, memory_estimate=estimate_memory(plan, info))


#: memory the engine may hold untouched runs in, when no memory budget is given
_UNTOUCHED_RUNS_BYTES = 1 << 30


def _untouched_runs_per_block(
    info: ModelInfo, rows: list[Row], dtype: str, budget: int | None, max_batch: int
) -> int:
    """How many sequences' untouched runs (keys, values and layer inputs of every position)
    the engine holds at once: what a quarter of the budget allows, at most ``max_batch``."""
    seq = max((len(r.tokens) for r in rows), default=1)
    per_sequence = untouched_run_bytes(info, seq, dtype)
    allowed = (budget // 4 if budget else _UNTOUCHED_RUNS_BYTES) // max(1, per_sequence)
    return max(1, min(max_batch, allowed))


def _layers_path(info: ModelInfo) -> str | None:
    table = family_table(info)
    return table["layers"] if table else None


def _check_issues(ctx: Context) -> None:
    if ctx.issues:
        issues = sorted(ctx.issues.values(), key=lambda i: (i.line or 0, i.col or 0))
        raise SpecError(issues)


def _model_summary(info: ModelInfo) -> dict[str, Any]:
    return {
        "architecture": info.architecture,
        "family": info.family,
        "n_layers": info.n_layers,
        "d_model": info.d_model,
        "n_heads": info.n_heads,
        "vocab_size": info.vocab_size,
        "inputs": info.inputs,
        "layers_path": _layers_path(info),
    }
