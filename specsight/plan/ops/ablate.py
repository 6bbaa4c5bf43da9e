"""Ablation ops computed from what earlier stages captured or from plan vectors: ``mean`` (a
reference invoke's mean, per position or over all), ``noise`` (seeded Gaussian noise, of an
absolute std or a multiple of the reference rows' spread) and ``project_out`` (the span of
plan vectors removed). Each value shared by many rows is computed once per run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..records import Op
from ..refs import StoreKey, VectorKey
from .env import At, OpEnv

__all__ = ["Mean", "Noise", "ProjectOut"]


@dataclass(frozen=True, kw_only=True)
class Mean(Op):
    """Set the site to the mean of ``sources`` (captured rows): per position (``over:
    position``) or over every position too (``over: all``)."""

    kind: ClassVar[str] = "mean"
    sources: tuple[StoreKey, ...]
    over: str  # position, all

    def reads(self) -> tuple[StoreKey, ...]:
        return self.sources

    def apply(self, hidden: Any, at: At, env: OpEnv) -> None:
        table = env.derived(
            ("mean", self.sources, self.over),
            lambda: env.mean([env.store[k] for k in self.sources], self.over),
        )
        value = table if self.over == "all" else table[list(self.positions)]
        if at.cols is not None:
            value = value[..., at.cols.to(value.device)]
        hidden[at.index] = value.to(hidden.device, hidden.dtype).expand_as(hidden[at.index])


@dataclass(frozen=True, kw_only=True)
class Noise(Op):
    """Add Gaussian noise of std ``std`` (times the spread of ``sources``' values, when there
    are sources), drawn from the row's own ``seed``."""

    kind: ClassVar[str] = "noise"
    std: float
    seed: int
    #: the captured rows whose standard deviation scales ``std`` (empty: ``std`` is absolute)
    sources: tuple[StoreKey, ...] = ()

    def reads(self) -> tuple[StoreKey, ...]:
        return self.sources

    def apply(self, hidden: Any, at: At, env: OpEnv) -> None:
        std = self.std
        if self.sources:
            captures = [env.store[k] for k in self.sources]
            cols = None if at.cols is None else at.cols.to(captures[0].device)
            std *= env.derived(
                ("spread", self.sources, self.cols), lambda: env.spread(captures, cols)
            )
        target = hidden[at.index]
        hidden[at.index] = target + (env.noise(self.seed, target) * std).to(
            hidden.device, hidden.dtype
        )


@dataclass(frozen=True, kw_only=True)
class ProjectOut(Op):
    """Remove the site's component in the span of the plan vectors ``vectors``."""

    kind: ClassVar[str] = "project_out"
    vectors: tuple[VectorKey, ...]

    def apply(self, hidden: Any, at: At, env: OpEnv) -> None:
        basis = env.derived(("basis", self.vectors), lambda: env.basis(self.vectors))
        hidden[at.index] = env.project_out(hidden[at.index], basis.to(hidden.device))
