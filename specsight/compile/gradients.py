"""Compiling gradients (torch-free): the ``backward:`` metric and ``save`` ops with ``grad``.

A backward pass starts from one metric, summed over its rows; a ``save`` with ``grad: true``
keeps the gradient of that sum with respect to its site, so it must act on the rows the metric
reads. Generation has no backward pass: its invokes cannot be measured or keep gradients.
"""

from __future__ import annotations

from .. import spec as S
from ..errors import did_you_mean
from .context import SpecContext

__all__ = ["check_backward", "BACKWARD_KINDS"]

BACKWARD_KINDS = ("logits", "logprob", "prob", "logit_diff")


def check_backward(ctx: SpecContext) -> str | None:
    """The backward metric's name (None without ``backward:``), after located checks."""
    backward = ctx.spec.backward
    metric = None
    if backward is not None:
        metric = ctx.spec.metrics.get(backward.metric)
        if metric is None:
            names = list(ctx.spec.metrics)
            hint = did_you_mean(backward.metric, names) or (
                "metrics: " + ", ".join(names) if names else "add a metric under 'metrics:'"
            )
            ctx.fail(
                "unknown-metric",
                f"no metric named '{backward.metric}'",
                ("backward", "metric"),
                hint,
            )
        elif metric.kind not in BACKWARD_KINDS:
            ctx.fail(
                "backward-kind",
                f"a backward pass needs a differentiable metric; '{backward.metric}' is "
                f"{metric.kind}",
                ("backward", "metric"),
                "use a metric of kind " + ", ".join(BACKWARD_KINDS),
            )
            metric = None
    for name, invoke in ctx.spec.invokes.items():
        for i, op in enumerate(invoke.ops):
            if not (isinstance(op, S.SaveOp) and op.grad):
                continue
            path = ("invokes", name, "ops", i, "grad")
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
    attributions = [n for n, m in ctx.spec.metrics.items() if m.kind == "attribution"]
    for extra in attributions[1:] if backward is None else attributions:
        ctx.fail(
            "one-backward",
            f"attribution metric '{extra}' needs a backward pass of its own, but the spec "
            + (
                "already has 'backward:'"
                if backward is not None
                else f"already runs one for '{attributions[0]}'"
            ),
            ("metrics", extra, "kind"),
            "one backward pass per spec: split the spec in two",
        )
    if backward is not None:
        return backward.metric
    return attributions[0] if attributions else None
