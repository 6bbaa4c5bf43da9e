"""Ops that write values the run stored earlier: ``patch`` (another row's values at a site,
from a capture of an earlier stage; ``resample_ablate`` and ``skip`` compile to it), and
``add`` or ``set`` of a saved value (one row's, or the mean over its rows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..records import Op
from ..refs import StoreKey
from .env import At, Group, OpEnv

__all__ = ["Patch", "AddSaved", "SetSaved"]


@dataclass(frozen=True, kw_only=True)
class Patch(Op):
    """Write ``source``'s values at ``source_positions`` into the row at ``positions``."""

    kind: ClassVar[str] = "patch"
    source: StoreKey
    source_positions: tuple[int, ...]

    def reads(self) -> tuple[StoreKey, ...]:
        return (self.source,)

    def _pairs(self) -> list[tuple[StoreKey, int]]:
        return [(self.source, p) for p in self.source_positions]

    @classmethod
    def batchable(cls, ops: list[Any], env: OpEnv) -> bool:
        """Sources stored by an earlier stage: every row's values gathered before the forward
        (a source captured in the same forward, as ``skip`` does, is read when it is there)."""
        return all(op.source in env.store for op in ops)

    @classmethod
    def prepare(cls, group: Group, env: OpEnv) -> None:
        pairs = [pair for op in group.ops for pair in op._pairs()]
        group.values = env.stored(pairs, group.ops[0].cols)

    @classmethod
    def write(cls, hidden: Any, group: Group, env: OpEnv) -> None:
        hidden[group.index] = group.values.to(hidden.dtype)

    def apply(self, hidden: Any, at: At, env: OpEnv) -> None:
        hidden[at.index] = env.stored(self._pairs(), self.cols).to(hidden.device, hidden.dtype)


@dataclass(frozen=True, kw_only=True)
class _Saved(Op):
    """An op that writes a saved value: one row's (a value per position, or one for all), or
    the mean over every row and position of ``sources`` (``mean``). With ``minus``, the mean of
    ``sources`` minus the mean of ``minus`` (a steering vector from contrastive data): pooled
    over rows and positions (``mean``) or per position, then scaled as ``norm`` says."""

    sources: tuple[StoreKey, ...]
    mean: bool = False
    minus: tuple[StoreKey, ...] = ()
    #: "none", "unit" (length 1) or "match_site" (the mean length of the values it writes over)
    norm: str = "none"

    def reads(self) -> tuple[StoreKey, ...]:
        return self.sources + self.minus

    def _value(self, hidden: Any, env: OpEnv, at: At | None = None) -> Any:
        if not self.minus:
            return env.saved(self.sources, self.mean).to(hidden.device, hidden.dtype)
        key = ("mean_diff", self.sources, self.minus, self.mean)
        diff = env.derived(key, self._difference(env)).to(hidden.device, hidden.dtype)
        if self.norm == "none":
            return diff
        length = diff.norm(dim=-1, keepdim=True)
        if self.norm == "match_site" and at is not None:
            length = length / hidden[at.index].norm(dim=-1).mean()
        return diff / length

    def _difference(self, env: OpEnv) -> Any:
        def compute() -> Any:
            positive = env.saved_mean(self.sources, pooled=self.mean)
            return positive - env.saved_mean(self.minus, pooled=self.mean)

        return compute


@dataclass(frozen=True, kw_only=True)
class AddSaved(_Saved):
    """Add ``factor`` times a saved value."""

    kind: ClassVar[str] = "add_saved"
    factor: float = 1.0

    @property
    def label(self) -> str:
        return "add"

    def apply(self, hidden: Any, at: At, env: OpEnv) -> None:
        hidden[at.index] = hidden[at.index] + self._value(hidden, env, at) * self.factor


@dataclass(frozen=True, kw_only=True)
class SetSaved(_Saved):
    """Set the site to a saved value."""

    kind: ClassVar[str] = "set_saved"

    @property
    def label(self) -> str:
        return "set"

    def apply(self, hidden: Any, at: At, env: OpEnv) -> None:
        hidden[at.index] = self._value(hidden, env, at).expand(len(self.positions), -1)
