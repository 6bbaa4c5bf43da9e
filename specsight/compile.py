"""The compiler: Spec + ModelInfo + tokenizer -> Plan. Imports no torch.

It tokenizes every prompt, orders invokes into stages by what they read from each other,
expands sweeps into cells, resolves sites and positions per row, and packs rows into forwards.
Every problem it finds is collected and raised as one :class:`SpecError` with file positions.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from . import spec as S
from ._compile_ctx import MAX_ISSUES, _Abort, _Ctx, _Path, _plain
from ._compile_metrics import compile_metric
from ._positions import PositionError, resolve_positions
from ._sweep import Grid, GridError, expand_grid, placeholders, substitute
from .errors import SpecError, did_you_mean, format_path
from .load import LoadedDoc, from_data
from .modelinfo import ModelInfo
from .plan import Forward, Plan, PlanSave, Row, RowOp
from .sites import Site, SiteError, resolve_site
from .tokenizer import Tokenizer

__all__ = ["compile_plan", "DEFAULT_MAX_BATCH", "MAX_ISSUES"]

DEFAULT_MAX_BATCH = 64


def compile_plan(
    spec: S.Spec,
    info: ModelInfo,
    tokenizer: Tokenizer,
    *,
    doc: LoadedDoc | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    allow_files: bool = True,
) -> Plan:
    """Compile a validated spec for one model. ``doc`` supplies file positions for errors."""
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    doc = doc or from_data(spec.model_dump(by_alias=True, exclude_none=True))
    ctx = _Ctx(spec, info, tokenizer, doc, allow_files)
    _tokenize(ctx)
    _collect_save_names(ctx)
    stages = _stages(ctx)
    _check_issues(ctx)
    order = sorted(spec.invokes, key=lambda name: (stages[name], list(spec.invokes).index(name)))
    for name in order:
        _expand_invoke(ctx, name)
    _check_issues(ctx)
    for name in order:
        _compile_ops(ctx, name)
    metrics = [compile_metric(ctx, name, metric) for name, metric in spec.metrics.items()]
    _check_issues(ctx)
    forwards = _pack(ctx, stages, max_batch)
    ops = list(ctx.captures.values()) + ctx.ops
    ops.sort(key=lambda op: (op.row, op.kind == "capture"))
    saves = _saves(ctx)
    axis_values, axis_labels = _axes(ctx)
    invoke_info = {
        name: {
            "prompts": len(ctx.tokens[name]),
            "tokens": [len(t) for t in ctx.tokens[name]],
            "stage": stages[name],
            "cells": len(ctx.grids[name].cells()) if ctx.grids[name].axes else 1,
            "axes": list(ctx.grids[name].axes),
        }
        for name in order
    }
    plan = Plan(
        spec_name=spec.name,
        spec_sha256=doc.sha256,
        model=spec.model.model_dump(),
        model_summary=_model_summary(info),
        rows=tuple(ctx.rows),
        ops=tuple(ops),
        forwards=tuple(forwards),
        metrics=tuple(m for m in metrics if m is not None),
        saves=tuple(saves),
        vectors=ctx.vectors,
        axis_values=axis_values,
        axis_labels=axis_labels,
        invoke_info=invoke_info,
        max_batch=max_batch,
    )
    from ._memory import estimate_memory

    return _replace_memory(plan, estimate_memory(plan, info))


def _replace_memory(plan: Plan, memory: dict[str, int]) -> Plan:
    from dataclasses import replace

    return replace(plan, memory_estimate=memory)


def _check_issues(ctx: _Ctx) -> None:
    if ctx.issues:
        issues = sorted(ctx.issues.values(), key=lambda i: (i.line or 0, i.col or 0))
        raise SpecError(issues)


def _model_summary(info: ModelInfo) -> dict[str, Any]:
    return {
        "architecture": info.architecture,
        "family": info.family,
        "n_layers": info.n_layers,
        "d_model": info.d_model,
        "n_heads": info.n_heads,
        "vocab_size": info.vocab_size,
    }


# --- prompts and stages --------------------------------------------------------------------


def _tokenize(ctx: _Ctx) -> None:
    for name, invoke in ctx.spec.invokes.items():
        ids_list = []
        for i, prompt in enumerate(invoke.prompts):
            path: _Path = ("invokes", name, "prompt") + (
                (i,) if isinstance(invoke.prompt, list) else ()
            )
            ids = ctx.tok.encode(prompt)
            if not ids:
                ctx.fail("empty-prompt", "prompt encodes to no tokens", path)
            limit = ctx.info.max_positions
            if limit and len(ids) > limit:
                ctx.fail(
                    "prompt-too-long",
                    f"prompt is {len(ids)} tokens; the model takes at most {limit}",
                    path,
                    "shorten the prompt",
                )
            ids_list.append(ids)
        ctx.tokens[name] = ids_list


def _sources_of(invoke: S.Invoke) -> list[tuple[int, str, str]]:
    """(op index, kind, name) for every reference an invoke's ops make: patch sources and saved values."""
    refs = []
    for i, op in enumerate(invoke.ops):
        if isinstance(op, S.PatchOp):
            refs.append((i, "invoke", op.from_))
        for attr in ("vector", "value"):
            source = getattr(op, attr, None)
            if isinstance(source, S.SavedVector):
                refs.append((i, "saved", source.saved))
    return refs


def _default_save_name(invoke: str, site: str) -> str:
    return f"{invoke}/{site}"


def _collect_save_names(ctx: _Ctx) -> None:
    for name, invoke in ctx.spec.invokes.items():
        for i, op in enumerate(invoke.ops):
            if isinstance(op, S.SaveOp):
                save_name = op.name or _default_save_name(name, op.site)
                if save_name in ctx.save_names:
                    ctx.fail(
                        "duplicate-save",
                        f"two saves are named '{save_name}'",
                        ("invokes", name, "ops", i),
                        "give one of them a different 'name'",
                    )
                ctx.save_names[save_name] = (name, i)


def _stages(ctx: _Ctx) -> dict[str, int]:
    """Stage of each invoke: 0 when it reads nothing, else one past everything it reads."""
    names = list(ctx.spec.invokes)
    save_owner = {save: owner for save, (owner, _) in ctx.save_names.items()}
    deps: dict[str, set[str]] = {name: set() for name in names}
    for name, invoke in ctx.spec.invokes.items():
        for i, kind, ref in _sources_of(invoke):
            op_path: _Path = ("invokes", name, "ops", i)
            if kind == "invoke":
                if ref not in ctx.spec.invokes:
                    hint = did_you_mean(ref, names) or "invokes: " + ", ".join(names)
                    ctx.fail(
                        "unknown-invoke", f"no invoke named '{ref}'", op_path + ("from",), hint
                    )
                elif ref == name:
                    ctx.fail(
                        "self-patch", "an invoke cannot patch from itself", op_path + ("from",)
                    )
                else:
                    deps[name].add(ref)
            else:
                attr = "vector" if "vector" in type(invoke.ops[i]).model_fields else "value"
                owner = save_owner.get(ref)
                if owner is None:
                    hint = did_you_mean(ref, save_owner) or (
                        "saved values: " + ", ".join(save_owner) if save_owner else "add a save op"
                    )
                    ctx.fail(
                        "unknown-saved",
                        f"no saved value named '{ref}'",
                        op_path + (attr, "saved"),
                        hint,
                    )
                elif owner == name:
                    ctx.fail(
                        "self-reference",
                        f"saved value '{ref}' comes from this same invoke",
                        op_path + (attr, "saved"),
                        "save it in a separate invoke and read it from there",
                    )
                else:
                    deps[name].add(owner)
    stages: dict[str, int] = {}
    visiting: set[str] = set()

    def visit(name: str) -> int:
        if name in stages:
            return stages[name]
        if name in visiting:
            ctx.fail(
                "cycle",
                f"invoke '{name}' depends on itself through other invokes",
                ("invokes", name),
            )
            return 0
        visiting.add(name)
        stages[name] = max((visit(d) + 1 for d in deps[name]), default=0)
        visiting.discard(name)
        return stages[name]

    for name in names:
        visit(name)
    return stages


# --- rows and ops --------------------------------------------------------------------------


def _expand_invoke(ctx: _Ctx, name: str) -> None:
    invoke = ctx.spec.invokes[name]
    lengths = {len(t) for t in ctx.tokens[name]}
    seq_len = lengths.pop() if len(lengths) == 1 else None
    try:
        grid = expand_grid(invoke.sweep, ctx.info.n_layers, seq_len)
    except GridError as exc:
        ctx.fail("bad-sweep", exc.message, ("invokes", name, "sweep", exc.axis), exc.hint)
        grid = Grid((), ())
    used = placeholders([op.model_dump(by_alias=True) for op in invoke.ops])
    for axis in grid.axes:
        if axis not in used:
            ctx.fail(
                "unused-sweep",
                f"sweep variable '{axis}' is not used by any op",
                ("invokes", name, "sweep", axis),
                f"use '{{{axis}}}' in an op, or remove it",
            )
    for i, op in enumerate(invoke.ops):
        for var in sorted(placeholders(op.model_dump(by_alias=True)) - set(grid.axes)):
            hint = did_you_mean(var, grid.axes) or "declare it under 'sweep:'"
            ctx.fail(
                "unknown-variable",
                f"placeholder '{{{var}}}' names no sweep variable",
                ("invokes", name, "ops", i),
                hint,
            )
    ctx.grids[name] = grid
    cells = grid.cells() if grid.axes else [{}]
    for cell_index in range(len(cells)):
        for prompt_index, ids in enumerate(ctx.tokens[name]):
            ctx.row_index[(name, cell_index, prompt_index)] = len(ctx.rows)
            ctx.rows.append(Row(name, prompt_index, cell_index, tuple(ids)))


def _compile_ops(ctx: _Ctx, name: str) -> None:
    invoke = ctx.spec.invokes[name]
    grid = ctx.grids[name]
    cells = grid.cells() if grid.axes else [{}]
    for op_index, op in enumerate(invoke.ops):
        path: _Path = ("invokes", name, "ops", op_index)
        raw = op.model_dump(by_alias=True)
        for cell_index, variables in enumerate(cells):
            concrete = op
            if variables:
                try:
                    concrete = type(op).model_validate(substitute(raw, variables))
                except Exception as exc:  # pydantic ValidationError after substitution
                    ctx.fail(
                        "bad-value", f"after substituting {variables}: {exc}".splitlines()[0], path
                    )
                    continue
            try:
                _compile_op(ctx, name, concrete, op, path, cell_index)
            except _Abort:
                continue


def _sites(ctx: _Ctx, site: str, path: _Path) -> list[Site]:
    try:
        return resolve_site(site, ctx.info)
    except SiteError as exc:
        raise ctx.fail("unknown-site", exc.message, path + ("site",), exc.hint) from None


def _positions(ctx: _Ctx, selectors: Any, tokens: list[int], path: _Path) -> list[int]:
    try:
        return resolve_positions(_plain(selectors), tokens, ctx.tok)
    except PositionError as exc:
        raise ctx.fail("bad-position", exc.message, path, exc.hint) from None


def _site_width(ctx: _Ctx, site: Site) -> int | None:
    if site.name == "logits":
        return ctx.info.vocab_size
    if site.module == site.name or site.name.endswith((".input", ".output")):
        return None  # raw module path: width known only at run time
    return ctx.info.d_model


def _compile_op(ctx: _Ctx, invoke: str, op: Any, template: Any, path: _Path, cell: int) -> None:
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
        for prompt_index, tokens in enumerate(ctx.tokens[invoke]):
            row = ctx.row_index[(invoke, cell, prompt_index)]
            positions = _positions(ctx, op.positions, tokens, path + ("positions",))
            common = dict(
                site=site.name, module=site.module, io=site.io, row=row, positions=tuple(positions)
            )
            common["origin"] = format_path(path)
            if isinstance(op, S.SaveOp):
                if len(sites) > 1:
                    save_name = _default_save_name(invoke, site.name)
                else:
                    save_name = template.name or _default_save_name(invoke, template.site)
                key = f"save/{save_name}/{row}"
                ctx.save_keys.setdefault(save_name, []).append(key)
                ctx.save_npos.setdefault(save_name, []).append(len(positions))
                ctx.save_meta[save_name] = (invoke, template.site if len(sites) == 1 else site.name)
                ctx.ops.append(RowOp("save", store=key, **common))
            elif isinstance(op, S.ZeroOp):
                ctx.ops.append(RowOp("zero", **common))
            elif isinstance(op, S.ScaleOp):
                ctx.ops.append(RowOp("scale", factor=float(op.factor), **common))
            elif isinstance(op, S.AddOp | S.SetOp):
                _vector_op(ctx, op, site, common, vector_key, path)
            elif isinstance(op, S.PatchOp):
                _patch_op(ctx, invoke, op, site, prompt_index, tokens, common, path)


def _patch_op(
    ctx: _Ctx,
    invoke: str,
    op: S.PatchOp,
    site: Site,
    prompt_index: int,
    tokens: list[int],
    common: dict,
    path: _Path,
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
    src_positions = _positions(ctx, selectors, src_tokens, where)
    if len(src_positions) != len(common["positions"]):
        raise ctx.fail(
            "position-count",
            f"the op selects {len(common['positions'])} position(s) in '{invoke}' but {len(src_positions)} in '{source}'",
            where,
            "give 'source_positions' so both sides select the same number of tokens",
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
        )
    ctx.ops.append(RowOp("patch", sources=(key,), source_positions=tuple(src_positions), **common))


def _vector(ctx: _Ctx, op: S.AddOp | S.SetOp, path: _Path) -> str | None:
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
    ctx: _Ctx, op: Any, site: Site, common: dict, vector_key: str | None, path: _Path
) -> None:
    kind = "add" if isinstance(op, S.AddOp) else "set"
    attr = "vector" if kind == "add" else "value"
    factor = float(op.coeff) if kind == "add" else None
    width = _site_width(ctx, site)
    if vector_key is not None:
        length = len(ctx.vectors[vector_key])
        if width is not None and length != width:
            raise ctx.fail(
                "vector-size",
                f"vector has {length} values but site '{site.name}' has width {width}",
                path + (attr,),
                f"give {width} values",
            )
        ctx.ops.append(RowOp(kind, vector=vector_key, factor=factor, **common))
        return
    source = op.vector if kind == "add" else op.value
    keys = ctx.save_keys.get(source.saved, [])
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


def _read_vector_file(ctx: _Ctx, source: S.FileVector, path: _Path) -> tuple[float, ...]:
    if not ctx.allow_files:
        raise ctx.fail(
            "file-not-allowed",
            "vectors from files are not accepted here",
            path + ("file",),
            "give the values inline",
        )
    base = ctx.doc.base_dir or os.getcwd()
    full = os.path.normpath(os.path.join(base, source.file))
    if not os.path.isfile(full):
        folder = os.path.dirname(full)
        nearby = os.listdir(folder) if os.path.isdir(folder) else []
        hint = (
            did_you_mean(os.path.basename(full), nearby)
            or "the path is relative to the spec's folder"
        )
        raise ctx.fail(
            "file-not-found", f"vector file '{source.file}' not found", path + ("file",), hint
        )
    try:
        import numpy as np

        if full.endswith(".npy"):
            array = np.load(full, allow_pickle=False)
        elif full.endswith(".safetensors"):
            from safetensors.numpy import load_file

            tensors = load_file(full)
            if source.key is None and len(tensors) != 1:
                raise ctx.fail(
                    "vector-key",
                    f"'{source.file}' holds {len(tensors)} tensors; say which one",
                    path,
                    "add key: one of " + ", ".join(sorted(tensors)),
                )
            key = source.key or next(iter(tensors))
            if key not in tensors:
                raise ctx.fail(
                    "vector-key",
                    f"no tensor '{key}' in '{source.file}'",
                    path + ("key",),
                    did_you_mean(key, tensors),
                )
            array = tensors[key]
        else:
            raise ctx.fail(
                "vector-file",
                f"'{source.file}' is not a .npy or .safetensors file",
                path + ("file",),
            )
    except _Abort:
        raise
    except Exception as exc:  # corrupt file
        raise ctx.fail(
            "vector-file", f"cannot read '{source.file}': {exc}", path + ("file",)
        ) from None
    if array.ndim != 1:
        raise ctx.fail(
            "vector-shape",
            f"vector in '{source.file}' has shape {list(array.shape)}; expected one dimension",
            path + ("file",),
        )
    return tuple(float(v) for v in array.astype("float64").tolist())


# --- packing and results layout ------------------------------------------------------------


def _pack(ctx: _Ctx, stages: dict[str, int], max_batch: int) -> list[Forward]:
    forwards: list[Forward] = []
    current: list[int] = []
    current_stage = None

    def flush() -> None:
        if current:
            seq = max(len(ctx.rows[r].tokens) for r in current)
            forwards.append(Forward(current_stage, tuple(current), seq))  # type: ignore[arg-type]

    for index, row in enumerate(ctx.rows):
        stage = stages[row.invoke]
        if stage != current_stage or len(current) >= max_batch:
            flush()
            current, current_stage = [], stage
        current.append(index)
    flush()
    return forwards


def _saves(ctx: _Ctx) -> list[PlanSave]:
    out = []
    for name, keys in ctx.save_keys.items():
        invoke, site = ctx.save_meta[name]
        grid = ctx.grids[invoke]
        many = isinstance(ctx.spec.invokes[invoke].prompt, list)
        axes = tuple(grid.axes) + (("prompt",) if many else ())
        shape = tuple(grid.shape) + ((len(ctx.tokens[invoke]),) if many else ())
        out.append(
            PlanSave(name, invoke, site, tuple(keys), tuple(ctx.save_npos[name]), axes, shape)
        )
    return out


def _axes(ctx: _Ctx) -> tuple[dict[str, dict[str, list[Any]]], dict[str, dict[str, list[str]]]]:
    values: dict[str, dict[str, list[Any]]] = {}
    labels: dict[str, dict[str, list[str]]] = {}
    for name, grid in ctx.grids.items():
        values[name] = {axis: list(v) for axis, v in zip(grid.axes, grid.values)}
        labels[name] = {}
        if "pos" in grid.axes and len(ctx.tokens[name]) >= 1:
            strs = ctx.tok.token_strs(ctx.tokens[name][0])
            labels[name]["pos"] = [f"{p}:{strs[p]}" for p in values[name]["pos"]]
        if isinstance(ctx.spec.invokes[name].prompt, list):
            values[name]["prompt"] = list(range(len(ctx.tokens[name])))
    return values, labels
