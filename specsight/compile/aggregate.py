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
from ..plan import Reduce
from .context import Context, SpecContext, SpecPath

__all__ = ["check_baseline", "compile_reduce", "one_per_input"]


def compile_reduce(
    ctx: Context,
    name: str,
    metric: Any,
    axes: tuple[str, ...],
    shape: tuple[int, ...],
    input_axis: str | None,
    by_default: bool = False,
) -> Reduce | None:
    """The plan's description of a metric's reduction (None: not reduced); raises Abort after
    a located issue. ``by_default``: over its inputs' axis (a mean) unless ``reduce`` says
    otherwise (accuracy)."""
    path: SpecPath = ("metrics", name, "reduce")
    of = getattr(metric, "of", "items")
    reduce = getattr(metric, "reduce", None)
    if reduce is None and by_default and input_axis is not None:
        reduce = S.Reduce(over=input_axis)
    if reduce is None and of == "means":
        reduce = S.Reduce()
        path = ("metrics", name, "of")
    if reduce is None:
        return None
    if not metric.reducible:
        raise ctx.fail(
            "bad-reduce",
            f"a {metric.kind} metric is not reduced: each row has its own top tokens",
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
    return Reduce(
        over=over,
        axis=axes.index(over),
        size=shape[axes.index(over)],
        stat=reduce.stat,
        ci=reduce.ci is not None,
        level=reduce.level,
        n_boot=reduce.n_boot,
        seed=reduce.seed,
    )


def one_per_input(ctx: SpecContext, invoke: str, reference: str) -> bool:
    """Whether ``invoke`` gives one value, or one per input of ``reference`` (the same dataset
    items, or as many prompts): what a recovery's clean run and a baseline must give."""
    spec_invoke = ctx.spec.invokes[invoke]
    if spec_invoke.sweep:
        return False
    axis = ctx.input_axis(invoke)
    if axis is None:
        return True
    if axis != ctx.input_axis(reference):
        return False
    return axis == "item" or len(spec_invoke.prompts) == len(ctx.spec.invokes[reference].prompts)


def check_baseline(ctx: SpecContext, name: str, metric: Any) -> bool:
    """A metric's ``baseline`` names another metric of the same kind whose invoke gives one
    value or one per item (located issues when not; needs no model)."""
    ref = getattr(metric, "baseline", None)
    if ref is None:
        return True
    path: SpecPath = ("metrics", name, "baseline")
    metrics = ctx.spec.metrics
    other = metrics.get(ref)
    if not metric.takes_baseline:
        ctx.fail(
            "bad-baseline",
            f"a {metric.kind} metric has no baseline: its values are per token",
            path,
            "give the baseline to a logit_diff, logits, logprob or prob metric",
        )
        return False
    if other is None or ref == name:
        same = [n for n, m in metrics.items() if n != name and type(m) is type(metric)]
        hint = did_you_mean(ref, same) or "metrics of that kind: " + (", ".join(same) or "none")
        ctx.fail("unknown-metric", f"no metric named '{ref}' to use as the baseline", path, hint)
        return False
    if type(other) is not type(metric):
        ctx.fail(
            "bad-baseline",
            f"'{ref}' is a {other.kind} metric; the baseline of a {metric.kind} metric must be "
            "one too",
            path,
            f"measure the unmodified run with kind: {metric.kind}",
        )
        return False
    invokes = ctx.spec.invokes
    if (
        other.invoke in invokes
        and metric.invoke in invokes
        and not one_per_input(ctx, other.invoke, metric.invoke)
    ):
        ctx.fail(
            "bad-baseline",
            f"the baseline '{ref}' must be one value, or one per item of '{name}': its "
            "invoke has a sweep, or other prompts",
            path,
            "measure the unmodified run in an invoke without a sweep, over the same items",
        )
        return False
    return True
