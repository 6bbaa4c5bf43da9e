"""Compiling ops: each spec op becomes per-row RowOps with concrete sites and positions (torch-free)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .. import spec as S
from ..errors import did_you_mean, format_path
from ..plan import RowOp
from ..sites import Site, SiteError, head_columns, resolve_site
from .context import Context, SpecPath, default_save_name, plain
from .dataset import item_label, render_selector
from .inputs import read_array_file
from .positions import PositionError, resolve_positions

__all__ = ["compile_op"]


def _sites(ctx: Context, site: str, path: SpecPath) -> list[Site]:
    try:
        return resolve_site(site, ctx.info)
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


def _head_indices(ctx: Context, selector: Any, site: Site, path: SpecPath) -> list[int] | None:
    """The heads an op picks (None: all), range-checked against the site's head count."""
    if selector is None or selector == "all":
        return None
    layout = site.heads
    assert layout is not None
    n = layout.n_heads
    picked: list[int] = []
    for value in selector if isinstance(selector, list) else [selector]:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ctx.fail("bad-head", f"a head is an integer, not {value!r}", path)
        if not -n <= value < n:
            gqa = site.canonical in ("k", "v") and n != ctx.info.n_heads
            what = "key/value heads" if gqa else "heads"
            message = f"head {value} is out of range: '{site.name}' has {n} {what}"
            if gqa:
                message += f" (grouped-query attention: {ctx.info.n_heads} query heads share them)"
            hint = f"use 0..{n - 1}"
            if gqa:
                hint += f"; to sweep this site's heads write sweep: {{head: '0:{n}'}}"
            raise ctx.fail("bad-head", message, path, hint)
        if value % n not in picked:
            picked.append(value % n)
    return picked


def _window(ctx: Context, op: Any, site: Site, path: SpecPath) -> dict[str, Any]:
    """Columns, head size and width of what the op touches at ``site``."""
    if site.heads is None:
        if op.heads is not None:
            raise ctx.fail(
                "not-a-head-site",
                f"site '{site.name}' has no heads; 'heads' applies to per-head sites "
                "(head_z, q, k, v, attn_pattern)",
                path + ("heads",),
                "remove 'heads', or use a head site such as 'head_z.5'",
            )
        return {"cols": None, "head_dim": None, "width": site.width, "heads": None}
    if site.io == "pattern":
        _check_pattern(ctx, op, site, path)
    heads = _head_indices(ctx, op.heads, site, path + ("heads",))
    chosen = list(range(site.heads.n_heads)) if heads is None else heads
    if site.io == "pattern":
        return {"cols": head_columns(site, heads), "head_dim": None, "width": None, "heads": chosen}
    return {
        "cols": head_columns(site, heads),
        "head_dim": site.heads.d_head,
        "width": len(chosen) * site.heads.d_head,
        "heads": chosen,
    }


def _check_pattern(ctx: Context, op: Any, site: Site, path: SpecPath) -> None:
    if not isinstance(op, S.SaveOp):
        raise ctx.fail(
            "pattern-save-only",
            f"'{site.name}' can only be saved: the module returns its attention weights after "
            "using them, so changing them changes nothing",
            path + ("op",),
            "to change attention, act on q, k, v or head_z of that layer",
        )
    impl = ctx.spec.model.attn_implementation or ctx.info.attn_implementation
    if impl != "eager":
        why = f"{impl} attention does not" if impl else "only eager attention does"
        raise ctx.fail(
            "needs-eager",
            f"'{site.name}' needs the attention weights, and {why} return them",
            path + ("site",),
            "set model: {id: ..., attn_implementation: eager}",
        )


def compile_op(
    ctx: Context, invoke: str, op: Any, template: Any, path: SpecPath, cell: int
) -> None:
    sites = _sites(ctx, op.site, path)
    if isinstance(op, S.SaveOp) and len(sites) > 1 and (op.name or ctx.grids[invoke].axes):
        raise ctx.fail(
            "ambiguous-save",
            f"site '{op.site}' expands to {len(sites)} sites but this save names one result",
            path + ("site",),
            "drop 'name' or save one site per op",
        )
    vector_key = _vector(ctx, op, path) if isinstance(op, S.AddOp | S.SetOp) else None
    for site in sites:
        window = _window(ctx, op, site, path)
        for prompt_index, tokens in enumerate(ctx.tokens[invoke]):
            row = ctx.row_index[(invoke, cell, prompt_index)]
            positions = _positions(
                ctx, op.positions, tokens, path + ("positions",), _item(ctx, invoke, prompt_index)
            )
            common = dict(
                site=site.name, module=site.module, io=site.io, row=row, positions=tuple(positions)
            )
            common["origin"] = format_path(path)
            common["layer"] = site.layer
            if window["cols"] is not None:
                common["cols"] = window["cols"]
            if window["head_dim"] is not None and isinstance(op, S.SaveOp):
                common["head_dim"] = window["head_dim"]
            if isinstance(op, S.SaveOp):
                if len(sites) > 1:
                    save_name = default_save_name(invoke, site.name, op.grad)
                else:
                    save_name = template.name or default_save_name(invoke, template.site, op.grad)
                key = f"save/{save_name}/{row}"
                ctx.save_keys.setdefault(save_name, []).append(key)
                ctx.save_npos.setdefault(save_name, []).append(len(positions))
                ctx.save_meta[save_name] = (invoke, template.site if len(sites) == 1 else site.name)
                _value_layout(ctx, save_name, site, window["heads"], positions)
                ctx.ops.append(RowOp("grad" if op.grad else "save", store=key, **common))
            elif isinstance(op, S.ZeroOp):
                ctx.ops.append(RowOp("zero", **common))
            elif isinstance(op, S.ScaleOp):
                ctx.ops.append(RowOp("scale", factor=float(op.factor), **common))
            elif isinstance(op, S.AddOp | S.SetOp):
                _vector_op(ctx, op, site, common, vector_key, path, window["width"])
            elif isinstance(op, S.PatchOp):
                _patch_op(ctx, invoke, op, site, prompt_index, tokens, common, path)


def _value_layout(
    ctx: Context, save_name: str, site: Site, heads: list[int] | None, positions: list[int]
) -> None:
    """The axes of a save's per-row value and the values along them that every row shares
    (positions differing between rows are left out)."""
    axes = ("position", "hidden")
    if site.io == "pattern":
        axes = ("query", "head", "key")
    elif heads is not None:
        axes = ("position", "head", "head_dim")
    first = ctx.save_layout.get(save_name)
    values: dict[str, list[int]] = {axes[0]: list(positions)}
    if heads is not None:
        values["head"] = list(heads)
    if first is not None and first[1].get(axes[0]) != values[axes[0]]:
        values.pop(axes[0])
    if first is not None and axes[0] not in first[1]:
        values.pop(axes[0], None)
    ctx.save_layout[save_name] = (axes, values)


def _patch_op(
    ctx: Context,
    invoke: str,
    op: S.PatchOp,
    site: Site,
    prompt_index: int,
    tokens: list[int],
    common: dict,
    path: SpecPath,
) -> None:
    source = op.from_
    if ctx.grids[source].axes:
        raise ctx.fail(
            "patch-from-sweep",
            f"cannot patch from '{source}': it is swept, so it has no single value per site",
            path + ("from",),
            "patch from an invoke without a sweep",
        )
    n_src, n_dst = len(ctx.tokens[source]), len(ctx.tokens[invoke])
    if n_src not in (1, n_dst):
        raise ctx.fail(
            "prompt-count",
            f"'{invoke}' has {n_dst} prompts but '{source}' has {n_src}",
            path + ("from",),
            "give the source one prompt (used for every row) or as many prompts as the target",
        )
    src_prompt = 0 if n_src == 1 else prompt_index
    src_tokens = ctx.tokens[source][src_prompt]
    selectors = op.source_positions if op.source_positions is not None else op.positions
    where = path + ("source_positions" if op.source_positions is not None else "positions",)
    src_positions = _positions(ctx, selectors, src_tokens, where, _item(ctx, source, src_prompt))
    if len(src_positions) != len(common["positions"]):
        raise ctx.fail(
            "position-count",
            _in_item(ctx, invoke, prompt_index)
            + f"the op selects {len(common['positions'])} position(s) in '{invoke}' but "
            f"{len(src_positions)} in '{source}'",
            where,
            "make 'positions' and 'source_positions' select the same number of tokens"
            if op.source_positions is not None
            else "give 'source_positions' so both sides select the same number of tokens",
        )
    src_row = ctx.row_index[(source, 0, src_prompt)]
    key = f"capture/{source}/{src_prompt}/{site.module}/{site.io}"
    if key not in ctx.captures:
        ctx.captures[key] = RowOp(
            "capture",
            site=site.name,
            module=site.module,
            io=site.io,
            row=src_row,
            positions=tuple(range(len(src_tokens))),
            store=key,
            origin=common["origin"],
            layer=site.layer,
        )
    ctx.ops.append(RowOp("patch", sources=(key,), source_positions=tuple(src_positions), **common))


def _vector(ctx: Context, op: S.AddOp | S.SetOp, path: SpecPath) -> str | None:
    """Register an inline or file vector in the plan; None for saved values."""
    source = op.vector if isinstance(op, S.AddOp) else op.value
    attr = "vector" if isinstance(op, S.AddOp) else "value"
    if isinstance(source, S.SavedVector):
        return None
    if isinstance(source, S.FileVector):
        values = _read_vector_file(ctx, source, path + (attr,))
    else:
        values = tuple(float(v) for v in source)
    key = "v" + hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]
    ctx.vectors[key] = values
    return key


def _vector_op(
    ctx: Context,
    op: Any,
    site: Site,
    common: dict,
    vector_key: str | None,
    path: SpecPath,
    width: int | None,
) -> None:
    kind = "add" if isinstance(op, S.AddOp) else "set"
    attr = "vector" if kind == "add" else "value"
    factor = float(op.coeff) if kind == "add" else None
    if vector_key is not None:
        length = len(ctx.vectors[vector_key])
        if width is not None and length != width:
            raise ctx.fail(
                "vector-size",
                f"vector has {length} values but site '{site.name}' has width {width}"
                + (" (the chosen heads' columns)" if common.get("cols") or site.heads else ""),
                path + (attr,),
                f"give {width} values",
            )
        ctx.ops.append(RowOp(kind, vector=vector_key, factor=factor, **common))
        return
    source = op.vector if kind == "add" else op.value
    keys = ctx.save_keys.get(source.saved, [])
    if not keys:  # a save of several sites keeps one value per site, under the site's name
        saved = sorted(ctx.save_keys)
        raise ctx.fail(
            "saved-sites",
            f"'{source.saved}' saves several sites, each under its own name",
            path + (attr, "saved"),
            did_you_mean(source.saved, saved, n=3)
            or "name one of: " + ", ".join(saved[:8]) + (", ..." if len(saved) > 8 else ""),
        )
    if source.reduce == "none" and len(keys) != 1:
        raise ctx.fail(
            "saved-rows",
            f"saved value '{source.saved}' comes from {len(keys)} rows",
            path + (attr, "saved"),
            "add 'reduce: mean' to average it, or save from an invoke with one prompt",
        )
    if source.reduce == "none":
        n_saved = ctx.save_npos[source.saved][0]
        if n_saved not in (1, len(common["positions"])):
            raise ctx.fail(
                "position-count",
                f"saved value '{source.saved}' has {n_saved} positions but the op selects {len(common['positions'])}",
                path + (attr, "saved"),
                "save one position, select as many positions, or add 'reduce: mean'",
            )
    ctx.ops.append(RowOp(kind, sources=tuple(keys), reduce=source.reduce, factor=factor, **common))


def _read_vector_file(ctx: Context, source: S.FileVector, path: SpecPath) -> tuple[float, ...]:
    array = read_array_file(ctx, source, path, "vector")
    if array.ndim != 1:
        raise ctx.fail(
            "vector-shape",
            f"vector in '{source.file}' has shape {list(array.shape)}; expected one dimension",
            path + ("file",),
        )
    return tuple(float(v) for v in array.astype("float64").tolist())
