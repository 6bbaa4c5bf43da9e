"""Ops that edit a site with constants: ``zero``, ``scale`` by a factor, ``add`` a plan vector
(times a coefficient) and ``set`` to a plan vector (``clamp`` compiles to it). Each applies to
many rows at once as one indexed write."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..records import Op
from ..refs import VectorKey
from .env import Group, OpEnv

__all__ = ["Zero", "Scale", "AddVector", "SetVector"]


@dataclass(frozen=True, kw_only=True)
class _Constant(Op):
    """An edit with constants: a group of them applies at once, with each position's
    ``factor`` and ``vector`` (where the kind has them) prepared as tensors."""

    @classmethod
    def batchable(cls, ops: list[Any], env: OpEnv) -> bool:
        return True

    @classmethod
    def prepare(cls, group: Group, env: OpEnv) -> None:
        each = [op for op in group.ops for _ in op.positions]
        fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
        if "factor" in fields:
            group.factors = env.factors([op.factor for op in each])
        if "vector" in fields:
            group.values = env.vectors([op.vector for op in each])


@dataclass(frozen=True, kw_only=True)
class Zero(_Constant):
    """Set the site to zero at ``positions``."""

    kind: ClassVar[str] = "zero"
    mixed_cols: ClassVar[bool] = True

    @classmethod
    def write(cls, hidden: Any, group: Group, env: OpEnv) -> None:
        hidden[group.index] = 0


@dataclass(frozen=True, kw_only=True)
class Scale(_Constant):
    """Multiply the site by ``factor`` at ``positions``."""

    kind: ClassVar[str] = "scale"
    mixed_cols: ClassVar[bool] = True
    factor: float

    @classmethod
    def write(cls, hidden: Any, group: Group, env: OpEnv) -> None:
        hidden[group.index] = hidden[group.index] * group.factors


@dataclass(frozen=True, kw_only=True)
class AddVector(_Constant):
    """Add ``factor`` times a plan vector at ``positions`` (activation addition)."""

    kind: ClassVar[str] = "add"
    vector: VectorKey
    factor: float = 1.0

    @classmethod
    def write(cls, hidden: Any, group: Group, env: OpEnv) -> None:
        hidden[group.index] = hidden[group.index] + group.values * group.factors


@dataclass(frozen=True, kw_only=True)
class SetVector(_Constant):
    """Set the site to a plan vector at ``positions``."""

    kind: ClassVar[str] = "set"
    vector: VectorKey

    @classmethod
    def write(cls, hidden: Any, group: Group, env: OpEnv) -> None:
        hidden[group.index] = group.values.expand_as(hidden[group.index])
