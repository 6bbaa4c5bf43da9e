"""The YAML half of the strict loader: PyYAML's event stream into plain data, positions and
located issues.

A small stack-based builder (never recursive, never constructing Python objects from tags)
refuses anchors and aliases (which also stops YAML bombs), custom tags, duplicate keys, several
documents, depth past :data:`~specsight.spec.source.MAX_DEPTH`, an empty document and a top
level that is not a mapping. Plain scalars resolve by the YAML 1.2 core schema, so ``yes`` stays
a string and ``1e-3`` is a float. Mapping keys are always strings.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from ..errors import MAX_ISSUES, Issue, SpecError
from .source import (
    INT_TOO_LARGE,
    MAX_DEPTH,
    NOKEY,
    START_HINT,
    TOO_DEEP,
    Frame,
    Path,
    Pos,
    SourceMap,
    int_too_large,
    kind_of,
    not_a_mapping,
    not_a_mapping_hint,
)

__all__ = ["parse_yaml"]

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


# ----------------------------------------------------------------------------- builder

_SKIP: Any = object()  # the pending entry is dropped (duplicate or bad key)


def _pos(mark: Any) -> Pos:
    return (mark.line + 1, mark.column + 1)


class _YamlBuilder:
    """Turns PyYAML events into plain data, positions and issues, with an explicit stack."""

    def __init__(self, file: str | None):
        self.file = file
        self.values: dict[Path, Pos] = {}
        self.keys: dict[Path, Pos] = {}
        self.issues: list[Issue] = []
        self.stack: list[Frame] = []
        self.root: Any = NOKEY
        self.docs = 0

    def build(self, text: str) -> dict[str, Any]:
        try:
            for event in yaml.parse(text, Loader=yaml.SafeLoader):
                self._event(event)
        except yaml.YAMLError as exc:
            self.issues.append(_yaml_syntax_issue(exc, text, self.file))
            raise SpecError(self.issues) from None
        if self.root is NOKEY or self.root is None:
            self._add("empty", "the spec is empty", (), (None, None), hint=START_HINT)
        elif not isinstance(self.root, dict):
            hint = not_a_mapping_hint(self.root, "yaml")
            self._add("not-a-mapping", not_a_mapping(self.root), (), self.values[()], hint=hint)
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
        if fatal or len(self.issues) >= MAX_ISSUES:
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
            self._add("too-deep", TOO_DEEP, path, pos, fatal=True)
        is_map = isinstance(event, yaml.MappingStartEvent)
        if tag not in (None, "custom", "map" if is_map else "seq"):
            what = "mapping" if is_map else "list"
            self._add("bad-value", f"a {what} cannot carry the tag !!{tag}", path, pos)
        if path is not None:
            self.values.setdefault(path, pos)
        self.stack.append(Frame({} if is_map else [], path, pos))

    def _slot(self) -> tuple[Path | None, bool]:
        """Path of the node about to start (None when not recorded) and whether it is a key."""
        if not self.stack:
            return (), False
        top = self.stack[-1]
        if isinstance(top.value, list):
            return (None if top.path is None else top.path + (len(top.value),)), False
        if top.key is NOKEY:
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
        if tag in ("plain", "int") and int_too_large(text):
            message = f"the integer '{text[:20]}...' ({len(text)} characters) is too large"
            self._add("bad-value", message, path, pos, hint=INT_TOO_LARGE)
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
        elif top.key is NOKEY:
            self._take_key(top, value, pos)
        else:
            key, top.key = top.key, NOKEY
            if key is not _SKIP:
                top.value[key] = value

    def _take_key(self, top: Frame, key: Any, pos: Pos) -> None:
        top.key = _SKIP
        if not isinstance(key, str):
            msg = f"mapping keys must be strings, not {kind_of(key)}"
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


def parse_yaml(text: str, file: str | None) -> tuple[dict[str, Any], SourceMap]:
    """The spec mapping in ``text`` and its source map; raises SpecError with every problem."""
    builder = _YamlBuilder(file)
    data = builder.build(text)
    return data, SourceMap(file, builder.values, builder.keys)
