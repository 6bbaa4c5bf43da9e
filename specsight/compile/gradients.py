"""Compiling gradients (torch-free): the ``backward:`` metric and ``save`` ops with ``grad``.

A backward pass starts from one metric, summed over its rows; a ``save`` with ``grad: true``
keeps the gradient of that sum with respect to its site, so it must act on the rows the metric
reads. Generation has no backward pass: its invokes cannot be measured or keep gradients.
"""

from __future__ import annotations

from typing import Any

from .. import spec as S
from ..errors import did_you_mean
from .context import SpecContext

__all__ = ["check_backward"]


def check_backward(ctx: SpecContext) -> str | None:
    """The backward metric's name (None without ``backward:``), after located checks."""
    backward = ctx.spec.backward
    metric = _backward_metric(ctx)
    for name, invoke in ctx.spec.invokes.items():
        for i, op in enumerate(invoke.ops):
            if isinstance(op, S.SaveOp) and op.grad:
                _check_grad(ctx, name, invoke, ("invokes", name, "ops", i, "grad"), metric)
    needing = [n for n, m in ctx.spec.metrics.items() if m.needs_backward]
    for extra in needing[1:] if backward is None else needing:
        ctx.fail(
            "one-backward",
            f"{ctx.spec.metrics[extra].kind} metric '{extra}' needs a backward pass of its own, "
            "but the spec "
            + (
                "already has 'backward:'"
                if backward is not None
                else f"already runs one for '{needing[0]}'"
            ),
            ("metrics", extra, "kind"),
            "one backward pass per spec: split the spec in two",
        )
    if backward is not None:
        return backward.metric
    return needing[0] if needing else None


def _backward_metric(ctx: SpecContext) -> Any:
    """The metric ``backward:`` names, when it can start a backward pass (None otherwise, or
    without ``backward:``)."""
    backward = ctx.spec.backward
    if backward is None:
        return None
    metric = ctx.spec.metrics.get(backward.metric)
    if metric is None:
        names = list(ctx.spec.metrics)
        hint = did_you_mean(backward.metric, names) or (
            "metrics: " + ", ".join(names) if names else "add a metric under 'metrics:'"
        )
        ctx.fail(
            "unknown-metric", f"no metric named '{backward.metric}'", ("backward", "metric"), hint
        )
        return None
    if not metric.scalar:
        kinds = [k for k, cls in S.METRIC_CLASSES.items() if getattr(cls, "scalar", False)]
        ctx.fail(
            "backward-kind",
            f"a backward pass needs a differentiable metric; '{backward.metric}' is {metric.kind}",
            ("backward", "metric"),
            "use a metric of kind " + ", ".join(kinds),
        )
        return None
    return metric


def _check_grad(ctx: SpecContext, name: str, invoke: S.Invoke, path: tuple, metric: Any) -> None:
    """A ``save`` with ``grad`` in invoke ``name``: it needs a backward pass whose metric reads
    this invoke, which cannot generate."""
    backward = ctx.spec.backward
    if invoke.generate is not None:
        ctx.fail(
            "grad-generate",
            "gradients are not available while generating (no backward pass runs "
            "through generation or sampling)",
            path,
            "keep gradients in an invoke without 'generate'",
        )
    elif backward is None:
        ctx.fail(
            "grad-without-backward",
            "a gradient needs a backward pass",
            path,
            "add backward: {metric: NAME} at the top level",
        )
    elif metric is not None and metric.invoke != name:
        ctx.fail(
            "grad-invoke",
            f"the backward metric '{backward.metric}' reads invoke '{metric.invoke}', "
            f"so '{name}' gets no gradient",
            path,
            f"save the gradient in '{metric.invoke}', or measure '{name}'",
        )
