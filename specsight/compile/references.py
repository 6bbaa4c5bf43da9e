"""The checks of a spec that need no model (``specsight validate`` without the model's files):
every name a spec uses refers to something it defines (invokes, saved values, metrics,
sweep variables), invokes do not read from each other in a loop, and generation, gradients
and expectations are used where they can work. The compiler runs the same passes; what needs
the model (sites, layers, positions, tokens, sizes) is left to it.
"""

from __future__ import annotations

from typing import Any

from .. import spec as S
from ..errors import SpecError, did_you_mean
from ..spec import LoadedDoc, SaveOp, Spec
from .aggregate import check_baseline
from .cells import check_variables
from .context import Abort, SpecContext, SpecPath
from .dataset import check_metric_columns, invoke_prompts, use_dataset
from .distributions import check_reference
from .expectations import pick_cells
from .generation import check_generation
from .gradients import check_backward
from .metrics import metric_invoke_exists, recovery_inputs_ok
from .stages import collect_save_names, order_stages

__all__ = ["check_references"]


def check_references(spec: Spec, doc: LoadedDoc) -> None:
    """Raise one SpecError with every problem found without a model."""
    ctx = SpecContext(spec=spec, doc=doc)
    use_dataset(ctx)
    for name, invoke in spec.invokes.items():
        invoke_prompts(ctx, name, invoke)  # flags unknown columns
    collect_save_names(ctx)
    order_stages(ctx)
    check_generation(ctx)
    for name in spec.invokes:
        check_variables(ctx, name)
    for name, metric in spec.metrics.items():
        _METRIC_CHECKS.get(type(metric), _measured)(ctx, name, metric)
    check_backward(ctx)
    _expectation_targets(ctx)
    if ctx.issues:
        issues = sorted(ctx.issues.values(), key=lambda i: (i.line or 0, i.col or 0))
        raise SpecError(issues)


def _attribution_invokes(ctx: SpecContext, name: str, metric: object) -> None:
    invokes = ctx.spec.invokes
    for role in ("clean", "corrupt"):
        ref = getattr(metric, role)
        if ref not in invokes:
            hint = did_you_mean(ref, invokes) or "invokes: " + ", ".join(invokes)
            ctx.fail("unknown-invoke", f"no invoke named '{ref}'", ("metrics", name, role), hint)


def _measured(ctx: SpecContext, name: str, metric: Any) -> None:
    """A metric of an invoke's rows: the invoke, the columns its templates name, its baseline."""
    if metric_invoke_exists(ctx, name, metric):
        check_metric_columns(ctx, name, metric)
        check_baseline(ctx, name, metric)


def _kl(ctx: SpecContext, name: str, metric: Any) -> None:
    if metric_invoke_exists(ctx, name, metric):
        check_metric_columns(ctx, name, metric)
        check_baseline(ctx, name, metric)
        check_reference(ctx, name, metric)


#: the model-free checks of metric kinds that are not plain measurements of an invoke
_METRIC_CHECKS: dict[type, Any] = {
    S.RecoveryMetric: recovery_inputs_ok,
    S.AttributionMetric: _attribution_invokes,
    S.KlMetric: _kl,
}


def _metric_axes(ctx: SpecContext, name: str) -> tuple[str, ...] | None:
    """The axes of a metric's result, from the spec alone (None when its invoke is unknown)."""
    metric = ctx.spec.metrics[name]
    if metric.fixed_axes is not None:
        return metric.fixed_axes
    owner = metric
    if metric.shaped_like is not None:  # shaped like the patched metric's invoke
        owner = ctx.spec.metrics.get(metric.shaped_like)
        if owner is None or getattr(owner, "invoke", None) is None:
            return None
    invoke = ctx.spec.invokes.get(owner.invoke)
    if invoke is None:
        return None
    each = ctx.input_axis(owner.invoke)
    axes = tuple(invoke.sweep or ()) + ((each,) if each else ())
    reduce = getattr(metric, "reduce", None)
    if reduce is None and getattr(metric, "of", None) == "means":
        axes = tuple(a for a in axes if a != each)
    elif reduce is not None:
        over = reduce.over if "over" in reduce.model_fields_set or not each else each
        axes = tuple(a for a in axes if a != over)
    return axes + metric.value_axes()


def _check_where(ctx: SpecContext, exp: Any, path: SpecPath) -> None:
    """``where`` names axes the metric has, and values its sweep lists (when it lists them)."""
    axes = _metric_axes(ctx, exp.metric)
    if axes is None:
        return
    metric = ctx.spec.metrics[exp.metric]
    owner = ctx.spec.metrics[metric.shaped_like] if metric.shaped_like else metric
    sweep = {} if metric.fixed_axes else ctx.spec.invokes[owner.invoke].sweep or {}
    for axis, selector in exp.where.items():
        if axis not in axes:
            hint = did_you_mean(axis, axes) or (
                "axes: " + ", ".join(axes) if axes else "this result has no axes"
            )
            ctx.fail(
                "unknown-axis", f"the result has no axis '{axis}'", path + ("where", axis), hint
            )
            continue
        listed = sweep.get(axis)
        if isinstance(listed, list):

            def fail(message: str, hint: str | None, _axis: str = axis) -> Abort:
                return ctx.fail("bad-cell", message, path + ("where", _axis), hint)

            try:
                pick_cells(listed, selector, axis, fail)
            except Abort:
                continue


def _expectation_targets(ctx: SpecContext) -> None:
    """Expectations name metrics the spec has and axes and swept values those metrics have, and
    saved values its saves make (a save of a wildcard or range of sites names its values per
    site, known only with the model)."""
    metrics = ctx.spec.metrics
    saves = set(ctx.save_names)
    per_site = any(
        isinstance(op, SaveOp) and not op.name and ("*" in op.site or ":" in op.site)
        for invoke in ctx.spec.invokes.values()
        for op in invoke.ops
    )
    for index, exp in enumerate(ctx.spec.expect):
        path = ("expect", index)
        base = exp.metric.split("/")[0] if exp.metric is not None else None
        if base is not None and base not in metrics:
            hint = did_you_mean(base, metrics) or "metrics: " + ", ".join(metrics)
            ctx.fail("unknown-metric", f"no metric named '{base}'", path + ("metric",), hint)
        elif exp.metric is not None and "/" not in exp.metric:  # a companion's: at compile
            _check_where(ctx, exp, path)
        elif exp.saved is not None and exp.saved not in saves and not per_site:
            hint = did_you_mean(exp.saved, saves) or "saved values: " + (
                ", ".join(sorted(saves)) or "none"
            )
            ctx.fail(
                "unknown-saved", f"no saved value named '{exp.saved}'", path + ("saved",), hint
            )
