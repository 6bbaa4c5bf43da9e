"""A loaded spec document and where its values sit in the text: :class:`SourceMap` and
:class:`LoadedDoc`, with the pieces both parsers (YAML and JSON) share: limits, the open-container
frame, and the wording of the top-level errors.

Positions are kept per path in the spec, e.g. ``("invokes", "corrupt", "ops", 0, "site")``;
lines and columns are 1-based.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import Issue

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "TOO_DEEP",
    "START_HINT",
    "NOKEY",
    "Path",
    "Pos",
    "SourceMap",
    "LoadedDoc",
    "Frame",
    "kind_of",
    "not_a_mapping",
    "not_a_mapping_hint",
    "INT_TOO_LARGE",
    "int_too_large",
    "int_out_of_range",
]

MAX_BYTES = 1_000_000
MAX_DEPTH = 64

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


_KINDS = ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"))
_KINDS += (((list, tuple), "a list"), (dict, "a mapping"), (type(None), "null"))
TOO_DEEP = f"the spec is nested deeper than {MAX_DEPTH} levels"
START_HINT = "a spec starts with 'specsight: 1', then 'model:' and 'invokes:'"


def kind_of(value: Any) -> str:
    """A few words for what ``value`` is, for messages."""
    return next((name for types, name in _KINDS if isinstance(value, types)), "an object")


def not_a_mapping(value: Any) -> str:
    return f"the spec must be a mapping at the top level, not {kind_of(value)}"


def not_a_mapping_hint(value: Any, fmt: str) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return (
            "remove the surrounding [ ]"
            if fmt == "json"
            else "remove the '- ' before the first key"
        )
    return START_HINT


NOKEY: Any = object()  # an open mapping expects a key next


@dataclass
class Frame:
    """An open mapping or sequence while parsing. ``path`` is None inside a complex key (nothing
    recorded)."""

    value: Any
    path: Path | None
    start: Pos
    key: Any = NOKEY
    seen: dict[str, int] = field(default_factory=dict)
    count: int = 0


INT_TOO_LARGE = "integers in a spec fit in 64 bits"
_INT_LITERAL = re.compile(r"[-+]?(0x[0-9a-fA-F]+|0o[0-7]+|[0-9]+)")


def int_too_large(text: str) -> bool:
    """Whether an integer literal (decimal, ``0x``, ``0o``) lies outside 64 bits, judged from its
    digits before any conversion (Python refuses to convert over 4,300 decimal digits)."""
    if not _INT_LITERAL.fullmatch(text):
        return False
    body = text.lstrip("+-")
    base = {"0x": 16, "0o": 8}.get(body[:2], 10)
    digits = (body[2:] if base != 10 else body).lstrip("0")
    return len(digits) > 24 or int(digits or "0", base) >= 2**64


def int_out_of_range(value: int) -> bool:
    """Whether an integer value lies outside 64 bits (specs built in Python)."""
    return value.bit_length() > 64
