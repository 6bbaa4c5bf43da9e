"""Compiling metrics: which rows and position each reads, token ids, result axes (torch-free)."""

from __future__ import annotations

from typing import Any

from ..errors import did_you_mean, format_path
from ..plan import PlanMetric, RowOp
from ..sites import SiteError, family_table, resolve_site
from .aggregate import check_baseline, compile_reduce, one_per_input
from .attribution import compile_attribution
from .context import Abort, Context, SpecContext, SpecPath, plain
from .dataset import (
    check_metric_columns,
    column_names,
    item_label,
    render_selector,
    render_value,
)
from .distributions import check_reference, kl_reference
from .positions import PositionError, resolve_position

__all__ = ["compile_metric", "metric_invoke_exists", "recovery_inputs_ok"]


def compile_metric(ctx: Context, name: str, metric: Any) -> PlanMetric | None:
    path: SpecPath = ("metrics", name)
    if metric.kind == "recovery":
        return _recovery(ctx, name, metric, path)
    if metric.kind == "attribution":
        return compile_attribution(ctx, name, metric, path)
    if not metric_invoke_exists(ctx, name, metric):
        return None
    if ctx.info.inputs == "image" and "position" in metric.model_fields_set:
        ctx.fail(
            "classifier-position",
            "an image classifier has one output per image, not one per position",
            path + ("position",),
            "remove 'position'; to read a position inside the model, save a site there",
        )
        return None
    reference: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    try:
        grid = ctx.grids[metric.invoke]
        cells = len(grid.cells()) if grid.axes else 1
        prompts = ctx.tokens[metric.invoke]
        item = _item_of(ctx, name, metric)
        if metric.kind == "loss":  # every position is read; the last stands for the row
            picked = [len(tokens) - 1 for tokens in prompts]
        else:
            picked = [
                _metric_position(ctx, metric, tokens, item(i), path)
                for i, tokens in enumerate(prompts)
            ]
        rows, positions = [], []
        for cell in range(cells):
            for prompt_index in range(len(prompts)):
                rows.append(ctx.row_index[(metric.invoke, cell, prompt_index)])
                positions.append(picked[prompt_index])
        tokens_ref: list[str | int] = []
        squeeze = False
        if metric.kind == "logit_diff":
            tokens_ref = [metric.target, metric.foil]
            token_paths = [path + ("target",), path + ("foil",)]
        elif metric.kind == "top_k":
            token_paths = []
            if ctx.info.vocab_size and metric.k > ctx.info.vocab_size:
                raise ctx.fail(
                    "bad-k",
                    f"k = {metric.k} but the model has {ctx.info.vocab_size} outputs",
                    path + ("k",),
                    f"use k <= {ctx.info.vocab_size}",
                )
        elif metric.kind in ("kl", "loss"):
            token_paths = []
            if metric.kind == "kl":
                if not check_reference(ctx, name, metric):
                    raise Abort
                where = _position_in(ctx, name, metric)
                reference = kl_reference(ctx, metric, picked, cells, where)
        elif metric.kind == "accuracy":
            squeeze = True
            tokens_ref, token_paths = [metric.target], [path + ("target",)]
        elif metric.kind == "logit_lens":
            squeeze = True
            tokens_ref = [metric.token] if metric.token is not None else []
            token_paths = [path + ("token",)]
            lens = _lens(ctx, name, metric, rows, positions, path)
        else:
            squeeze = metric.token is not None
            tokens_ref = [metric.token] if squeeze else list(metric.tokens)
            token_paths = (
                [path + ("token",)]
                if squeeze
                else [path + ("tokens", i) for i in range(len(tokens_ref))]
            )
        ids: list[int] = []
        row_ids: tuple[tuple[int, ...], ...] = ()
        if column_names(tokens_ref):
            per_item = [
                tuple(
                    ctx.token_id(render_value(ref, ctx.items.rows[i]), p, _where(ctx, i, ref))  # type: ignore[union-attr]
                    for ref, p in zip(tokens_ref, token_paths)
                )
                for i in range(len(prompts))
            ]
            row_ids = tuple(per_item[i] for _ in range(cells) for i in range(len(prompts)))
            token_strs = tuple(str(ref) for ref in tokens_ref)
        else:
            ids = [ctx.token_id(ref, p) for ref, p in zip(tokens_ref, token_paths)]
            token_strs = tuple(ctx.tok.token_str(i) for i in ids)
        each = ctx.input_axis(metric.invoke)
        axes = tuple(grid.axes) + ((each,) if each else ())
        shape = tuple(grid.shape) + ((len(prompts),) if each else ())
        reduce = compile_reduce(ctx, name, metric, axes, shape, each)
        if not check_baseline(ctx, name, metric):
            raise Abort
    except Abort:
        return None
    extra = {}
    if metric.kind == "logit_lens":
        extra = dict(zip(("sites", "store_keys", "lens_modules"), lens))
    return PlanMetric(
        name=name,
        kind=metric.kind,
        invoke=metric.invoke,
        rows=tuple(rows),
        positions=tuple(positions),
        tokens=tuple(ids),
        row_tokens=row_ids,
        token_strs=token_strs,
        k=getattr(metric, "k", None),
        squeeze_token=squeeze,
        axes=axes,
        shape=shape,
        reduce=reduce,
        baseline=getattr(metric, "baseline", None),
        reference_rows=reference[0],
        reference_positions=reference[1],
        **extra,
    )


def _item_of(ctx: Context, name: str, metric: Any) -> Any:
    """prompt index -> the dataset item it is (None when the invoke is not over the dataset)."""
    if not check_metric_columns(ctx, name, metric):
        raise Abort
    return (lambda i: i) if metric.invoke in ctx.item_invokes else (lambda i: None)


def _position_in(ctx: Context, name: str, metric: Any) -> Any:
    """(invoke, prompt index) -> the position the metric's selector picks in that prompt."""

    def position(invoke: str, prompt: int) -> int:
        item = prompt if invoke in ctx.item_invokes else None
        path = ("metrics", name)
        return _metric_position(ctx, metric, ctx.tokens[invoke][prompt], item, path)

    return position


def _where(ctx: Context, item: int, template: Any) -> str:
    assert ctx.items is not None
    return item_label(ctx.items, item, template) + ": "


def _metric_position(
    ctx: Context, metric: Any, tokens: list[int], item: int | None, path: SpecPath
) -> int:
    """The one position a metric reads in a prompt (in a dataset item, with its values)."""
    selector = plain(metric.position)
    concrete = selector if item is None else render_selector(selector, ctx.items.rows[item])  # type: ignore[union-attr]
    where = "" if item is None else _where(ctx, item, selector)
    try:
        picked = resolve_position(concrete, tokens, ctx.tok)
    except PositionError as exc:
        raise ctx.fail(
            "bad-position", where + exc.message, path + ("position",), exc.hint
        ) from None
    if len(picked) != 1:
        raise ctx.fail(
            "bad-position",
            f"{where}a metric reads one position; this selects {len(picked)}",
            path + ("position",),
            "use 'last', an index such as -1, or {token: ' John'}",
        )
    return picked[0]


def _lens(
    ctx: Context, name: str, metric: Any, rows: list[int], positions: list[int], path: SpecPath
) -> tuple:
    """Save ops feeding a logit lens, and the modules that decode what they save."""
    table = family_table(ctx.info)
    if table is None or not {"final_norm", "logits"} <= set(table["sites"]):
        raise ctx.fail(
            "no-lens",
            f"logit_lens needs the final norm and unembedding, unknown for {ctx.info.architecture}",
            path + ("kind",),
        )
    try:
        sites = resolve_site(metric.site, ctx.info)
    except SiteError as exc:
        raise ctx.fail("unknown-site", exc.message, path + ("site",), exc.hint) from None
    for site in sites:
        if site.heads is not None or site.width not in (None, ctx.info.d_model):
            raise ctx.fail(
                "lens-site",
                f"logit_lens decodes residual-stream sites; '{site.name}' is not d_model wide",
                path + ("site",),
                "use resid_post.*, resid_mid.*, attn_out.* or mlp_out.*",
            )
    keys = []
    for row, pos in zip(rows, positions):
        for site in sites:
            key = f"lens/{name}/{row}/{site.name}"
            keys.append(key)
            ctx.ops.append(
                RowOp(
                    "save",
                    site.name,
                    site.module,
                    site.io,
                    row,
                    (pos,),
                    store=key,
                    origin=format_path(path),
                    layer=site.layer,
                )
            )
    modules = (table["sites"]["final_norm"][0], table["sites"]["logits"][0])
    return tuple(s.name for s in sites), tuple(keys), modules


_SCALAR_KINDS = ("logit_diff", "logits", "logprob", "prob")


def metric_invoke_exists(ctx: SpecContext, name: str, metric: Any) -> bool:
    """Whether a metric's invoke exists (a located issue when not; needs no model)."""
    if metric.invoke in ctx.spec.invokes:
        return True
    invokes = ctx.spec.invokes
    hint = did_you_mean(metric.invoke, invokes) or "invokes: " + ", ".join(invokes)
    path = ("metrics", name, "invoke")
    ctx.fail("unknown-invoke", f"no invoke named '{metric.invoke}'", path, hint)
    return False


def recovery_inputs_ok(ctx: SpecContext, name: str, metric: Any) -> bool:
    """Whether the metrics a recovery is computed from exist and fit: scalar kinds, and single
    values for clean and corrupt (located issues when not; needs no model)."""
    metrics, path = ctx.spec.metrics, ("metrics", name)
    ok = True
    for role in ("patched", "clean", "corrupt"):
        ref = getattr(metric, role)
        other = metrics.get(ref)
        if other is None or ref == name:
            candidates = [n for n, m in metrics.items() if n != name and m.kind in _SCALAR_KINDS]
            hint = did_you_mean(ref, candidates) or "metrics: " + ", ".join(candidates)
            ctx.fail(
                "unknown-metric",
                f"no metric named '{ref}' to use as '{role}'",
                path + (role,),
                hint,
            )
            ok = False
        elif other.kind not in _SCALAR_KINDS:
            ctx.fail(
                "bad-recovery",
                f"'{ref}' is a {other.kind} metric; recovery needs logit_diff, logits, logprob or prob",
                path + (role,),
            )
            ok = False
        elif other.invoke not in ctx.spec.invokes:  # that metric reports its unknown invoke
            ok = False
        elif role != "patched" and not _patched_fits(ctx, other.invoke, metrics, metric):
            ctx.fail(
                "bad-recovery",
                f"the {role} metric '{ref}' must be one value, or one per item of the patched "
                "metric: its invoke has a sweep, or other prompts than the patched one",
                path + (role,),
                "measure the clean and corrupted runs in invokes with one prompt (or the "
                "dataset's items) and no sweep",
            )
            ok = False
    return ok


def _patched_fits(ctx: SpecContext, invoke: str, metrics: Any, metric: Any) -> bool:
    patched = metrics.get(metric.patched)
    if patched is None or patched.invoke not in ctx.spec.invokes:
        return True  # reported for the patched metric
    return one_per_input(ctx, invoke, patched.invoke)


def _recovery(ctx: Context, name: str, metric: Any, path: SpecPath) -> PlanMetric | None:
    """(patched - corrupt) / (clean - corrupt): the clean and corrupt metrics must not be swept."""
    if not recovery_inputs_ok(ctx, name, metric):
        return None
    metrics = ctx.spec.metrics
    inputs = [metric.patched, metric.clean, metric.corrupt]
    patched = metrics[metric.patched]
    grid = ctx.grids[patched.invoke]
    each = ctx.input_axis(patched.invoke)
    axes = tuple(grid.axes) + ((each,) if each else ())
    shape = tuple(grid.shape) + ((len(ctx.tokens[patched.invoke]),) if each else ())
    try:
        reduce = compile_reduce(ctx, name, metric, axes, shape, each)
    except Abort:
        return None
    if reduce is not None:  # which of clean and corrupt have a value per item
        reduce["inputs_per_item"] = [
            ctx.input_axis(metrics[ref].invoke) is not None for ref in inputs[1:]
        ]
    return PlanMetric(
        name=name,
        kind="recovery",
        invoke=patched.invoke,
        rows=(),
        positions=(),
        axes=axes,
        shape=shape,
        inputs=tuple(inputs),
        reduce=reduce,
    )
