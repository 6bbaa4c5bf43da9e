"""Compiling ``expect:`` entries (torch-free): the tensor each names, the cells ``where`` picks,
the token an ``argmax``/``top_k`` check means, and the entry's place in the spec file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import did_you_mean, format_path
from ..plan import Metric, PlanExpectation, PlanSave
from ..plan.codec import kinds_of
from .context import Abort, Context, SpecPath

__all__ = ["compile_expectations", "pick_cells"]


def _tensor_axes(metric: Metric | None, save: PlanSave | None) -> tuple[str, ...]:
    if save is not None:
        return (*save.axes, *save.value_axes)
    assert metric is not None
    return (*metric.result_axes, *metric.suffix())


def _axis_values(
    ctx: Context, metric: Metric | None, save: PlanSave | None, axis: str
) -> list[Any]:
    invoke = metric.invoke if metric is not None else save.invoke  # type: ignore[union-attr]
    if metric is not None and axis in metric.suffix():
        return list(metric.suffix_values(axis) or [])
    if save is not None and axis in save.value_axis_values:
        return list(save.value_axis_values[axis])
    return list(ctx.grids[invoke].axis_values().get(axis, [])) or list(
        range(len(ctx.tokens[invoke])) if axis == ctx.input_axis(invoke) else []
    )


def pick_cells(values: list[Any], selector: Any, axis: str, fail: Any) -> tuple[int, ...]:
    """Indices of the axis values a selector names (a value, a list, or a 'start:stop' range)."""
    items = selector if isinstance(selector, list) else [selector]
    picked: list[int] = []
    for item in items:
        if (
            isinstance(item, str)
            and ":" in item
            and all(p.lstrip("-").isdigit() or p == "" for p in item.split(":")[:2])
        ):
            start_s, stop_s = item.split(":")[:2]
            start = int(start_s) if start_s else None
            stop = int(stop_s) if stop_s else None
            found = [
                i
                for i, v in enumerate(values)
                if isinstance(v, int | float)
                and (start is None or v >= start)
                and (stop is None or v < stop)
            ]
        else:
            found = [i for i, v in enumerate(values) if v == item or str(v) == str(item)]
        if not found:
            shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
            raise fail(f"{axis} {item!r} is not on this axis", f"{axis} takes {shown}")
        picked.extend(i for i in found if i not in picked)
    return tuple(picked)


def compile_expectations(
    ctx: Context, metrics: Sequence[Metric], saves: Sequence[PlanSave]
) -> list[PlanExpectation]:
    by_metric = {m.name: m for m in metrics}
    by_save = {s.name: s for s in saves}
    out = []
    for index, expectation in enumerate(ctx.spec.expect):
        path: SpecPath = ("expect", index)
        try:
            out.append(_compile_one(ctx, index, expectation, path, by_metric, by_save))
        except Abort:
            continue
    return out


def _compile_one(
    ctx: Context,
    index: int,
    exp: Any,
    path: SpecPath,
    by_metric: dict[str, Metric],
    by_save: dict[str, PlanSave],
) -> PlanExpectation:
    metric, save = _target(ctx, exp, path, by_metric, by_save)
    axes = _tensor_axes(metric, save)
    if metric is not None and exp.metric != metric.name:  # a companion: ``dla/residual``
        axes = tuple(metric.companion_axes(exp.metric.split("/", 1)[1], list(axes)))
    select = _cells(ctx, exp, path, metric, save, axes)
    token = _token_check(ctx, exp, metric, path)
    checks = {
        name: getattr(exp, name)
        for name in ("equals", "approx", "greater_than", "less_than")
        if getattr(exp, name) is not None
    }
    if "approx" in checks:
        checks.update(rtol=exp.rtol, atol=exp.atol)
    if exp.argmax is not None:
        checks["argmax"] = True
    if exp.top_k is not None:
        checks["top_k"] = True
    line, col = ctx.doc.source.locate(path)
    location = f"{ctx.doc.file or '<spec>'}:{line}:{col}" if line else (ctx.doc.file or "<spec>")
    return PlanExpectation(
        index=index,
        target=exp.metric if metric is not None else save.name,  # type: ignore[union-attr]
        target_kind="metric" if metric is not None else "saved",
        axes=axes,
        select=select,
        over=exp.over,
        checks=checks,
        **token,
        location=f"{location} {format_path(path)}",
        message=exp.message,
    )


def _target(
    ctx: Context,
    exp: Any,
    path: SpecPath,
    by_metric: dict[str, Metric],
    by_save: dict[str, PlanSave],
) -> tuple[Metric | None, PlanSave | None]:
    """The metric or the saved value a claim names."""
    if exp.metric is not None:
        base, _, companion = exp.metric.partition("/")
        metric = by_metric.get(base)
        if metric is None:
            hint = did_you_mean(base, by_metric) or "metrics: " + ", ".join(by_metric)
            raise ctx.fail("unknown-metric", f"no metric named '{base}'", path + ("metric",), hint)
        if companion and companion not in metric.companions:
            named = [f"{base}/{c}" for c in metric.companions]
            hint = did_you_mean(exp.metric, named) or (
                "its results: " + ", ".join(named) if named else f"claim on '{base}' itself"
            )
            raise ctx.fail(
                "unknown-metric",
                f"metric '{base}' has no result '{companion}'",
                path + ("metric",),
                hint,
            )
        return metric, None
    save = by_save.get(exp.saved)
    if save is None:
        hint = did_you_mean(exp.saved, by_save) or "saved values: " + (", ".join(by_save) or "none")
        raise ctx.fail(
            "unknown-saved", f"no saved value named '{exp.saved}'", path + ("saved",), hint
        )
    return None, save


def _cells(
    ctx: Context,
    exp: Any,
    path: SpecPath,
    metric: Metric | None,
    save: PlanSave | None,
    axes: tuple[str, ...],
) -> tuple[tuple[int, ...] | None, ...]:
    """Per axis of the claim's tensor, the cells its ``where`` picks (None: every cell)."""
    select: list[tuple[int, ...] | None] = [None] * len(axes)
    for axis, selector in exp.where.items():
        if axis not in axes or axis in ("hidden", "k"):
            hint = (
                "a ranking is checked with argmax or top_k, a vector as a whole"
                if axis in axes
                else did_you_mean(axis, axes)
                or ("axes: " + ", ".join(axes) if axes else "this result has no axes")
            )
            raise ctx.fail(
                "unknown-axis", f"the result has no axis '{axis}'", path + ("where", axis), hint
            )

        def fail(message: str, hint: str | None, _axis: str = axis) -> Any:
            return ctx.fail("bad-cell", message, path + ("where", _axis), hint)

        values = _axis_values(ctx, metric, save, axis)
        select[axes.index(axis)] = pick_cells(values, selector, axis, fail)
    return tuple(select)


def _token_check(ctx: Context, exp: Any, metric: Metric | None, path: SpecPath) -> dict[str, Any]:
    """The token an ``argmax`` or ``top_k`` claim names, and where its result holds ids (the
    kinds say which checks they allow: :meth:`~specsight.plan.Metric.token_checks`)."""
    allowed = metric.token_checks() if metric is not None and exp.metric == metric.name else {}
    out: dict[str, Any] = {}
    for check in ("argmax", "top_k"):
        ref = getattr(exp, check)
        if ref is None:
            continue
        if check not in allowed:
            what = metric.kind if metric is not None else "a saved value"
            ranking = [tag for tag, kind in kinds_of(Metric).items() if kind.ranks_tokens]
            use = f"a {' or '.join(ranking)} metric" + (
                " or a metric with several tokens" if check == "argmax" else ""
            )
            raise ctx.fail(
                "bad-check",
                f"'{check}' does not apply to {what}",
                path + (check,),
                f"use it on {use}",
            )
        token_id = ctx.token_id(ref, path + (check,))
        out = {"token_id": token_id, "token_str": ctx.tok.token_str(token_id)}
        out["token_source"] = allowed[check]
        if allowed[check] == "tokens":  # among the metric's own tokens
            tokens = metric.tokens  # type: ignore[union-attr]
            if token_id not in tokens.ids:
                raise ctx.fail(
                    "bad-check",
                    f"{out['token_str']!r} is not one of the metric's tokens",
                    path + (check,),
                    "argmax compares the metric's own tokens: "
                    + ", ".join(map(repr, tokens.labels)),
                )
            out["token_index"] = list(tokens.ids).index(token_id)
    return out
