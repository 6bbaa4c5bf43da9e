"""Ops that keep values: ``save`` (a site's values at some positions, for results and for
later rows), ``grad`` (their gradient, when a backward pass runs) and ``capture`` (a row's whole
sequence, which patches and ablations of later stages read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..records import Op
from ..refs import StoreKey
from .env import At, Group, OpEnv

__all__ = ["Save", "Grad", "Capture"]


@dataclass(frozen=True, kw_only=True)
class _Keeps(Op):
    """An op that keeps a value under ``store`` and leaves its site as it is."""

    writes: ClassVar[bool] = False
    store: StoreKey

    def stores(self) -> StoreKey:
        return self.store


@dataclass(frozen=True, kw_only=True)
class Save(_Keeps):
    """Keep the site's values at ``positions`` under ``store`` (per-head sites as [positions,
    heads, head_dim]; attention patterns as [queries, heads, keys], keys past the row's tokens
    dropped)."""

    kind: ClassVar[str] = "save"
    #: head sites: the values come back as [positions, heads, head_dim]
    head_dim: int | None = None

    @classmethod
    def batchable(cls, ops: list[Any], env: OpEnv) -> bool:
        return all(op.io != "pattern" for op in ops)

    @classmethod
    def write(cls, hidden: Any, group: Group, env: OpEnv) -> None:
        values = hidden[group.index].detach().clone()
        for op, value in zip(group.ops, values.split([len(op.positions) for op in group.ops])):
            env.store[op.store] = op._shaped(value)

    def apply(self, hidden: Any, at: At, env: OpEnv) -> None:
        if self.io == "pattern":  # [batch, query, head, key]: keys past the row are padding
            value = hidden[at.row, at.positions]
            if at.cols is not None:
                value = value[:, at.cols]
            env.store[self.store] = value[..., : env.row_length(self.row)].detach().clone()
            return
        env.store[self.store] = self._shaped(hidden[at.index].detach().clone())

    def _shaped(self, value: Any) -> Any:
        if self.head_dim:  # [positions, heads, head_dim]
            return value.reshape(len(self.positions), -1, self.head_dim)
        return value


@dataclass(frozen=True, kw_only=True)
class Grad(_Keeps):
    """Keep the gradient of the backward metric at the site's ``positions`` under ``store``."""

    kind: ClassVar[str] = "grad"
    head_dim: int | None = None

    def apply(self, hidden: Any, at: At, env: OpEnv) -> None:
        env.keep_grad(hidden, at, self)


@dataclass(frozen=True, kw_only=True)
class Capture(_Keeps):
    """Keep every position of the row at the site under ``store`` (``positions`` are all of
    the row's positions), once for every op of a later stage that reads it."""

    kind: ClassVar[str] = "capture"

    def apply(self, hidden: Any, at: At, env: OpEnv) -> None:
        env.store[self.store] = hidden[at.row, : len(self.positions)].detach().clone()
