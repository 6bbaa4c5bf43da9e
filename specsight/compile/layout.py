"""The layout of a plan's results (torch-free): each save's axes and store keys, and what the
plan says of each invoke (inputs, stage, sweep axes, their values and labels). Also the
modules after the layer stack (final norm, unembedding), which no row's first touched layer
counts.
"""

from __future__ import annotations

from typing import Any

from ..models import ModelInfo
from ..plan import InvokeInfo, InvokeRef, PlanSave, ResultRef, StoreKey
from ..plan.ops import Save
from ..sites import family_table
from .context import Context
from .inputs import position_labels

__all__ = ["after_layer_modules", "plan_saves", "invoke_infos"]


def after_layer_modules(info: ModelInfo) -> tuple[tuple[str, ...], str | None]:
    """Modules that run after the layer stack (final norm, unembedding), and the unembedding."""
    table = family_table(info)
    sites = table["sites"] if table else {}
    after = tuple(sites[name][0] for name in ("final_norm", "logits") if name in sites)
    return after, sites["logits"][0] if "logits" in sites else None


def plan_saves(ctx: Context) -> list[PlanSave]:
    out = []
    step_of = {op.store: op.steps for op in ctx.ops if isinstance(op, Save) and op.steps}
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
        differ = steps is None and value_axes[0] not in values  # rows select other positions
        rows = tuple(ctx.save_positions[name]) if differ else ()
        if steps is not None:  # generation: one value per step, stacked after the prompt axis
            keys = [StoreKey(f"{key}@{s}") for key in keys for s in steps]
            npos = [n if s == 0 else 1 for n in npos for s in steps]
            axes, shape = axes + ("step",), shape + (len(steps),)
            if steps != (0,):  # later steps hold the new token, not the prompt's positions
                values.pop(value_axes[0], None)
        out.append(
            PlanSave(
                name=ResultRef(name),
                invoke=InvokeRef(invoke),
                site=site,
                keys=tuple(keys),
                n_positions=tuple(npos),
                axes=axes,
                shape=shape,
                value_axes=value_axes,
                value_axis_values={k: tuple(v) for k, v in values.items()},
                row_positions=rows,
            )
        )
    return out


def invoke_infos(
    ctx: Context, stages: dict[str, int], order: list[str]
) -> dict[InvokeRef, InvokeInfo]:
    """What the plan says of each invoke, in ``order``."""
    out = {}
    for name in order:
        grid = ctx.grids[name]
        values: dict[str, Any] = grid.axis_values()
        labels: dict[str, tuple[str, ...]] = {}
        if "pos" in grid.axes and not grid.zipped:
            strs = position_labels(ctx, name)
            labels["pos"] = tuple(f"{p}:{strs[p]}" for p in values["pos"])
        each = ctx.input_axis(name)
        if each:
            values[each] = list(range(len(ctx.tokens[name])))
        out[InvokeRef(name)] = InvokeInfo(
            prompts=len(ctx.tokens[name]),
            tokens=tuple(len(t) for t in ctx.tokens[name]),
            stage=stages[name],
            cells=len(grid.cells()) if grid.axes else 1,
            axes=tuple(grid.axes),
            axis_values={axis: tuple(v) for axis, v in values.items()},
            axis_labels=labels,
            inputs=tuple(ctx.input_names[name]) if name in ctx.input_names else None,
        )
    return out
