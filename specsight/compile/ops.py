"""Compiling ops: each spec op becomes per-row plan ops (:mod:`specsight.plan.ops`) with
concrete sites and positions (torch-free). The spec's op kinds compile through a table keyed by
their class (``_COMPILERS``); the ablation family lives in :mod:`.ablations`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import spec as S
from ..errors import format_path
from ..plan import RowRef, SaeRef, StoreKey, VectorKey
from ..plan.ops import (
    AddSaved,
    AddVector,
    CallPython,
    Grad,
    Patch,
    Save,
    Scale,
    SetSaved,
    SetVector,
    Zero,
)
from ..sites import Site, SiteError, resolve_site
from .ablations import ABLATION_COMPILERS, capture_key, derangement, vector_key
from .context import Context, SpecPath, default_save_name, plain
from .dataset import item_label, render_selector
from .inputs import read_array_file
from .paths import compile_path_patch
from .positions import PositionError, resolve_positions
from .saved import check_saved_width, mean_diff_keys, saved_keys
from .windows import op_window

__all__ = ["compile_op"]


def _sites(ctx: Context, site: str, path: SpecPath) -> list[Site]:
    try:
        return resolve_site(site, ctx.info, ctx.sae_sites)
    except SiteError as exc:
        raise ctx.fail("unknown-site", exc.message, path + ("site",), exc.hint) from None


def _positions(
    ctx: Context, selectors: Any, tokens: list[int], path: SpecPath, item: int | None = None
) -> list[int]:
    """Resolve selectors (in a dataset item: with its values in their templates); an error
    points at the list item that failed, and names the dataset item."""
    items = selectors if isinstance(selectors, list) else [selectors]
    out: list[int] = []
    for index, selector in enumerate(items):
        where = path + (index,) if isinstance(selectors, list) else path
        concrete = plain(selector)
        if item is not None and ctx.items is not None:
            concrete = render_selector(concrete, ctx.items.rows[item])
        try:
            picked = resolve_positions(concrete, tokens, ctx.tok)
        except PositionError as exc:
            message = exc.message
            if item is not None and ctx.items is not None:
                message = f"{item_label(ctx.items, item, plain(selector))}: {message}"
            raise ctx.fail("bad-position", message, where, exc.hint) from None
        out.extend(p for p in picked if p not in out)
    return out


def _item(ctx: Context, invoke: str, prompt_index: int) -> int | None:
    """The dataset item a row of ``invoke`` runs on (None: the invoke is not over the dataset)."""
    return prompt_index if invoke in ctx.item_invokes else None


def _in_item(ctx: Context, invoke: str, prompt_index: int) -> str:
    """``"item 3 (row 4 of ioi.jsonl): "`` for a row of an invoke over the dataset, else ``""``."""
    item = _item(ctx, invoke, prompt_index)
    return "" if item is None or ctx.items is None else item_label(ctx.items, item) + ": "


def compile_op(
    ctx: Context, invoke: str, op: Any, template: Any, path: SpecPath, cell: int
) -> None:
    if isinstance(op, S.PathPatchOp):  # it names graph nodes, not a site: compiled whole
        _COMPILERS[S.PathPatchOp](ctx, invoke, op, path, cell)
        return
    sites = _sites(ctx, op.site, path)
    if isinstance(op, S.SaveOp) and len(sites) > 1 and (op.name or ctx.grids[invoke].axes):
        raise ctx.fail(
            "ambiguous-save",
            f"site '{op.site}' expands to {len(sites)} sites but this save names one result",
            path + ("site",),
            "drop 'name' or save one site per op",
        )
    vector = _vector(ctx, op, path) if isinstance(op, S.AddOp | S.SetOp) else None
    compiler = _COMPILERS[type(op)]
    for site in sites:
        window = op_window(ctx, op, site, path)
        for prompt_index, tokens in enumerate(ctx.tokens[invoke]):
            row = ctx.row_index[(invoke, cell, prompt_index)]
            positions = _positions(
                ctx, op.positions, tokens, path + ("positions",), _item(ctx, invoke, prompt_index)
            )
            at = OpAt(
                invoke,
                prompt_index,
                site,
                window,
                path,
                dict(
                    site=site.name,
                    module=site.module,
                    io=site.io,
                    row=RowRef(row),
                    positions=tuple(positions),
                    origin=format_path(path),
                    layer=site.layer,
                    cols=window["cols"],
                    sae=None if site.sae is None else SaeRef(site.sae),
                    part=site.part,
                ),
            )
            compiler(ctx, op, at, template=template, sites=sites, vector=vector)


@dataclass(frozen=True)
class OpAt:
    """One spec op on one row at one site: what every kind's compiler gets, and the plan op's
    common fields (``common``)."""

    invoke: str
    prompt_index: int
    site: Site
    window: dict[str, Any]
    path: SpecPath
    common: dict[str, Any]


def _save(
    ctx: Context, op: S.SaveOp, at: OpAt, *, template: Any, sites: list[Site], **_: Any
) -> None:
    invoke, site, common = at.invoke, at.site, at.common
    if len(sites) > 1:
        save_name = default_save_name(invoke, site.name, op.grad)
    else:
        save_name = template.name or default_save_name(invoke, template.site, op.grad)
    key = StoreKey(f"save/{save_name}/{common['row']}")
    ctx.save_keys.setdefault(save_name, []).append(key)
    ctx.save_npos.setdefault(save_name, []).append(len(common["positions"]))
    ctx.save_positions.setdefault(save_name, []).append(tuple(common["positions"]))
    ctx.save_meta[save_name] = (invoke, template.site if len(sites) == 1 else site.name)
    ctx.save_widths.setdefault(save_name, set()).add(at.window["width"])
    _value_layout(ctx, save_name, site, at.window, list(common["positions"]))
    kind = Grad if op.grad else Save
    ctx.ops.append(kind(**common, store=key, head_dim=at.window["head_dim"]))


def _zero(ctx: Context, op: S.ZeroOp, at: OpAt, **_: Any) -> None:
    ctx.ops.append(Zero(**at.common))


def _python(ctx: Context, op: S.PythonOp, at: OpAt, **_: Any) -> None:
    ctx.ops.append(CallPython(**at.common, fn=op.fn))


def _scale(ctx: Context, op: S.ScaleOp, at: OpAt, **_: Any) -> None:
    ctx.ops.append(Scale(**at.common, factor=float(op.factor)))


def _patch(ctx: Context, op: S.PatchOp, at: OpAt, **_: Any) -> None:
    _patch_op(ctx, op, at, 0 if len(ctx.tokens[op.from_]) == 1 else at.prompt_index)


def _resample(ctx: Context, op: S.ResampleAblateOp, at: OpAt, **_: Any) -> None:
    _patch_op(ctx, op, at, _resampled(ctx, at.invoke, op, at.prompt_index, at.path))


def _add_or_set(ctx: Context, op: S.AddOp | S.SetOp, at: OpAt, *, vector: Any, **_: Any) -> None:
    _vector_op(ctx, op, at.site, at.common, vector, at.path, at.window["width"])


def _path_patch(ctx: Context, invoke: str, op: S.PathPatchOp, path: SpecPath, cell: int) -> None:  # fmt: skip
    def positions_of(tokens: list[int], prompt: int) -> list[int]:
        where = path + ("positions",)
        return _positions(ctx, op.positions, tokens, where, _item(ctx, invoke, prompt))

    compile_path_patch(ctx, invoke, op, path, cell, positions_of)


_COMPILERS: dict[type, Any] = {
    S.PathPatchOp: _path_patch,
    S.SaveOp: _save,
    S.ZeroOp: _zero,
    S.PythonOp: _python,
    S.ScaleOp: _scale,
    S.AddOp: _add_or_set,
    S.SetOp: _add_or_set,
    S.PatchOp: _patch,
    S.ResampleAblateOp: _resample,
    **ABLATION_COMPILERS,
}


def _value_layout(
    ctx: Context, save_name: str, site: Site, window: dict[str, Any], positions: list[int]
) -> None:
    """The axes of a save's per-row value and the values along them that every row shares
    (positions differing between rows are left out)."""
    heads = window["heads"]
    axes = ("pos", "hidden")
    if site.io == "pattern":
        axes = ("query", "head", "key")
    elif heads is not None:
        axes = ("pos", "head", "head_dim")
    first = ctx.save_layout.get(save_name)
    values: dict[str, list[int]] = {axes[0]: list(positions)}
    if heads is not None:
        values["head"] = list(heads)
    if window.get("dims") is not None:  # the chosen neurons or features
        values["hidden"] = list(window["dims"])
    if first is not None and first[1].get(axes[0]) != values[axes[0]]:
        values.pop(axes[0])
    if first is not None and axes[0] not in first[1]:
        values.pop(axes[0], None)
    ctx.save_layout[save_name] = (axes, values)


def _resampled(
    ctx: Context, invoke: str, op: S.ResampleAblateOp, prompt_index: int, path: SpecPath
) -> int:
    """The source item a resample ablation reads for this row: a seeded derangement of the
    items (the same in every sweep cell)."""
    source, n = op.from_, len(ctx.tokens[invoke])
    n_src = len(ctx.tokens[op.from_])
    same = ctx.input_axis(source) == ctx.input_axis(invoke) and n_src == n
    if not same or n < 2:
        raise ctx.fail(
            "resample-items",
            f"resample_ablate pairs the items of '{invoke}' ({n}) with other items of "
            f"'{source}' ({n_src}): both need the same two or more items",
            path + ("from",),
            "run both invokes over the dataset (prompt: '{column}'), or give both the same "
            "list of prompts",
        )
    return derangement(n, int(op.seed))[prompt_index]


def _patch_op(ctx: Context, op: S.PatchOp | S.ResampleAblateOp, at: OpAt, src_prompt: int) -> None:
    """Copy the site's value in row ``src_prompt`` of the source invoke (a patch, or a
    resample ablation's other item) into this row."""
    invoke, site, prompt_index, common, path = (
        at.invoke,
        at.site,
        at.prompt_index,
        at.common,
        at.path,
    )
    source = op.from_
    if ctx.grids[source].axes:
        raise ctx.fail(
            "patch-from-sweep",
            f"cannot {op.op} from '{source}': it is swept, so it has no single value per site",
            path + ("from",),
            f"{op.op} from an invoke without a sweep",
        )
    n_src, n_dst = len(ctx.tokens[source]), len(ctx.tokens[invoke])
    if isinstance(op, S.PatchOp) and n_src not in (1, n_dst):
        raise ctx.fail(
            "prompt-count",
            f"'{invoke}' has {n_dst} prompts but '{source}' has {n_src}",
            path + ("from",),
            "give the source one prompt (used for every row) or as many prompts as the target",
        )
    src_tokens = ctx.tokens[source][src_prompt]
    selectors = getattr(op, "source_positions", None)
    given = selectors is not None
    selectors = selectors if given else op.positions
    where = path + ("source_positions" if given else "positions",)
    src_positions = _positions(ctx, selectors, src_tokens, where, _item(ctx, source, src_prompt))
    if len(src_positions) != len(common["positions"]):
        raise ctx.fail(
            "position-count",
            _in_item(ctx, invoke, prompt_index)
            + f"the op selects {len(common['positions'])} position(s) in '{invoke}' but "
            f"{len(src_positions)} in '{source}'"
            + (f" (item {src_prompt})" if src_prompt != prompt_index else ""),
            where,
            "make 'positions' and 'source_positions' select the same number of tokens"
            if given
            else "give 'source_positions' so both sides select the same number of tokens"
            if isinstance(op, S.PatchOp)
            else "select positions every item has the same number of, e.g. {token: '{s}'}",
        )
    key = capture_key(ctx, source, src_prompt, site, common["origin"])
    ctx.ops.append(Patch(**common, source=key, source_positions=tuple(src_positions)))


def _vector(ctx: Context, op: S.AddOp | S.SetOp, path: SpecPath) -> VectorKey | None:
    """Register an inline or file vector in the plan; None for saved values."""
    source = op.vector if isinstance(op, S.AddOp) else op.value
    attr = "vector" if isinstance(op, S.AddOp) else "value"
    if isinstance(source, S.SavedVector | S.MeanDiffVector):
        return None
    if isinstance(source, S.FileVector):
        values = _read_vector_file(ctx, source, path + (attr,))
    else:
        values = tuple(float(v) for v in source)
    return vector_key(ctx, values)


def _vector_op(
    ctx: Context,
    op: Any,
    site: Site,
    common: dict,
    vector: VectorKey | None,
    path: SpecPath,
    width: int | None,
) -> None:
    adds = isinstance(op, S.AddOp)
    attr = "vector" if adds else "value"
    factor = {"factor": float(op.coeff)} if adds else {}
    if vector is not None:
        length = len(ctx.vectors[vector])
        if width is not None and length != width:
            raise ctx.fail(
                "vector-size",
                f"vector has {length} values but site '{site.name}' has width {width}"
                + (" (the chosen heads' columns)" if common.get("cols") or site.heads else ""),
                path + (attr,),
                f"give {width} values",
            )
        kind = AddVector if adds else SetVector
        ctx.ops.append(kind(**common, vector=vector, **factor))
        return
    source = op.vector if adds else op.value
    kind = AddSaved if adds else SetSaved
    if isinstance(source, S.MeanDiffVector):
        keys, minus = mean_diff_keys(ctx, source, site, width, common, path + (attr,))
        extra = {"minus": tuple(minus), "norm": source.norm}
        ctx.ops.append(
            kind(**common, sources=keys, mean=source.reduce == "mean", **extra, **factor)
        )
        return
    keys = saved_keys(ctx, source, common, path + (attr, "saved"))
    check_saved_width(ctx, source.saved, site, width, path + (attr, "saved"))
    ctx.ops.append(kind(**common, sources=tuple(keys), mean=source.reduce == "mean", **factor))


def _read_vector_file(ctx: Context, source: S.FileVector, path: SpecPath) -> tuple[float, ...]:
    array = read_array_file(ctx, source, path, "vector")
    if array.ndim != 1:
        raise ctx.fail(
            "vector-shape",
            f"vector in '{source.file}' has shape {list(array.shape)}; expected one dimension",
            path + ("file",),
        )
    return tuple(float(v) for v in array.astype("float64").tolist())
