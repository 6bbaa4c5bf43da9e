"""Datasets (torch-free): rows read from a JSONL or CSV file beside the spec (or given inline),
a seeded sample of them, and the templates that invokes, metrics and positions write over their
columns (``prompt: "{clean}"``, ``target: "{io}"``, ``positions: {token: "{s}"}``).

An invoke whose prompt names a column runs once per row: its rows are the dataset's items, in
order, and its results get an ``item`` axis. ``{{`` and ``}}`` stand for literal braces in a
template.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
from typing import Any

from .. import spec as S
from ..errors import SpecError, did_you_mean
from .context import Items, SpecContext, SpecPath

__all__ = [
    "Items",
    "MAX_ROWS",
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
_NAME = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TEMPLATE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def column_names(text: Any) -> set[str]:
    """The ``{name}`` placeholders of a template, or of every string inside lists and mappings
    (literal ``{{`` and ``}}`` left out)."""
    if isinstance(text, list | tuple):
        return set().union(*(column_names(t) for t in text))
    if isinstance(text, dict):
        return set().union(*(column_names(t) for t in text.values()))
    if not isinstance(text, str):
        return set()
    return {m.group(1) for m in _TEMPLATE.finditer(text) if m.group(1)}


def render(text: str, row: dict[str, Any]) -> str:
    """A template with the row's values in place of its column placeholders (others kept)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:  # an escaped brace
            return match.group(0)[0]
        return _text(row[name]) if name in row else match.group(0)

    return _TEMPLATE.sub(value, text)


def render_value(value: Any, row: dict[str, Any]) -> Any:
    """A token reference with the row's values in: a template that is exactly one placeholder
    of an integer column gives that integer (a token id), any other template a string."""
    if not isinstance(value, str):
        return value
    whole = _NAME.fullmatch(value)
    if whole and whole.group(1) in row and isinstance(row[whole.group(1)], int):
        return row[whole.group(1)]
    return render(value, row)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


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
    """The spec's dataset, read and sampled; a located issue (and None) when it cannot be."""
    dataset = ctx.spec.dataset
    if dataset is None:
        return None
    path: SpecPath = ("dataset",)
    if dataset.rows is not None:
        digest = _rows_sha256(dataset.rows)
        rows, file = list(dataset.rows), None  # read-only: shared with the spec
    else:
        file = dataset.file
        read = _read_file(ctx, str(file), path + ("file",), allow_files)
        if read is None:
            return None
        rows, raw = read
        digest = hashlib.sha256(raw).hexdigest()
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
    return Items(tuple(picked), columns, order, len(rows), digest, file)


def _rows_sha256(rows: list[dict[str, Any]], chunk: int = 1000) -> str:
    """The sha256 of ``json.dumps(rows, sort_keys=True, ensure_ascii=False)`` in UTF-8,
    encoded ``chunk`` rows at a time (100k rows are never one string)."""
    digest = hashlib.sha256(b"[")
    for start in range(0, len(rows), chunk):
        text = json.dumps(rows[start : start + chunk], sort_keys=True, ensure_ascii=False)
        digest.update((", " if start else "").encode() + text[1:-1].encode("utf-8"))
    digest.update(b"]")
    return digest.hexdigest()


def _read_file(
    ctx: SpecContext, file: str, path: SpecPath, allow_files: bool
) -> tuple[list[dict[str, Any]], bytes] | None:
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
    try:
        with open(full, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        folder = os.path.dirname(full)
        nearby = os.listdir(folder) if os.path.isdir(folder) else []
        hint = did_you_mean(os.path.basename(full), nearby) or "the path is relative to the spec"
        ctx.fail("file-not-found", f"dataset file '{file}': {exc.strerror or exc}", path, hint)
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        ctx.fail("dataset-file", f"'{file}' line {line} is not UTF-8", path, "save it as UTF-8")
        return None
    reader = _read_csv if full.lower().endswith(".csv") else _read_jsonl
    try:
        return reader(text), raw
    except _RowError as exc:
        ctx.fail("dataset-file", f"'{file}' line {exc.line}: {exc.message}", path, exc.hint)
        return None


class _RowError(Exception):
    def __init__(self, line: int, message: str, hint: str | None = None):
        super().__init__(message)
        self.line, self.message, self.hint = line, message, hint


def _read_jsonl(text: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_constant=_no_constant)
        except ValueError as exc:
            raise _RowError(number, f"not valid JSON ({exc})", "one JSON object a line") from None
        if not isinstance(row, dict):
            raise _RowError(number, "not a JSON object", 'one JSON object a line, {"col": ...}')
        bad = [k for k, v in row.items() if not isinstance(v, str | int | float | bool | None)]
        if bad:
            raise _RowError(number, f"column '{bad[0]}' holds a list or object", "use plain values")
        rows.append(row)
        if len(rows) > MAX_ROWS:
            break
    return rows


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _read_csv(text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise _RowError(1, "no header line", "start the file with the column names")
    rows = []
    for row in reader:
        if None in row:
            line = reader.line_num
            raise _RowError(
                line, "more fields than the header names", "quote fields that hold commas"
            )
        rows.append(dict(row))
        if len(rows) > MAX_ROWS:
            break
    return rows


def invoke_prompts(ctx: SpecContext, name: str, invoke: S.Invoke) -> list[str]:
    """An invoke's prompts: one per dataset row for an invoke over the dataset, else its own.
    With a dataset, a placeholder that names no column is a located issue (write ``{{`` for a
    literal brace)."""
    if ctx.items is None or not isinstance(invoke.prompt, str):
        return invoke.prompts
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
        return invoke.prompts
    return [render(invoke.prompt, row) for row in ctx.items.rows]


def render_selector(selector: Any, row: dict[str, Any]) -> Any:
    """A position selector (plain data) with the row's values in its token texts."""
    if isinstance(selector, list):
        return [render_selector(s, row) for s in selector]
    if isinstance(selector, dict) and isinstance(selector.get("token"), str):
        return {**selector, "token": render(selector["token"], row)}
    return selector


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


#: metric fields whose templates take a dataset row's values
METRIC_TEMPLATE_FIELDS = ("position", "target", "foil", "token", "tokens")


def check_metric_columns(ctx: SpecContext, name: str, metric: Any) -> bool:
    """A metric's templates name columns the dataset has, on an invoke over the dataset
    (located issues when not; needs no model)."""
    if ctx.items is None:
        return True
    ok = True
    for field_name in METRIC_TEMPLATE_FIELDS:
        value = getattr(metric, field_name, None)
        if hasattr(value, "model_dump"):
            value = value.model_dump()
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
