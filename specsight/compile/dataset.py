"""Datasets (torch-free): rows read from a JSONL or CSV file beside the spec (or given inline),
a seeded sample of them, and the templates that invokes, metrics and positions write over their
columns (``prompt: "{clean}"``, ``target: "{io}"``, ``positions: {token: "{s}"}``).

An invoke whose prompt names a column runs once per row: its rows are the dataset's items, in
order, and its results get an ``item`` axis. ``{{`` and ``}}`` stand for literal braces in a
template.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

from .. import spec as S
from ..errors import SpecError, did_you_mean, format_path
from .context import Items, SpecContext, SpecPath
from .dataset_files import (
    SURROGATE_HINT,
    DatasetFile,
    DatasetFileError,
    Limits,
    lone_surrogate_in,
    read_dataset_file,
    rows_sha256,
)
from .templates import (
    METRIC_TEMPLATE_FIELDS,
    OP_TEMPLATE_FIELDS,
    column_names,
    render,
    render_selector,
    render_value,
)

__all__ = [
    "Items",
    "MAX_ROWS",
    "MAX_DATASET_BYTES",
    "MAX_LINE_BYTES",
    "MAX_FIELD_CHARS",
    "column_names",
    "is_item_invoke",
    "load_items",
    "use_dataset",
    "render",
    "render_value",
    "invoke_prompts",
    "render_selector",
    "item_label",
    "check_metric_columns",
    "dataset_rows",
    "read_items",
]

#: rows a dataset may have (after reading, before sampling)
MAX_ROWS = 1_000_000
#: bytes a dataset file may have (checked before it is read)
MAX_DATASET_BYTES = 256_000_000
#: bytes one line of a dataset file may have (checked while streaming, before it is parsed)
MAX_LINE_BYTES = 1_000_000
#: characters one CSV field may have
MAX_FIELD_CHARS = 100_000


def is_item_invoke(invoke: S.Invoke, items: Items | None) -> bool:
    """Whether an invoke runs once per dataset row: its prompt names a column."""
    return (
        items is not None
        and isinstance(invoke.prompt, str)
        and bool(column_names(invoke.prompt) & set(items.columns))
    )


def use_dataset(ctx: SpecContext, *, allow_files: bool = True) -> None:
    """Read the spec's dataset into ``ctx.items`` and mark the invokes that run over it;
    a sweep variable named like a column is a located issue."""
    if ctx.given_items is not None:
        ctx.items = ctx.given_items
    else:
        ctx.items = load_items(ctx, allow_files=allow_files)
    if ctx.items is None:
        return
    columns = set(ctx.items.columns)
    for name, invoke in ctx.spec.invokes.items():
        if is_item_invoke(invoke, ctx.items):
            ctx.item_invokes.add(name)
        for var in sorted(set(invoke.sweep or ()) & columns):
            ctx.fail(
                "sweep-shadows-column",
                f"sweep variable '{var}' has the name of a dataset column",
                ("invokes", name, "sweep", var),
                "rename the sweep variable: '{" + var + "}' would be ambiguous",
            )


def dataset_rows(spec: S.Spec, doc: S.LoadedDoc) -> list[dict[str, Any]] | None:
    """The rows a spec's dataset uses after sampling (None: no dataset; a SpecError when the
    dataset cannot be read)."""
    items = read_items(spec, doc)
    return None if items is None else [dict(row) for row in items.rows]


def read_items(spec: S.Spec, doc: S.LoadedDoc, *, allow_files: bool = True) -> Items | None:
    """The spec's dataset read and sampled once (None: no dataset; a SpecError when it cannot
    be read), for a run that compiles it in blocks of items."""
    ctx = SpecContext(spec=spec, doc=doc)
    items = load_items(ctx, allow_files=allow_files)
    if ctx.issues:
        raise SpecError(sorted(ctx.issues.values(), key=lambda i: (i.line or 0, i.col or 0)))
    return items


def load_items(ctx: SpecContext, *, allow_files: bool = True) -> Items | None:
    """The spec's dataset, read and sampled; a located issue (and None) when it cannot be.
    Every row used must give a value to every column the spec's templates read from it
    (located issues when not; the items are still returned)."""
    dataset = ctx.spec.dataset
    if dataset is None:
        return None
    path: SpecPath = ("dataset",)
    source = _source(ctx, dataset, allow_files)
    if source is None:
        return None
    rows, digest, file, lines = source
    if not rows:
        ctx.fail("empty-dataset", "the dataset has no rows", path, "add rows to the file")
        return None
    if len(rows) > MAX_ROWS:
        message = f"the dataset has {len(rows):,} rows; at most {MAX_ROWS:,} are read"
        ctx.fail("dataset-too-large", message, path, "sample it, or split the file")
        return None
    columns = tuple(dict.fromkeys(key for row in rows for key in row))
    indices: range | list[int] = range(len(rows))
    if dataset.sample is not None:
        if dataset.sample.n > len(rows):
            message = f"sample.n is {dataset.sample.n} but the dataset has {len(rows)} rows"
            ctx.fail("bad-sample", message, path + ("sample", "n"), f"use n <= {len(rows)}")
            return None
        indices = sorted(random.Random(dataset.sample.seed).sample(indices, dataset.sample.n))
    picked = rows if isinstance(indices, range) else [rows[i] for i in indices]
    order = indices if isinstance(indices, range) else tuple(indices)  # a range takes no memory
    items = Items(tuple(picked), columns, order, len(rows), digest, file)
    _check_values(ctx, items, lines)
    return items


def _source(
    ctx: SpecContext, dataset: S.Dataset, allow_files: bool
) -> tuple[list[dict[str, Any]], str, str | None, Sequence[int] | None] | None:
    """The dataset's rows, their sha256, the file (None: inline rows) and the line each row
    starts on (None: inline); None after a located issue."""
    if dataset.rows is not None:
        if not _inline_rows_ok(ctx, dataset.rows):
            return None
        return list(dataset.rows), rows_sha256(dataset.rows), None, None  # rows shared
    file = str(dataset.file)
    read = _read_file(ctx, file, ("dataset", "file"), allow_files)
    if read is None:
        return None
    return read.rows, read.sha256, file, read.lines


def _inline_rows_ok(ctx: SpecContext, rows: list[dict[str, Any]]) -> bool:
    """Inline rows hold whole Unicode characters (a located issue at the first that does not:
    a lone surrogate cannot be encoded)."""
    bad = lone_surrogate_in(rows)
    if bad is None:
        return True
    index, key, found = bad
    data = ctx.doc.data.get("dataset") if isinstance(ctx.doc.data, dict) else None
    prefix: SpecPath = ("dataset", "rows") if isinstance(data, dict) else ("dataset",)
    ctx.fail(
        "bad-dataset-value",
        f"dataset row {index + 1}, column '{key}' holds a lone surrogate {found}; text must be "
        "whole Unicode characters",
        prefix + (index, key),
        SURROGATE_HINT,
    )
    return False


def _read_file(
    ctx: SpecContext, file: str, path: SpecPath, allow_files: bool
) -> DatasetFile | None:
    if not allow_files:
        ctx.fail(
            "file-not-allowed",
            "dataset files are not accepted here: a server never reads paths from a spec",
            path,
            "give the rows inline (specsight run --remote does this for you)",
        )
        return None
    base = ctx.doc.base_dir or os.getcwd()
    full = os.path.normpath(os.path.join(base, file))
    limits = Limits(MAX_DATASET_BYTES, MAX_LINE_BYTES, MAX_FIELD_CHARS, MAX_ROWS)
    try:
        return read_dataset_file(full, limits)
    except DatasetFileError as exc:
        where = f"'{file}' " if exc.line is not None else f"dataset file '{file}' "
        ctx.fail("dataset-file", where + exc.message, path, exc.hint)
    except OSError as exc:
        folder = os.path.dirname(full)
        nearby = os.listdir(folder) if os.path.isdir(folder) else []
        hint = did_you_mean(os.path.basename(full), nearby) or "the path is relative to the spec"
        ctx.fail("file-not-found", f"dataset file '{file}': {exc.strerror or exc}", path, hint)
    return None


def _templates(spec: S.Spec, items: Items) -> list[tuple[SpecPath, list[str]]]:
    """Where the spec's templates read a row of the dataset, and the columns each reads: the
    prompts of invokes over the dataset, their ops' positions, and their metrics."""
    columns = set(items.columns)
    over = [name for name, invoke in spec.invokes.items() if is_item_invoke(invoke, items)]
    found: list[tuple[SpecPath, Any]] = []
    for name in over:
        invoke = spec.invokes[name]
        found.append((("invokes", name, "prompt"), invoke.prompt))
        for i, op in enumerate(invoke.ops):
            dumped = op.model_dump(by_alias=True)
            found += [(("invokes", name, "ops", i, f), dumped.get(f)) for f in OP_TEMPLATE_FIELDS]
    for name, metric in spec.metrics.items():
        if getattr(metric, "invoke", None) in over:
            found += [(("metrics", name, f), _dumped(metric, f)) for f in METRIC_TEMPLATE_FIELDS]
    used = [(path, sorted(column_names(value) & columns)) for path, value in found]
    return [(path, names) for path, names in used if names]


def _dumped(model: Any, field_name: str) -> Any:
    value = getattr(model, field_name, None)
    return value.model_dump() if hasattr(value, "model_dump") else value


def _check_values(ctx: SpecContext, items: Items, lines: Sequence[int] | None) -> None:
    """Every column a template reads has a value (not missing, not null) in every row used: a
    located issue at the template, naming the first row without one."""
    first_bad: dict[str, int | None] = {}
    for path, names in _templates(ctx.spec, items):
        for name in names:
            if name not in first_bad:
                rows = items.rows
                first_bad[name] = next(
                    (i for i, row in enumerate(rows) if row.get(name) is None), None
                )
            index = first_bad[name]
            if index is not None:
                _fail_no_value(ctx, items, lines, index, name, path)


def _fail_no_value(
    ctx: SpecContext,
    items: Items,
    lines: Sequence[int] | None,
    index: int,
    name: str,
    path: SpecPath,
) -> None:
    row = items.indices[index]
    if items.file is not None and lines is not None:
        where = f"line {lines[row]} of {os.path.basename(items.file)}"
    else:
        where = f"dataset.rows[{row}]"
    null = name in items.rows[index]
    ctx.fail(
        "missing-value",
        f"dataset row {row + 1} ({where}) "
        + (f"holds null in column '{name}'" if null else f"has no value for column '{name}'")
        + f", which {format_path(path)} uses",
        path,
        f"give every row a value for '{name}' (\"\" is a value"
        + (", null is none" if null else "")
        + "), or leave the row out",
    )


def invoke_prompts(ctx: SpecContext, name: str, invoke: S.Invoke) -> list[str]:
    """An invoke's prompts: one per dataset row for an invoke over the dataset, else its own.
    A prompt is a template: ``{{`` and ``}}`` are literal braces, and a placeholder that names
    no column (or any placeholder, in a spec without a dataset) is a located issue."""
    if not isinstance(invoke.prompt, str):
        return invoke.prompts
    if ctx.items is None:
        _no_dataset(ctx, invoke.prompt, ("invokes", name, "prompt"))
        return [render(invoke.prompt, {})]
    unknown = sorted(column_names(invoke.prompt) - set(ctx.items.columns))
    if unknown:
        columns = ctx.items.columns
        hint = did_you_mean(unknown[0], columns) or "columns: " + ", ".join(columns)
        ctx.fail(
            "unknown-column",
            f"the dataset has no column '{unknown[0]}'",
            ("invokes", name, "prompt"),
            hint + "; write {{ and }} for literal braces",
        )
        return invoke.prompts
    if name not in ctx.item_invokes:
        return [render(invoke.prompt, {})]
    return [render(invoke.prompt, row) for row in ctx.items.rows]


def _no_dataset(ctx: SpecContext, template: Any, path: SpecPath) -> bool:
    """Whether a template names a column in a spec without a dataset (a located issue at the
    string that does; a dataset that could not be read has its own issue)."""
    if ctx.spec.dataset is not None or not column_names(template):
        return False
    while isinstance(template, list | tuple | dict):  # down to the string that names one
        pairs = template.items() if isinstance(template, dict) else enumerate(template)
        key, template = next((k, v) for k, v in pairs if column_names(v))
        path = path + (key,)
    name = sorted(column_names(template))[0]
    literal = f", or write {{{{{name}}}}} for literal braces"
    ctx.fail(
        "no-dataset",
        f"'{{{name}}}' names a dataset column, but the spec has no dataset:",
        path,
        f"add dataset: {{file: ...}} with a column '{name}'{literal}",
    )
    return True


def item_label(items: Items, index: int, template: Any = None) -> str:
    """How an error names one item: ``item 3 (line 18 of ioi.jsonl)``, and the values the
    template's columns took in it (``{s} = ' John'``)."""
    where = f"item {items.offset + index}"
    if items.file is not None:
        where += f" (row {items.indices[index] + 1} of {os.path.basename(items.file)})"
    values = [
        f"{{{name}}} = {items.rows[index].get(name)!r}"
        for name in sorted(column_names(template) & set(items.columns))
    ]
    return where + (", " + ", ".join(values) if values else "")


def check_metric_columns(ctx: SpecContext, name: str, metric: Any) -> bool:
    """A metric's templates name columns the dataset has, on an invoke over the dataset, and
    name none in a spec without a dataset (located issues when not; needs no model)."""
    if ctx.items is None:
        fields = METRIC_TEMPLATE_FIELDS
        flagged = [_no_dataset(ctx, _dumped(metric, f), ("metrics", name, f)) for f in fields]
        return not any(flagged)
    ok = True
    for field_name in METRIC_TEMPLATE_FIELDS:
        value = _dumped(metric, field_name)
        used = column_names(value)
        if not used:
            continue
        path = ("metrics", name, field_name)
        unknown = sorted(used - set(ctx.items.columns))
        if unknown:
            hint = did_you_mean(unknown[0], ctx.items.columns)
            ctx.fail(
                "unknown-column",
                f"the dataset has no column '{unknown[0]}'",
                path,
                hint or "columns: " + ", ".join(ctx.items.columns),
            )
            ok = False
        elif getattr(metric, "invoke", None) not in ctx.item_invokes:
            ctx.fail(
                "not-over-dataset",
                f"'{{{sorted(used)[0]}}}' is a dataset column, but invoke "
                f"'{getattr(metric, 'invoke', None)}' does not run over the dataset",
                path,
                "measure an invoke whose prompt names a column, such as prompt: '{clean}'",
            )
            ok = False
    return ok
