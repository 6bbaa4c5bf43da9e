"""Strict loading of spec documents (YAML or JSON) into plain Python data plus a source map.

A spec is one mapping with string keys holding plain data: mappings, lists, strings, numbers,
booleans and nulls. Anything else is refused with a located :class:`SpecError` by the format's
parser (:mod:`.load_yaml`, :mod:`.load_json`); this module adds the size limit, reads files,
sniffs the format and wraps Python mappings built in a notebook.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any

from ..errors import Issue, SpecError, did_you_mean
from .load_json import parse_json
from .load_yaml import parse_yaml
from .source import (
    INT_TOO_LARGE,
    MAX_BYTES,
    MAX_DEPTH,
    TOO_DEEP,
    LoadedDoc,
    Path,
    SourceMap,
    int_out_of_range,
    kind_of,
    not_a_mapping,
)

__all__ = ["load_file", "load_text", "from_data"]


def _check_size(size: int, file: str | None) -> None:
    if size > MAX_BYTES:
        msg = f"the spec is {size:,} bytes; the limit is {MAX_BYTES:,} bytes"
        hint = "move large data into files beside the spec"
        raise SpecError(Issue("too-large", msg, (), file, hint=hint))


def _sniff(text: str) -> str:
    return "json" if text.lstrip().startswith("{") else "yaml"


def _load(text: str, raw: bytes, file: str | None, fmt: str | None, base: str | None) -> LoadedDoc:
    _check_size(len(raw), file)
    text = text.removeprefix("\ufeff")
    fmt = (fmt or _sniff(text)).lower()
    if fmt == "json":
        data, source = parse_json(text, file)
    elif fmt in ("yaml", "yml"):
        data, source = parse_yaml(text, file)
    else:
        raise ValueError(f"unknown spec format {fmt!r}; use 'yaml' or 'json'")
    return LoadedDoc(data, source, file, base, hashlib.sha256(raw).hexdigest())


def load_file(path: str | os.PathLike[str]) -> LoadedDoc:
    """Load a spec file; ``.yaml``/``.yml`` are YAML, ``.json`` is JSON, others are sniffed."""
    file = os.fspath(path)
    try:
        size = os.stat(file).st_size
        _check_size(size, file)
        with open(file, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise SpecError(_not_found(file, exc)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - raw.rfind(b"\n", 0, exc.start)
        msg = f"the spec is not valid UTF-8: byte 0x{raw[exc.start]:02x} here"
        raise SpecError(Issue("encoding", msg, (), file, line, col, "save it as UTF-8")) from None
    ext = os.path.splitext(file)[1].lower()
    fmt = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}.get(ext)
    base_dir = os.path.dirname(os.path.abspath(file))
    return _load(text, raw, file, fmt, base_dir)


def _not_found(file: str, exc: OSError) -> Issue:
    folder = os.path.dirname(file) or "."
    hint = None
    if isinstance(exc, IsADirectoryError):
        msg = f"spec file '{file}' is a directory"
    elif isinstance(exc, FileNotFoundError):
        msg = f"spec file '{file}' does not exist"
        if os.path.isdir(folder):
            names = os.listdir(folder)
            specs = [n for n in names if n.lower().endswith((".yaml", ".yml", ".json"))]
            hint = did_you_mean(os.path.basename(file), specs) or did_you_mean(
                os.path.basename(file), names
            )
        else:
            hint = f"the folder '{folder}' does not exist"
    else:
        msg = f"cannot read spec file '{file}': {exc.strerror or exc}"
    return Issue("file-not-found", msg, (), file, hint=hint)


def load_text(text: str, *, file: str | None = None, fmt: str | None = None) -> LoadedDoc:
    """Load a spec from text; ``fmt`` is "yaml" or "json" (sniffed when None)."""
    raw = text.encode("utf-8", "surrogatepass")
    return _load(text, raw, file, fmt, None)


def from_data(data: dict[str, Any], *, file: str | None = None) -> LoadedDoc:
    """Wrap a Python mapping (e.g. built in a notebook) after the loader's structural checks:
    a mapping at the top, string keys only, at most :data:`MAX_DEPTH` levels. The data is
    copied; the source map is empty."""
    if not isinstance(data, dict):
        raise SpecError(Issue("not-a-mapping", not_a_mapping(data), (), file))
    issues: list[Issue] = []
    todo: list[tuple[Any, Path]] = [(data, ())]
    while todo:
        node, path = todo.pop()
        if len(path) >= MAX_DEPTH:
            raise SpecError([*issues, Issue("too-deep", TOO_DEEP, path, file)])
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(node, dict) and not isinstance(key, str):
                msg = f"mapping keys must be strings, not {kind_of(key)} ({_shown(key)})"
                issues.append(Issue("bad-key", msg, path, file))
            elif isinstance(value, (dict, list, tuple)):
                todo.append((value, path + (key,)))
            elif isinstance(value, int) and int_out_of_range(value):
                msg = f"an integer of {value.bit_length()} bits is too large"
                issues.append(Issue("bad-value", msg, path + (key,), file, hint=INT_TOO_LARGE))
    if issues:
        raise SpecError(issues)
    dumped = json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    digest = hashlib.sha256(dumped.encode("utf-8", "surrogatepass")).hexdigest()
    return LoadedDoc(_copied(data), SourceMap(file), file, None, digest)


def _copied(data: dict[str, Any]) -> dict[str, Any]:
    """A deep copy that shares the dataset's flat rows (mappings of plain values, which
    nothing changes): a dataset of 100k inline rows is not held twice."""
    dataset = data.get("dataset")
    rows = dataset.get("rows") if isinstance(dataset, dict) else dataset
    memo: dict[int, Any] = {}
    if isinstance(rows, list):
        for row in rows:
            if isinstance(row, dict) and not any(isinstance(v, dict | list) for v in row.values()):
                memo[id(row)] = row
    return copy.deepcopy(data, memo)


def _shown(value: Any) -> str:
    """A short repr (an integer too long to print gets its size instead)."""
    if isinstance(value, int) and int_out_of_range(value):
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
