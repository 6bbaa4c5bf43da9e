"""The layout of a plan's results (torch-free): which logits positions anything reads, each
save's axes and store keys, and each invoke's axis values and labels. Also the modules after the
layer stack (final norm, unembedding), which no row's first touched layer counts.
"""

from __future__ import annotations

from typing import Any

from ..models import ModelInfo
from ..plan import PlanMetric, PlanSave, RowOp
from ..sites import family_table
from .context import Context
from .inputs import position_labels

__all__ = ["after_layer_modules", "logit_positions", "plan_saves", "result_axes"]


def after_layer_modules(info: ModelInfo) -> tuple[set[str], str | None]:
    """Modules that run after the layer stack (final norm, unembedding), and the unembedding."""
    table = family_table(info)
    sites = table["sites"] if table else {}
    after = {sites[name][0] for name in ("final_norm", "logits") if name in sites}
    return after, sites["logits"][0] if "logits" in sites else None


def logit_positions(
    ctx: Context, metrics: list[PlanMetric | None], ops: list[RowOp], logits_module: str | None
) -> dict[int, set[int]] | None:
    """Per row, the positions whose logits anything reads; None when all must be computed."""
    if logits_module is None or any(op.module == logits_module for op in ops):
        return None
    keep: dict[int, set[int]] = {}
    for metric in metrics:
        if metric is None or metric.kind == "logit_lens":
            continue
        for row, pos in zip(metric.rows, metric.positions):
            keep.setdefault(row, set()).add(pos)
        for row, pos in zip(metric.reference_rows, metric.reference_positions):
            keep.setdefault(row, set()).add(pos)
        if metric.kind == "loss":  # every next-token prediction of the prompt
            for row in metric.rows:
                keep.setdefault(row, set()).update(range(len(ctx.rows[row].tokens)))
    for index, row in enumerate(ctx.rows):
        if not ctx.grids[row.invoke].axes:  # the summary shows next tokens of unswept rows
            keep.setdefault(index, set()).add(len(row.tokens) - 1)
    return keep


def plan_saves(ctx: Context) -> list[PlanSave]:
    out = []
    step_of = {op.store: op.steps for op in ctx.ops if op.kind == "save" and op.steps is not None}
    for name, keys in ctx.save_keys.items():
        invoke, site = ctx.save_meta[name]
        grid = ctx.grids[invoke]
        each = ctx.input_axis(invoke)
        axes = tuple(grid.axes) + ((each,) if each else ())
        shape = tuple(grid.shape) + ((len(ctx.tokens[invoke]),) if each else ())
        npos = list(ctx.save_npos[name])
        steps = step_of.get(keys[0])
        value_axes, values = ctx.save_layout[name]
        values = dict(values)
        if steps is not None:  # generation: one value per step, stacked after the prompt axis
            keys = [f"{key}@{s}" for key in keys for s in steps]
            npos = [n if s == 0 else 1 for n in npos for s in steps]
            axes, shape = axes + ("step",), shape + (len(steps),)
            if steps != (0,):  # later steps hold the new token, not the prompt's positions
                values.pop(value_axes[0], None)
        out.append(
            PlanSave(name, invoke, site, tuple(keys), tuple(npos), axes, shape, value_axes, values)
        )
    return out


def result_axes(
    ctx: Context,
) -> tuple[dict[str, dict[str, list[Any]]], dict[str, dict[str, list[str]]]]:
    values: dict[str, dict[str, list[Any]]] = {}
    labels: dict[str, dict[str, list[str]]] = {}
    for name, grid in ctx.grids.items():
        values[name] = grid.axis_values()
        labels[name] = {}
        if "pos" in grid.axes and not grid.zipped:
            strs = position_labels(ctx, name)
            labels[name]["pos"] = [f"{p}:{strs[p]}" for p in values[name]["pos"]]
        each = ctx.input_axis(name)
        if each:
            values[name][each] = list(range(len(ctx.tokens[name])))
    return values, labels
