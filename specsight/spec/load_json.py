"""The JSON half of the strict loader: duplicate keys, NaN/Infinity, depth and positions.

One pass over the tokens records every key's and value's line and column, checks nesting depth
before parsing and locates duplicates and bad constants; ``json.loads`` then decides validity.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import Issue, SpecError
from .source import (
    INT_TOO_LARGE,
    MAX_DEPTH,
    NOKEY,
    TOO_DEEP,
    Frame,
    Path,
    Pos,
    SourceMap,
    int_too_large,
    not_a_mapping,
    not_a_mapping_hint,
)

__all__ = ["parse_json"]


_JSON_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[\[\]{}:,]|[^\s\[\]{}:,"]+|"')
_JSON_CONSTANTS = frozenset({"NaN", "Infinity", "-Infinity"})


class _BadConstant(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise _BadConstant(name)


def _parse_int(text: str) -> int:
    if int_too_large(text):
        raise _BadConstant(text)
    return int(text)


def _dup_issue(
    key: str, path: Path, file: str | None, pos: tuple, hint: str | None = None
) -> Issue:
    return Issue("duplicate-key", f"duplicate key '{key}'", path, file, *pos, hint=hint)


def _json_key(token: str) -> str:
    try:
        return str(json.loads(token))
    except ValueError:
        return token.strip('"')


def _scan_json(text: str, file: str | None) -> tuple[SourceMap, list[Issue], list[Issue]]:
    """One lexical pass before parsing: depth limit (raises), positions, duplicate keys and
    NaN/Infinity literals (both returned as issues for when the parser confirms them)."""
    values: dict[Path, Pos] = {}
    keys: dict[Path, Pos] = {}
    dups: list[Issue] = []
    consts: list[Issue] = []
    stack: list[Frame] = []
    line, line_start, last = 1, 0, 0
    for match in _JSON_TOKEN.finditer(text):
        token, at = match.group(), match.start()
        newlines = text.count("\n", last, at)
        if newlines:
            line, line_start = line + newlines, text.rindex("\n", last, at) + 1
        last = at
        pos = (line, at - line_start + 1)
        top = stack[-1] if stack else None
        if token in ("]", "}"):
            if stack:
                stack.pop()
            continue
        if token in (",", ":"):
            if token == "," and top is not None and top.value == "{":
                top.key = NOKEY
            continue
        if top is not None and top.value == "{" and top.key is NOKEY:
            top.key = _json_key(token)
            if top.key in top.seen:
                hint = f"'{top.key}' was first defined on line {top.seen[top.key]}"
                dups.append(_dup_issue(top.key, top.path + (top.key,), file, pos, hint))
            else:
                top.seen[top.key] = line
                keys[top.path + (top.key,)] = pos
            continue
        if top is None:
            path: Path = ()
        elif top.value == "{":
            path = top.path + (top.key,)
        else:
            path, top.count = top.path + (top.count,), top.count + 1
        values.setdefault(path, pos)
        if token in ("[", "{"):
            if len(stack) >= MAX_DEPTH:
                raise SpecError(Issue("too-deep", TOO_DEEP, path, file, *pos))
            stack.append(Frame(token, path, pos))
        elif token in _JSON_CONSTANTS:
            msg = f"{token} is not a valid JSON value"
            consts.append(Issue("bad-value", msg, path, file, *pos, hint="use a finite number"))
        elif int_too_large(token):
            msg = f"the integer '{token[:20]}...' ({len(token)} characters) is too large"
            consts.append(Issue("bad-value", msg, path, file, *pos, hint=INT_TOO_LARGE))
    return SourceMap(file, values, keys), dups, consts


def _json_syntax_issue(exc: json.JSONDecodeError, text: str, file: str | None) -> Issue:
    """A located JSON syntax error, naming the usual slips (a trailing comma, a comment, single
    quotes) rather than the parser's view of them."""
    at = exc.pos
    before = text[:at].rstrip()
    if text[at : at + 1] in ("}", "]") and before.endswith(","):
        comma = len(before) - 1
        line = text.count("\n", 0, comma) + 1
        col = comma - text.rfind("\n", 0, comma)
        message = f"invalid JSON: a comma before the closing '{text[at]}'"
        hint = "JSON allows no comma after the last item"
        return Issue("json-syntax", message, (), file, line, col, hint)
    hint = None
    if text.startswith(("//", "/*", "#"), at):
        hint = "JSON has no comments; write the spec in YAML to keep them"
    elif text.startswith("'", at):
        hint = "JSON strings and keys use double quotes"
    return Issue("json-syntax", f"invalid JSON: {exc.msg}", (), file, exc.lineno, exc.colno, hint)


def parse_json(text: str, file: str | None) -> tuple[dict[str, Any], SourceMap]:
    """The spec mapping in ``text`` and its source map; raises SpecError with every problem."""
    if not text.strip():
        raise SpecError(Issue("empty", "the spec is empty", (), file, hint="write a JSON object"))
    source, dups, consts = _scan_json(text, file)
    duplicated: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                duplicated.append(key)
            out.setdefault(key, value)
        return out

    try:
        data = json.loads(
            text,
            object_pairs_hook=pairs_hook,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
        )
    except _BadConstant as exc:
        msg = f"{exc.args[0][:20]} is not a valid JSON value"
        raise SpecError(consts or [Issue("bad-value", msg, (), file)]) from None
    except json.JSONDecodeError as exc:
        raise SpecError(_json_syntax_issue(exc, text, file)) from None
    except RecursionError:  # not reached: the scan bounds the depth first
        raise SpecError(Issue("too-deep", TOO_DEEP, (), file)) from None
    if duplicated:
        raise SpecError(dups or [_dup_issue(key, (), file, (None, None)) for key in duplicated])
    if not isinstance(data, dict):
        hint = not_a_mapping_hint(data, "json")
        raise SpecError(source.issue("not-a-mapping", not_a_mapping(data), (), hint=hint))
    return data, source
