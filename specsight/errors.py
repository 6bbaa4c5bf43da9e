"""The one error tree of specsight.

Every user mistake becomes a :class:`SpecError` holding one or more :class:`Issue` records.
An issue says *where* (file, line, column and the path inside the spec), *what* (code and
message) and *how to fix it* (hint, often a did-you-mean). Problems found while running a
valid spec (a model that cannot be loaded, a failing forward) are :class:`RunError`.

The CLI maps ``SpecError`` to exit code 2 and ``RunError`` to exit code 1.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = [
    "MAX_ISSUES",
    "Issue",
    "SpecsightError",
    "SpecError",
    "RunError",
    "ModelLoadError",
    "ModelNotFoundError",
    "OutputError",
    "did_you_mean",
    "format_path",
    "printable",
]

PathPart = str | int

#: at most this many issues are collected into one SpecError (loader and compiler alike)
MAX_ISSUES = 50


#: characters a terminal would act on instead of showing: C0/C1 controls (but newline and tab),
#: DEL, and the bidirectional overrides that reorder what a reader sees
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` safe to echo to a terminal: control characters written as ``\\x1b``-style
    escapes (newlines and tabs kept), so a spec's name cannot clear the screen or set a title."""
    return _CONTROL.sub(lambda m: _escape(m.group(0)), text) if _CONTROL.search(text) else text


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def format_path(path: Sequence[PathPart]) -> str:
    """Render a path inside the spec: ``("invokes", "corrupt", "ops", 0, "site")`` becomes
    ``invokes.corrupt.ops[0].site``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def did_you_mean(word: str, candidates: Iterable[str], *, n: int = 3) -> str | None:
    """A hint naming the closest candidates to ``word``, or None when nothing is close."""
    pool = sorted({str(c) for c in candidates})
    close = difflib.get_close_matches(str(word), pool, n=n, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in pool}
        if str(word).lower() in lowered:
            close = [lowered[str(word).lower()]]
    if not close:
        return None
    quoted = " or ".join(f"'{c}'" for c in close)
    return f"did you mean {quoted}?"


@dataclass(frozen=True)
class Issue:
    """One located problem in a spec."""

    code: str
    message: str
    path: tuple[PathPart, ...] = ()
    file: str | None = None
    line: int | None = None
    col: int | None = None
    hint: str | None = None

    @property
    def path_str(self) -> str:
        return format_path(self.path)

    @property
    def location(self) -> str:
        where = self.file or "<spec>"
        if self.line is not None:
            where += f":{self.line}"
            if self.col is not None:
                where += f":{self.col}"
        return where

    def located(self, file: str | None, line: int | None, col: int | None) -> Issue:
        """A copy with its position filled in (keeps a position it already has)."""
        if self.line is not None:
            return self if self.file or not file else replace(self, file=file)
        return replace(self, file=file, line=line, col=col)

    def format(self) -> str:
        text = self.location
        if self.path:
            text += f" {self.path_str}"
        text += f": {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = self.path_str
        data["path_parts"] = list(self.path)
        return data


class SpecsightError(Exception):
    """Base class of every error specsight raises on purpose."""

    exit_code = 1

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "message": str(self)}


class SpecError(SpecsightError):
    """A spec (or a CLI argument standing for one) is invalid. Holds every issue found."""

    exit_code = 2

    def __init__(self, issues: Issue | Sequence[Issue]):
        self.issues: tuple[Issue, ...] = (issues,) if isinstance(issues, Issue) else tuple(issues)
        if not self.issues:
            raise ValueError("SpecError needs at least one issue")
        super().__init__(self.render())

    def render(self) -> str:
        lines = [issue.format() for issue in self.issues]
        if len(lines) > 1:
            lines.insert(0, f"{len(lines)} problems in spec:")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"error": "SpecError", "issues": [i.to_dict() for i in self.issues]}


class _HintedError(SpecsightError):
    """An error with one message and an optional hint on how to fix it."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "message": self.message, "hint": self.hint}


class RunError(_HintedError):
    """A valid spec failed while running (model, device, numerics)."""


class ModelLoadError(RunError):
    """A model could not be found, converted or loaded."""


class ModelNotFoundError(ModelLoadError):
    """The spec names a model (``field`` of ``model:``: id, revision, factory) that does not
    exist here: a spec mistake, reported at that field when the spec's file is known."""

    def __init__(self, message: str, *, field: str = "id", hint: str | None = None):
        super().__init__(message, hint=hint)
        self.field = field


class OutputError(_HintedError):
    """An output folder that cannot be written, or would replace something it must not (another
    spec's run, files that are not a run). A usage mistake: exit code 2, found before running."""

    exit_code = 2
