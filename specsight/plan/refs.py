"""Typed references inside a plan: which rows, stored values, vectors, inputs, invokes and
results a record points at.

A reference is a value of its own type (a ``str`` or ``int`` subclass, or :class:`Rows`), so
that a transform renumbering rows or renaming keys finds every reference of every record by
type (:func:`relabel`), without a list of fields per kind that a new kind could be missing from.
They compare and hash like the plain values they wrap, and JSON writes them as such.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable
from typing import Any

__all__ = [
    "Name",
    "StoreKey",
    "VectorKey",
    "InputKey",
    "SaeRef",
    "InvokeRef",
    "ResultRef",
    "RowRef",
    "Rows",
    "Relabel",
    "relabel",
    "holds_refs",
]


class Name(str):
    """A named reference; the subclasses say what it names."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str.__repr__(self)})"


class StoreKey(Name):
    """A value a row stores during the run (a save, a capture, a gradient)."""

    __slots__ = ()


class VectorKey(Name):
    """A constant vector of the plan (``Plan.vectors``)."""

    __slots__ = ()


class InputKey(Name):
    """An image or tensor input of a row (``Plan.inputs``)."""

    __slots__ = ()


class SaeRef(Name):
    """A sparse autoencoder the plan reads sites through (``Plan.saes``)."""

    __slots__ = ()


class InvokeRef(Name):
    """An invoke of the spec (rows, results and axes are grouped by it)."""

    __slots__ = ()


class ResultRef(Name):
    """A result tensor: a metric or a saved value (and the companions named after it)."""

    __slots__ = ()


class RowRef(int):
    """One row of the plan (``Plan.rows[i]``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"RowRef({int(self)})"


class Rows(tuple):  # noqa: SLOT001 - a tuple of row indices, typed
    """A sequence of rows of the plan, in a meaningful order (a forward's batch, a metric's
    result order)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Rows({tuple.__repr__(self)})"

    def __getitem__(self, index: Any) -> Any:
        value = tuple.__getitem__(self, index)
        return Rows(value) if isinstance(index, slice) else value


@dataclasses.dataclass(frozen=True)
class Relabel:
    """How a transform maps references: rows to rows, names to names (each type of name
    through the same function, which may look at the type)."""

    row: Callable[[int], int] = int
    name: Callable[[Name], str] = str


def _walk(value: Any, how: Relabel) -> Any:
    if isinstance(value, RowRef):
        return RowRef(how.row(value))
    if isinstance(value, Rows):
        return Rows(how.row(r) for r in value)
    if isinstance(value, Name):
        return type(value)(how.name(value))
    if isinstance(value, tuple):
        return tuple(_walk(v, how) for v in value)
    if isinstance(value, list):
        return [_walk(v, how) for v in value]
    if isinstance(value, dict):
        return {_walk(k, how): _walk(v, how) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return relabel(value, how)
    return value


def relabel(record: Any, how: Relabel) -> Any:
    """``record`` (a dataclass, or a tuple, list or dict of them) with every reference in it
    mapped by ``how``; fields whose types hold no reference are left as they are."""
    if not (dataclasses.is_dataclass(record) and not isinstance(record, type)):
        return _walk(record, how)
    names = _ref_fields(type(record))
    if not names:
        return record
    changes = {name: _walk(getattr(record, name), how) for name in names}
    return dataclasses.replace(record, **changes)


_REF_TYPES = (Name, RowRef, Rows)


def holds_refs(annotation: Any) -> bool:
    """Whether a field of this type may hold a reference (directly or inside records)."""
    if isinstance(annotation, type):
        if issubclass(annotation, _REF_TYPES):
            return True
        if dataclasses.is_dataclass(annotation):
            return bool(_ref_fields(annotation))
        return False
    return any(holds_refs(arg) for arg in typing.get_args(annotation))


@functools.cache
def _ref_fields(cls: type) -> tuple[str, ...]:
    """The fields of a record class that may hold references, from their type hints."""
    hints = typing.get_type_hints(cls)
    return tuple(f.name for f in dataclasses.fields(cls) if holds_refs(hints[f.name]))
