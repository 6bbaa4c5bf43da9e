"""The plan's JSON form, written and read from the records' type hints.

Records are frozen dataclasses; a field is written as plain JSON (references as the strings
and ints they wrap, tuples as lists) and read back into the type its hint names: references
into their reference types, nested records into their classes, and a field typed by a record
base with kinds (an op, a metric) into the kind its ``kind`` tag names. Unknown fields and
unknown kinds are errors, so a plan written by another version is refused, not misread.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["KindBase", "to_data", "from_data", "kinds_of"]


class KindBase:
    """A record base whose subclasses are kinds, tagged by their ``kind`` class attribute in
    JSON; each subclass with a ``kind`` registers itself with the nearest base."""

    kind: typing.ClassVar[str] = ""
    __kinds__: typing.ClassVar[dict[str, type]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__kinds__" not in cls.__dict__ and not any(
            "__kinds__" in base.__dict__ for base in cls.__mro__[1:-1] if base is not KindBase
        ):
            cls.__kinds__ = {}  # a new family of kinds (ops, metrics)
        if cls.__dict__.get("kind"):
            cls.__kinds__[cls.kind] = cls


def kinds_of(base: type) -> dict[str, type]:
    """The kinds registered under a record base: tag -> class."""
    return dict(base.__kinds__)


def to_data(value: Any) -> Any:
    """A record (or a value inside one) as plain JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, KindBase):
            return {"kind": value.kind, **data}
        return data
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, tuple | list):
        return [to_data(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    return value


def from_data(annotation: Any, data: Any) -> Any:
    """``data`` read back as ``annotation`` (a record class or a field's type)."""
    return _reader(annotation)(data)


@functools.cache
def _reader(annotation: Any) -> Callable[[Any], Any]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        inner = _reader(options[0]) if len(options) == 1 else (lambda v: v)
        return lambda v: None if v is None else inner(v)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _reader(args[0])
            return lambda v: tuple(item(x) for x in v)
        readers = [_reader(a) for a in args]
        return lambda v: tuple(r(x) for r, x in zip(readers, v))
    if origin is list:
        item = _reader(args[0]) if args else (lambda v: v)
        return lambda v: [item(x) for x in v]
    if origin is dict:
        key, val = (_reader(args[0]), _reader(args[1])) if args else ((lambda v: v),) * 2
        return lambda v: {key(k): val(x) for k, x in v.items()}
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _record_reader(annotation)
    if isinstance(annotation, type) and annotation not in (bool, float, object, Any):
        return annotation  # int, str, and the reference types that wrap them
    return lambda v: v


def _record_reader(cls: type) -> Callable[[Any], Any]:
    def read(data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.__name__} must be an object, not {type(data).__name__}")
        target = cls
        if issubclass(cls, KindBase):
            kind = data.get("kind")
            target = cls.__kinds__.get(kind)  # type: ignore[assignment]
            if target is None or not issubclass(target, cls):
                known = ", ".join(sorted(cls.__kinds__))
                raise ValueError(f"unknown {cls.__name__} kind {kind!r} (known: {known})")
            data = {k: v for k, v in data.items() if k != "kind"}
        fields = _field_readers(target)
        unknown = set(data) - set(fields)
        if unknown:
            raise ValueError(f"unknown {target.__name__} fields: {sorted(unknown)}")
        return target(**{name: fields[name](value) for name, value in data.items()})

    return read


@functools.cache
def _field_readers(cls: type) -> dict[str, Callable[[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: _reader(hints[f.name]) for f in dataclasses.fields(cls) if f.init}
