"""The compiler: Spec + ModelInfo + tokenizer -> Plan. Imports no torch.

It tokenizes every prompt, orders invokes into stages by what they read from each other,
expands sweeps into cells, resolves sites and positions per row, and packs rows into forwards.
Every problem it finds is collected and raised as one :class:`SpecError` with file positions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from . import spec as S
from ._compile_ctx import MAX_ISSUES, _Abort, _Ctx, _Path, default_save_name
from ._compile_expect import compile_expectations
from ._compile_gen import check_generation, generate_forwards, op_steps
from ._compile_grad import check_backward
from ._compile_inputs import compile_inputs, position_labels
from ._compile_metrics import compile_metric
from ._compile_ops import compile_op
from ._memory import estimate_memory
from ._pack import first_layers, pack_rows, rows_for_budget
from ._sweep import MAX_CELLS, Grid, GridError, expand_grid, placeholders, substitute
from .errors import SpecError, did_you_mean, format_path
from .load import LoadedDoc, from_data
from .modelinfo import ModelInfo
from .plan import Plan, PlanMetric, PlanSave, Row, RowOp
from .sites import family_table
from .tokenizer import Tokenizer

__all__ = ["compile_plan", "DEFAULT_MAX_BATCH", "MAX_ISSUES"]

DEFAULT_MAX_BATCH = 64


def compile_plan(
    spec: S.Spec,
    info: ModelInfo,
    tokenizer: Tokenizer,
    *,
    doc: LoadedDoc | None = None,
    max_batch: int | None = None,
    memory_budget: int | None = None,
    batch_cap: int = DEFAULT_MAX_BATCH,
    prefix_reuse: bool = True,
    allow_files: bool = True,
    max_cells: int = MAX_CELLS,
) -> Plan:
    """Compile a validated spec for one model. ``doc`` supplies file positions for errors.

    Rows per forward: ``max_batch`` when given; else as many as ``memory_budget`` bytes of
    activations allow (at most ``batch_cap``); else ``batch_cap``.
    """
    if max_batch is not None and max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    doc = doc or from_data(spec.model_dump(by_alias=True, exclude_none=True))
    ctx = _Ctx(spec, info, tokenizer, doc, allow_files)
    compile_inputs(ctx)
    _check_issues(ctx)
    _collect_save_names(ctx)
    stages = _stages(ctx)
    _check_issues(ctx)
    check_generation(ctx)
    _check_issues(ctx)
    order = sorted(spec.invokes, key=lambda name: (stages[name], list(spec.invokes).index(name)))
    for name in order:
        _expand_invoke(ctx, name, max_cells)
    _check_issues(ctx)
    for name in order:
        _compile_ops(ctx, name)
    metrics = [compile_metric(ctx, name, metric) for name, metric in spec.metrics.items()]
    backward = check_backward(ctx)
    _check_issues(ctx)
    ops = list(ctx.captures.values()) + ctx.ops
    ops.sort(key=lambda op: (op.row, op.kind == "capture"))
    after_layers, logits_module = _after_layer_modules(info)
    first = first_layers(ctx.rows, ops, info.n_layers, after_layers)
    keep = _logit_positions(ctx, metrics, ops, logits_module)
    if max_batch is None:
        max_batch = batch_cap
        if memory_budget is not None:
            seq = max(len(r.tokens) for r in ctx.rows)
            kept = None if keep is None else max((len(v) for v in keep.values()), default=1)
            max_batch = rows_for_budget(
                info, seq, spec.model.dtype, memory_budget, cap=batch_cap, logits_positions=kept
            )
    generating = generate_forwards(ctx, stages)
    forwards = pack_rows(
        ctx.rows,
        stages,
        first,
        max_batch,
        info.n_layers,
        prefix_reuse=prefix_reuse,
        keep_logits=keep,
        skip={r for f in generating for r in f.rows},
    )
    if generating:
        forwards = sorted(forwards + generating, key=lambda f: f.stage)
    saves = _saves(ctx)
    expectations = compile_expectations(ctx, metrics, saves)
    _check_issues(ctx)
    axis_values, axis_labels = _axes(ctx)
    invoke_info = {
        name: {
            "prompts": len(ctx.tokens[name]),
            "tokens": [len(t) for t in ctx.tokens[name]],
            "stage": stages[name],
            "cells": len(ctx.grids[name].cells()) if ctx.grids[name].axes else 1,
            "axes": list(ctx.grids[name].axes),
            **({"inputs": ctx.input_names[name]} if name in ctx.input_names else {}),
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
        inputs=ctx.inputs,
        axis_values=axis_values,
        axis_labels=axis_labels,
        invoke_info=invoke_info,
        max_batch=max_batch,
        expectations=tuple(expectations),
        deterministic=spec.deterministic,
        seed=spec.seed,
        backward=backward,
    )
    return replace(plan, memory_estimate=estimate_memory(plan, info))


def _layers_path(info: ModelInfo) -> str | None:
    table = family_table(info)
    return table["layers"] if table else None


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
        "inputs": info.inputs,
        "layers_path": _layers_path(info),
    }


# --- prompts and stages --------------------------------------------------------------------


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


def _collect_save_names(ctx: _Ctx) -> None:
    for name, invoke in ctx.spec.invokes.items():
        for i, op in enumerate(invoke.ops):
            if isinstance(op, S.SaveOp):
                save_name = op.name or default_save_name(name, op.site, op.grad)
                if save_name in ctx.save_names:
                    ctx.fail(
                        "duplicate-save",
                        f"two saves are named '{save_name}'",
                        ("invokes", name, "ops", i, "name" if op.name else "site"),
                        "the first is at {}; give one of them a different 'name'".format(
                            format_path(
                                (
                                    "invokes",
                                    *ctx.save_names[save_name][:1],
                                    "ops",
                                    ctx.save_names[save_name][1],
                                )
                            )
                        ),
                    )
                    continue
                ctx.save_names[save_name] = (name, i)


def _stages(ctx: _Ctx) -> dict[str, int]:
    """Stage of each invoke: 0 when it reads nothing, else one past everything it reads."""
    names = list(ctx.spec.invokes)
    save_owner = {save: owner for save, (owner, _) in ctx.save_names.items()}
    deps: dict[str, dict[str, _Path]] = {name: {} for name in names}
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
                        "self-patch",
                        "an invoke cannot patch from itself",
                        op_path + ("from",),
                        "patch from another invoke; to keep a value of this one, use a save op",
                    )
                else:
                    deps[name].setdefault(ref, op_path + ("from",))
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
                    deps[name].setdefault(owner, op_path + (attr, "saved"))
    stages: dict[str, int] = {}
    visiting: list[str] = []

    def visit(name: str) -> int:
        if name in stages:
            return stages[name]
        visiting.append(name)
        stage = 0
        for dep, where in deps[name].items():
            if dep in visiting:
                loop = visiting[visiting.index(dep) :] + [dep]
                ctx.fail(
                    "cycle",
                    "invokes read from each other in a loop: "
                    + " -> ".join(f"'{n}'" for n in loop),
                    where,
                    "an invoke can only read from invokes that do not read from it",
                )
                continue
            stage = max(stage, visit(dep) + 1)
        visiting.pop()
        stages[name] = stage
        return stage

    for name in names:
        visit(name)
    return stages


# --- rows and ops --------------------------------------------------------------------------


def _expand_invoke(ctx: _Ctx, name: str, max_cells: int = MAX_CELLS) -> None:
    invoke = ctx.spec.invokes[name]
    lengths = {len(t) for t in ctx.tokens[name]}
    seq_len = lengths.pop() if len(lengths) == 1 else None
    n_heads, head_label = _swept_heads(ctx, invoke)
    try:
        grid = expand_grid(
            invoke.sweep,
            ctx.info.n_layers if ctx.info.inputs != "tensor" else None,
            seq_len,
            n_heads=n_heads,
            zipped=invoke.sweep_mode == "zip",
            head_label=head_label,
            max_cells=max_cells,
        )
    except GridError as exc:
        ctx.fail("bad-sweep", exc.message, ("invokes", name, "sweep", exc.axis), exc.hint)
        grid = Grid((), ())
    declared = tuple(invoke.sweep or ())
    unknown: dict[str, _Path] = {}
    for i, op in enumerate(invoke.ops):
        for field, value in op.model_dump(by_alias=True).items():
            for var in sorted(placeholders(value) - set(declared)):
                unknown.setdefault(var, ("invokes", name, "ops", i, field))
    near_miss = set()
    for var, where in unknown.items():
        suggestion = did_you_mean(var, declared)
        if suggestion:
            near_miss.update(a for a in declared if f"'{a}'" in suggestion)
        ctx.fail(
            "unknown-variable",
            f"placeholder '{{{var}}}' names no sweep variable",
            where,
            suggestion or "declare it under 'sweep:'",
        )
    used = placeholders([op.model_dump(by_alias=True) for op in invoke.ops])
    for axis in declared:
        if axis not in used and axis not in near_miss:
            ctx.fail(
                "unused-sweep",
                f"sweep variable '{axis}' is not used by any op",
                ("invokes", name, "sweep", axis),
                f"use '{{{axis}}}' in an op, or remove it",
            )
    ctx.grids[name] = grid
    cells = grid.cells() if grid.axes else [{}]
    for cell_index in range(len(cells)):
        for prompt_index, ids in enumerate(ctx.tokens[name]):
            ctx.row_index[(name, cell_index, prompt_index)] = len(ctx.rows)
            key = ctx.input_keys[name][prompt_index] if name in ctx.input_keys else None
            ctx.rows.append(Row(name, prompt_index, cell_index, tuple(ids), key))


def _swept_heads(ctx: _Ctx, invoke: S.Invoke) -> tuple[int, str]:
    """What ``head: all`` means: the key/value heads when every op that selects
    ``heads: {head}`` acts on a key or value site (grouped-query attention), else all heads."""
    table = family_table(ctx.info)
    kinds = set()
    for op in invoke.ops:
        if "head" in placeholders(op.heads):
            tpl = (table["sites"] if table else {}).get(op.site.partition(".")[0])
            kinds.add(getattr(tpl, "heads", None))
    if kinds == {"kv"} and ctx.info.n_kv_heads != ctx.info.n_heads:
        return ctx.info.n_kv_heads, "key/value heads"
    return ctx.info.n_heads, "heads"


def _compile_ops(ctx: _Ctx, name: str) -> None:
    invoke = ctx.spec.invokes[name]
    grid = ctx.grids[name]
    cells = grid.cells() if grid.axes else [{}]
    for op_index, op in enumerate(invoke.ops):
        path: _Path = ("invokes", name, "ops", op_index)
        raw = op.model_dump(by_alias=True)
        try:
            steps = op_steps(ctx, invoke, op, path)
        except _Abort:
            continue
        first_new = len(ctx.ops)
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
                compile_op(ctx, name, concrete, op, path, cell_index)
            except _Abort:
                continue
        if steps is not None:
            ctx.ops[first_new:] = [replace(o, steps=steps) for o in ctx.ops[first_new:]]


# --- packing and results layout ------------------------------------------------------------


def _after_layer_modules(info: ModelInfo) -> tuple[set[str], str | None]:
    """Modules that run after the layer stack (final norm, unembedding), and the unembedding."""
    table = family_table(info)
    sites = table["sites"] if table else {}
    after = {sites[name][0] for name in ("final_norm", "logits") if name in sites}
    return after, sites["logits"][0] if "logits" in sites else None


def _logit_positions(
    ctx: _Ctx, metrics: list[PlanMetric | None], ops: list[RowOp], logits_module: str | None
) -> dict[int, set[int]] | None:
    """Per row, the positions whose logits anything reads; None when all must be computed."""
    if logits_module is None or any(op.module == logits_module for op in ops):
        return None
    keep: dict[int, set[int]] = {}
    for metric in metrics:
        if metric is None or metric.kind == "logit_lens":
            continue
        for row, pos in zip(metric.rows, metric.positions):
            keep.setdefault(row, set()).add(pos)
    for index, row in enumerate(ctx.rows):
        if not ctx.grids[row.invoke].axes:  # the summary shows next tokens of unswept rows
            keep.setdefault(index, set()).add(len(row.tokens) - 1)
    return keep


def _saves(ctx: _Ctx) -> list[PlanSave]:
    out = []
    step_of = {op.store: op.steps for op in ctx.ops if op.kind == "save" and op.steps is not None}
    for name, keys in ctx.save_keys.items():
        invoke, site = ctx.save_meta[name]
        grid = ctx.grids[invoke]
        many = ctx.spec.invokes[invoke].many_inputs
        axes = tuple(grid.axes) + (("prompt",) if many else ())
        shape = tuple(grid.shape) + ((len(ctx.tokens[invoke]),) if many else ())
        npos = list(ctx.save_npos[name])
        steps = step_of.get(keys[0])
        if steps is not None:  # generation: one value per step, stacked after the prompt axis
            keys = [f"{key}@{s}" for key in keys for s in steps]
            npos = [n if s == 0 else 1 for n in npos for s in steps]
            axes, shape = axes + ("step",), shape + (len(steps),)
        out.append(PlanSave(name, invoke, site, tuple(keys), tuple(npos), axes, shape))
    return out


def _axes(ctx: _Ctx) -> tuple[dict[str, dict[str, list[Any]]], dict[str, dict[str, list[str]]]]:
    values: dict[str, dict[str, list[Any]]] = {}
    labels: dict[str, dict[str, list[str]]] = {}
    for name, grid in ctx.grids.items():
        values[name] = grid.axis_values()
        labels[name] = {}
        if "pos" in grid.axes and not grid.zipped:
            strs = position_labels(ctx, name)
            labels[name]["pos"] = [f"{p}:{strs[p]}" for p in values[name]["pos"]]
        if ctx.spec.invokes[name].many_inputs:
            values[name]["prompt"] = list(range(len(ctx.tokens[name])))
    return values, labels
