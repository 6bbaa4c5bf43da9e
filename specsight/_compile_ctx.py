"""Compiler state shared by the compiler's modules: collected issues, rows, ops, stored values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import spec as S
from ._sweep import Grid
from .errors import Issue
from .load import LoadedDoc
from .modelinfo import ModelInfo
from .plan import Row, RowOp
from .tokenizer import Tokenizer

MAX_ISSUES = 50
_Path = tuple[Any, ...]


class _Abort(Exception):
    """Raised inside one op or metric after its issue is recorded."""


@dataclass
class _Ctx:
    spec: S.Spec
    info: ModelInfo
    tok: Tokenizer
    doc: LoadedDoc
    allow_files: bool
    issues: dict[tuple[_Path, str], Issue] = field(default_factory=dict)
    tokens: dict[str, list[list[int]]] = field(default_factory=dict)
    grids: dict[str, Grid] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    row_index: dict[tuple[str, int, int], int] = field(default_factory=dict)
    ops: list[RowOp] = field(default_factory=list)
    captures: dict[str, RowOp] = field(default_factory=dict)
    vectors: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: image and tensor inputs: key -> {shape, dtype, values}; per invoke, each row's key and
    #: a name to show for it (the file, or file[i])
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_keys: dict[str, list[str]] = field(default_factory=dict)
    input_names: dict[str, list[str]] = field(default_factory=dict)
    save_names: dict[str, tuple[str, int]] = field(default_factory=dict)
    save_keys: dict[str, list[str]] = field(default_factory=dict)
    save_npos: dict[str, list[int]] = field(default_factory=dict)
    save_meta: dict[str, tuple[str, str]] = field(default_factory=dict)

    def fail(self, code: str, message: str, path: _Path, hint: str | None = None) -> _Abort:
        key = (path, message)
        if key not in self.issues and len(self.issues) < MAX_ISSUES:
            line, col = self.doc.source.locate(path)
            self.issues[key] = Issue(code, message, path, self.doc.file, line, col, hint)
        return _Abort()


def _plain(value: Any) -> Any:
    if isinstance(value, S.TokenSelector):
        return value.model_dump()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def default_save_name(invoke: str, site: str, grad: bool = False) -> str:
    return f"{invoke}/{site}" + ("/grad" if grad else "")
