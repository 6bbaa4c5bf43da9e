"""Strict loading of spec documents (YAML or JSON) into plain Python data plus a source map.

A spec is one mapping with string keys holding plain data: mappings, lists, strings, numbers,
booleans and nulls. The loader refuses anything else with a located :class:`SpecError`:
anchors and aliases (which also stops YAML bombs), custom tags, duplicate keys, documents over
:data:`MAX_BYTES` or nested deeper than :data:`MAX_DEPTH`, several documents, an empty document,
or a top level that is not a mapping.

YAML is built from PyYAML's event stream by a small stack-based builder (never recursive, never
constructing Python objects from tags). Plain scalars resolve by the YAML 1.2 core schema, so
``yes`` stays a string and ``1e-3`` is a float. Mapping keys are always strings.

Every value's position (and every key's) is kept in a :class:`SourceMap` keyed by its path in
the spec, e.g. ``("invokes", "corrupt", "ops", 0, "site")``; lines and columns are 1-based.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import Issue, SpecError, did_you_mean

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "SourceMap",
    "LoadedDoc",
    "load_file",
    "load_text",
    "from_data",
]

MAX_BYTES = 1_000_000
MAX_DEPTH = 64
_MAX_ISSUES = 50

Path = tuple[str | int, ...]
Pos = tuple[int, int]


@dataclass(frozen=True)
class SourceMap:
    """Where each value (and each mapping key) of a loaded document sits in its text."""

    file: str | None = None
    _values: dict[Path, Pos] = field(default_factory=dict, repr=False, compare=False, hash=False)
    _keys: dict[Path, Pos] = field(default_factory=dict, repr=False, compare=False, hash=False)

    def locate(
        self, path: Sequence[str | int], *, key: bool = False
    ) -> tuple[int | None, int | None]:
        """Position of the value at ``path`` (of its key when ``key``, falling back to the value);
        when the path is not recorded, the nearest recorded ancestor; ``(None, None)`` if none."""
        path = tuple(path)
        if key and path in self._keys:
            return self._keys[path]
        for end in range(len(path), -1, -1):
            pos = self._values.get(path[:end])
            if pos is not None:
                return pos
        return (None, None)

    def issue(
        self,
        code: str,
        message: str,
        path: Sequence[str | int],
        *,
        hint: str | None = None,
        key: bool = False,
    ) -> Issue:
        """An :class:`Issue` located through :meth:`locate`."""
        line, col = self.locate(path, key=key)
        return Issue(code, message, tuple(path), self.file, line, col, hint)


@dataclass(frozen=True)
class LoadedDoc:
    """A loaded spec: plain data, its source map, and where it came from."""

    data: dict[str, Any]
    source: SourceMap
    file: str | None
    base_dir: str | None
    sha256: str


# ----------------------------------------------------------------------------- scalars (YAML 1.2)

_NOMATCH: Any = object()
_STD_PREFIX = "tag:yaml.org,2002:"
_STD_TAGS = frozenset({"str", "int", "float", "bool", "null", "map", "seq"})
_CORE_SCHEMA: tuple[tuple[str, re.Pattern[str], Any], ...] = tuple(
    (tag, re.compile(pattern), convert)
    for tag, pattern, convert in [
        ("null", r"~|null|Null|NULL|", lambda _: None),
        ("bool", r"true|True|TRUE", lambda _: True),
        ("bool", r"false|False|FALSE", lambda _: False),
        ("int", r"[-+]?[0-9]+", int),
        ("int", r"0o[0-7]+", lambda text: int(text[2:], 8)),
        ("int", r"0x[0-9a-fA-F]+", lambda text: int(text[2:], 16)),
        ("float", r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?", float),
        ("float", r"[-+]?\.(inf|Inf|INF)", lambda text: float(text.replace(".", ""))),
        ("float", r"\.(nan|NaN|NAN)", lambda _: float("nan")),
    ]
)


def _resolve(text: str, tag: str | None) -> Any:
    """A scalar by the YAML 1.2 core schema: any type when ``tag`` is None (a plain scalar),
    else only that tag's forms; ``_NOMATCH`` when nothing fits. Raises ValueError for integers
    longer than Python converts."""
    for name, pattern, convert in _CORE_SCHEMA:
        if (tag is None or tag == name) and pattern.fullmatch(text):
            return convert(text)
    return text if tag is None else _NOMATCH


_KINDS = ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"))
_KINDS += (((list, tuple), "a list"), (dict, "a mapping"), (type(None), "null"))
_TOO_DEEP = f"the spec is nested deeper than {MAX_DEPTH} levels"


def _kind(value: Any) -> str:
    """A few words for what ``value`` is, for messages."""
    return next((name for types, name in _KINDS if isinstance(value, types)), "an object")


def _not_a_mapping(value: Any) -> str:
    return f"the spec must be a mapping at the top level, not {_kind(value)}"


_START_HINT = "a spec starts with 'specsight: 1', then 'model:' and 'invokes:'"


def _not_a_mapping_hint(value: Any, fmt: str) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return (
            "remove the surrounding [ ]"
            if fmt == "json"
            else "remove the '- ' before the first key"
        )
    return _START_HINT


# ----------------------------------------------------------------------------- YAML builder

_NOKEY: Any = object()  # a mapping expects a key next
_SKIP: Any = object()  # the pending entry is dropped (duplicate or bad key)


@dataclass
class _Frame:
    """An open mapping or sequence. ``path`` is None inside a complex key (nothing recorded)."""

    value: Any
    path: Path | None
    start: Pos
    key: Any = _NOKEY
    seen: dict[str, int] = field(default_factory=dict)
    count: int = 0


def _pos(mark: Any) -> Pos:
    return (mark.line + 1, mark.column + 1)


class _YamlBuilder:
    """Turns PyYAML events into plain data, positions and issues, with an explicit stack."""

    def __init__(self, file: str | None):
        self.file = file
        self.values: dict[Path, Pos] = {}
        self.keys: dict[Path, Pos] = {}
        self.issues: list[Issue] = []
        self.stack: list[_Frame] = []
        self.root: Any = _NOKEY
        self.docs = 0

    def build(self, text: str) -> dict[str, Any]:
        try:
            for event in yaml.parse(text, Loader=yaml.SafeLoader):
                self._event(event)
        except yaml.YAMLError as exc:
            self.issues.append(_yaml_syntax_issue(exc, text, self.file))
            raise SpecError(self.issues) from None
        if self.root is _NOKEY or self.root is None:
            self._add("empty", "the spec is empty", (), (None, None), hint=_START_HINT)
        elif not isinstance(self.root, dict):
            hint = _not_a_mapping_hint(self.root, "yaml")
            self._add("not-a-mapping", _not_a_mapping(self.root), (), self.values[()], hint=hint)
        if self.issues:
            raise SpecError(self.issues)
        return self.root

    def _add(
        self,
        code: str,
        msg: str,
        path: Path | None,
        pos: Pos | tuple[None, None],
        *,
        hint: str | None = None,
        fatal: bool = False,
    ) -> None:
        self.issues.append(Issue(code, msg, path or (), self.file, pos[0], pos[1], hint))
        if fatal or len(self.issues) >= _MAX_ISSUES:
            raise SpecError(self.issues)

    def _event(self, event: yaml.Event) -> None:
        if isinstance(event, yaml.DocumentStartEvent):
            self.docs += 1
            if self.docs > 1:
                msg, pos = "a spec holds one YAML document; found a second", _pos(event.start_mark)
                hint = "remove the '---' separator or split the file"
                self._add("multiple-documents", msg, (), pos, hint=hint, fatal=True)
            return
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            frame = self.stack.pop()
            self._deliver(frame.value, frame.start)
            return
        if not isinstance(event, yaml.NodeEvent):
            return
        pos = _pos(event.start_mark)
        path, is_key = self._slot()
        if isinstance(event, yaml.AliasEvent) or event.anchor is not None:
            msg = "YAML anchors and aliases are not allowed in specs"
            self._add("alias", msg, path, pos, hint="write the value out in full", fatal=True)
        tag = self._tag(event, path, pos)
        if isinstance(event, yaml.ScalarEvent):
            value = self._scalar(event, tag, is_key, path, pos)
            if path is not None:
                self.values.setdefault(path, pos)
            self._deliver(value, pos)
            return
        if len(self.stack) >= MAX_DEPTH:
            self._add("too-deep", _TOO_DEEP, path, pos, fatal=True)
        is_map = isinstance(event, yaml.MappingStartEvent)
        if tag not in (None, "custom", "map" if is_map else "seq"):
            what = "mapping" if is_map else "list"
            self._add("bad-value", f"a {what} cannot carry the tag !!{tag}", path, pos)
        if path is not None:
            self.values.setdefault(path, pos)
        self.stack.append(_Frame({} if is_map else [], path, pos))

    def _slot(self) -> tuple[Path | None, bool]:
        """Path of the node about to start (None when not recorded) and whether it is a key."""
        if not self.stack:
            return (), False
        top = self.stack[-1]
        if isinstance(top.value, list):
            return (None if top.path is None else top.path + (len(top.value),)), False
        if top.key is _NOKEY:
            return None, True
        if top.path is None or top.key is _SKIP:
            return None, False
        return top.path + (top.key,), False

    def _tag(self, event: Any, path: Path | None, pos: Pos) -> str | None:
        """The short name of a standard tag, None when untagged, "custom" otherwise."""
        tag = event.tag
        if tag is None or tag == "!":
            return None
        name = tag[len(_STD_PREFIX) :] if tag.startswith(_STD_PREFIX) else None
        if name in _STD_TAGS:
            return name
        msg = f"the YAML tag {'!!' + name if name else tag} is not allowed in specs"
        self._add("custom-tag", msg, path, pos, hint="specs hold plain data only; remove the tag")
        return "custom"

    def _scalar(
        self, event: Any, tag: str | None, is_key: bool, path: Path | None, pos: Pos
    ) -> Any:
        text = event.value
        if tag is None:
            if is_key or event.tag is not None or event.style is not None:
                return text  # keys, quoted and block scalars, and `! x` are strings
            tag = "plain"
        if tag in ("str", "custom"):
            return text
        if tag in ("map", "seq"):
            self._add("bad-value", f"a scalar cannot carry the tag !!{tag}", path, pos)
            return text
        try:
            value = _resolve(text, None if tag == "plain" else tag)
        except ValueError:  # e.g. an integer with more digits than Python converts
            value = _NOMATCH
        if value is _NOMATCH:
            what = "number" if tag == "plain" else f"!!{tag}"
            self._add("bad-value", f"'{text[:40]}' is not a valid {what}", path, pos)
            return text
        return value

    def _deliver(self, value: Any, pos: Pos) -> None:
        """Hand a finished node to its parent (or make it the root)."""
        if not self.stack:
            self.root = value
            return
        top = self.stack[-1]
        if isinstance(top.value, list):
            top.value.append(value)
        elif top.key is _NOKEY:
            self._take_key(top, value, pos)
        else:
            key, top.key = top.key, _NOKEY
            if key is not _SKIP:
                top.value[key] = value

    def _take_key(self, top: _Frame, key: Any, pos: Pos) -> None:
        top.key = _SKIP
        if not isinstance(key, str):
            msg = f"mapping keys must be strings, not {_kind(key)}"
            self._add("bad-key", msg, top.path, pos, hint="use a plain or quoted string")
        elif key in top.seen:
            path = None if top.path is None else top.path + (key,)
            hint = f"'{key}' was first defined on line {top.seen[key]}"
            self._add("duplicate-key", f"duplicate key '{key}'", path, pos, hint=hint)
        else:
            top.seen[key] = pos[0]
            top.key = key
            if top.path is not None:
                self.keys[top.path + (key,)] = pos


def _yaml_syntax_issue(exc: yaml.YAMLError, text: str, file: str | None) -> Issue:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    line = col = None
    if mark is not None:
        line, col = _pos(mark)
    elif isinstance(exc, yaml.reader.ReaderError):
        at = exc.position
        line, col = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
        char = exc.character
        problem = f"{exc.reason} (#x{char:04x})" if isinstance(char, int) else exc.reason
    hint = None
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        hint = f"{context} that started on line {context_mark.line + 1}"
    message = f"invalid YAML: {problem or exc}"
    problem = str(problem or "")
    if problem.startswith("found character '\\t'"):
        message = "invalid YAML: a tab character; YAML indents with spaces only"
        hint = "replace the tab with spaces"
    elif problem.startswith("expected <block end>, but found '<block"):
        message = "invalid YAML: the indentation of this line matches no block above it"
        if context_mark is not None:
            hint = (
                "line it up with the keys of its block; "
                f"the enclosing block starts on line {context_mark.line + 1}"
            )
    elif problem == "mapping values are not allowed here" and hint is None:
        hint = "quote a value that holds ': ', e.g. \"note: this\""
    return Issue("yaml-syntax", message, (), file, line, col, hint)


# ----------------------------------------------------------------------------- JSON


def _parse_json_lazy(text: str, file: str | None) -> tuple[dict[str, Any], SourceMap]:
    from ._load_json import parse_json

    return parse_json(text, file)


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
        data, source = _parse_json_lazy(text, file)
    elif fmt in ("yaml", "yml"):
        builder = _YamlBuilder(file)
        data = builder.build(text)
        source = SourceMap(file, builder.values, builder.keys)
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
        raise SpecError(Issue("not-a-mapping", _not_a_mapping(data), (), file))
    issues: list[Issue] = []
    todo: list[tuple[Any, Path]] = [(data, ())]
    while todo:
        node, path = todo.pop()
        if len(path) >= MAX_DEPTH:
            raise SpecError([*issues, Issue("too-deep", _TOO_DEEP, path, file)])
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(node, dict) and not isinstance(key, str):
                msg = f"mapping keys must be strings, not {_kind(key)} ({key!r})"
                issues.append(Issue("bad-key", msg, path, file))
            elif isinstance(value, (dict, list, tuple)):
                todo.append((value, path + (key,)))
    if issues:
        raise SpecError(issues)
    dumped = json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    digest = hashlib.sha256(dumped.encode("utf-8", "surrogatepass")).hexdigest()
    return LoadedDoc(copy.deepcopy(data), SourceMap(file), file, None, digest)
