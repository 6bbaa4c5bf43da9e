"""Expanding invokes into rows (torch-free): a sweep's grid of cells times the invoke's prompts,
one row each, and every op compiled once per cell with the cell's values substituted for its
placeholders. Unknown and unused sweep variables are located errors.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from .. import spec as S
from ..errors import did_you_mean
from ..plan import InvokeRef, Row
from ..sites import family_table
from ..spec.issues import data_path, issue_for
from .context import Abort, Context, SpecContext, SpecPath
from .generation import op_steps
from .ops import compile_op
from .sweep import MAX_CELLS, Grid, GridError, expand_grid, placeholders, substitute

__all__ = ["check_variables", "expand_invoke", "compile_invoke_ops"]


def check_variables(ctx: SpecContext, name: str) -> None:
    """Every ``{placeholder}`` in an invoke's ops names a sweep variable (or, in positions of an
    invoke over the dataset, a dataset column), and every sweep variable is used (needs no
    model)."""
    invoke = ctx.spec.invokes[name]
    declared = tuple(invoke.sweep or ())
    columns = set(ctx.items.columns) if ctx.items is not None else set()
    unknown: dict[str, SpecPath] = {}
    for i, op in enumerate(invoke.ops):
        for field, value in op.model_dump(by_alias=True).items():
            where: SpecPath = ("invokes", name, "ops", i, field)
            for var in sorted(placeholders(value) - set(declared)):
                if var in columns:
                    _column_use(ctx, name, var, field, where)
                else:
                    unknown.setdefault(var, where)
    near_miss = set()
    for var, where in unknown.items():
        suggestion = did_you_mean(var, declared)
        if suggestion:
            near_miss.update(a for a in declared if f"'{a}'" in suggestion)
        elif columns:
            suggestion = did_you_mean(var, sorted(columns))
        ctx.fail(
            "unknown-variable",
            f"placeholder '{{{var}}}' names no sweep variable"
            + (" or dataset column" if columns else ""),
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


#: op fields whose templates take a dataset row's values
_PER_ROW_FIELDS = ("positions", "source_positions")


def _column_use(ctx: SpecContext, name: str, column: str, field: str, where: SpecPath) -> None:
    """A dataset column in an op: only in positions, and only in an invoke over the dataset."""
    if name not in ctx.item_invokes:
        ctx.fail(
            "not-over-dataset",
            f"'{{{column}}}' is a dataset column, but invoke '{name}' does not run over the "
            "dataset",
            where,
            "give the invoke a prompt that names a column, such as prompt: '{clean}'",
        )
    elif field not in _PER_ROW_FIELDS:
        ctx.fail(
            "column-field",
            f"'{{{column}}}' is a dataset column; '{field}' is the same for every row",
            where,
            "columns fill in prompts, positions ({token: '{s}'}) and metric tokens",
        )


def expand_invoke(ctx: Context, name: str, max_cells: int = MAX_CELLS) -> None:
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
    check_variables(ctx, name)
    ctx.grids[name] = grid
    cells = grid.cells() if grid.axes else [{}]
    for cell_index in range(len(cells)):
        for prompt_index, ids in enumerate(ctx.tokens[name]):
            ctx.row_index[(name, cell_index, prompt_index)] = len(ctx.rows)
            key = ctx.input_keys[name][prompt_index] if name in ctx.input_keys else None
            ctx.rows.append(
                Row(
                    invoke=InvokeRef(name),
                    prompt_index=prompt_index,
                    cell=cell_index,
                    tokens=tuple(ids),
                    input=key,
                )
            )


def _swept_heads(ctx: Context, invoke: S.Invoke) -> tuple[int, str]:
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


def compile_invoke_ops(ctx: Context, name: str) -> None:
    """Every op of invoke ``name``, once per sweep cell; a problem that recurs in many cells is
    reported once, saying in how many."""
    invoke = ctx.spec.invokes[name]
    grid = ctx.grids[name]
    cells = grid.cells() if grid.axes else [{}]
    for op_index, op in enumerate(invoke.ops):
        path: SpecPath = ("invokes", name, "ops", op_index)
        raw = op.model_dump(by_alias=True)
        try:
            steps = op_steps(ctx, invoke, op, path)
        except Abort:
            continue
        first_new = len(ctx.ops)
        known, failed = set(ctx.issues), 0
        for cell_index, variables in enumerate(cells):
            concrete = op
            if variables:
                data = substitute(raw, variables)
                try:
                    concrete = type(op).model_validate(data)
                except ValidationError as exc:
                    _substitution_issue(ctx, exc, data, variables, path)
                    failed += 1
                    continue
            try:
                compile_op(ctx, name, concrete, op, path, cell_index)
            except Abort:
                failed += 1
        if len(cells) > 1:
            _merge_cell_issues(ctx, known, failed, len(cells))
        if steps is not None:
            ctx.ops[first_new:] = [replace(o, steps=steps) for o in ctx.ops[first_new:]]


def _substitution_issue(
    ctx: Context,
    exc: ValidationError,
    data: dict[str, Any],
    variables: dict[str, Any],
    path: SpecPath,
) -> None:
    """An op that is invalid once a cell's values are in it (a float where a head goes), in
    the words spec validation uses."""
    errors = exc.errors(include_url=False)
    where = data_path(tuple(errors[0]["loc"]), data)
    group = [e for e in errors if data_path(tuple(e["loc"]), data) == where]
    issue, _ = issue_for(group, where, data)
    cell = ", ".join(f"{k}={v!r}" for k, v in variables.items())
    ctx.fail(issue.code, f"with {cell}: {issue.message}", path + issue.path, issue.hint)


def _merge_cell_issues(ctx: Context, known: set[Any], failed: int, n_cells: int) -> None:
    """Issues this op added in several cells with the same code at the same place: the first,
    saying in how many cells the op failed."""
    groups: dict[tuple[Any, str], list[Any]] = {}
    for key, issue in ctx.issues.items():
        if key not in known:
            groups.setdefault((issue.path, issue.code), []).append(key)
    for keys in groups.values():
        if len(keys) < 2:
            continue
        first = ctx.issues[keys[0]]
        for key in keys:
            del ctx.issues[key]
        message = f"{first.message} (in {failed} of the {n_cells} sweep cells)"
        ctx.issues[keys[0]] = replace(first, message=message)
