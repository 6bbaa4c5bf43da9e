"""Aggregates (torch-free): a metric's ``reduce:`` checked against the metric's axes and
resolved into the plan (which axis, which statistic, the bootstrap's settings).

The engine computes every metric per row first; a reduced metric then keeps its per-item
values as ``<name>/items`` and gets the statistic, its standard error and (on request) a
bootstrap interval. A recovery reads its inputs' per-item values, reduced or not.
"""

from __future__ import annotations

from typing import Any

from .. import spec as S
from ..errors import did_you_mean
from .context import Context, SpecPath

__all__ = ["compile_reduce"]


def compile_reduce(
    ctx: Context,
    name: str,
    metric: Any,
    axes: tuple[str, ...],
    shape: tuple[int, ...],
    input_axis: str | None,
) -> dict[str, Any] | None:
    """The plan's description of a metric's reduction (None: not reduced); raises Abort after
    a located issue."""
    path: SpecPath = ("metrics", name, "reduce")
    of = getattr(metric, "of", "items")
    reduce = metric.reduce
    if reduce is None and of == "means":
        reduce = S.Reduce()
        path = ("metrics", name, "of")
    if reduce is None:
        return None
    if metric.kind == "top_k":
        raise ctx.fail(
            "bad-reduce",
            "a top_k metric is not reduced: each row has its own top tokens",
            path,
            "reduce a prob or logprob metric of the tokens you care about",
        )
    over = reduce.over
    if "over" not in reduce.model_fields_set and input_axis is not None:
        over = input_axis  # the prompts, when there is no dataset
    where = path + (("over",) if "over" in reduce.model_fields_set else ())
    if over not in axes:
        hint = did_you_mean(over, axes) or (
            "axes: " + ", ".join(axes)
            if axes
            else "the metric has one value: run its invoke over a dataset (prompt: '{column}')"
        )
        raise ctx.fail("bad-reduce", f"the metric has no axis '{over}' to reduce", where, hint)
    if of == "means" and over != input_axis:
        raise ctx.fail(
            "bad-reduce",
            f"the recovery of means averages the inputs over their items, not over '{over}'",
            where,
            f"reduce over {input_axis}" if input_axis else "measure over a dataset's items",
        )
    return {
        "over": over,
        "axis": axes.index(over),
        "size": shape[axes.index(over)],
        "stat": reduce.stat,
        "ci": reduce.ci,
        "level": reduce.level,
        "n_boot": reduce.n_boot,
        "seed": reduce.seed,
        "of": of,
    }
