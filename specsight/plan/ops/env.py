"""What an op kind's run-time code may ask of the engine (:class:`OpEnv`), and where an op acts
in the tensor of its site (:class:`At`).

Op kinds hold their run-time behaviour next to their records, but the plan never imports
torch: the engine hands each kind an :class:`OpEnv` whose methods build and read tensors, and
the kinds act on the site's tensor through its own methods and indexing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..refs import StoreKey, VectorKey

__all__ = ["At", "OpEnv", "Group"]


@dataclass(frozen=True)
class At:
    """Where one op acts in the tensor of its site (``[batch, pos, width]``): its row in the
    batch, its positions (an index tensor, shifted to the forward's first position) and
    columns (an index tensor, or None: every column)."""

    row: int
    positions: Any
    cols: Any

    @property
    def index(self) -> tuple[Any, ...]:
        """The index of the op's values: ``hidden[at.index]`` is [positions, width]."""
        if self.cols is None:
            return (self.row, self.positions)
        return (self.row, self.positions[:, None], self.cols[None, :])


@dataclass
class Group:
    """Ops of one kind on the same columns at one site in one forward, applied as one indexed
    operation: ``index`` picks every (row, position) pair of every op, in op order. What the
    kind prepares for them (``Op.prepare``): ``values`` written or added at each pair ([n,
    width]), ``factors`` they are scaled by ([n, 1])."""

    ops: list[Any]
    index: tuple[Any, ...]
    values: Any = None
    factors: Any = None


class OpEnv(Protocol):
    """The engine's services to op kinds, for one run."""

    store: dict[str, Any]

    def factors(self, values: Sequence[float]) -> Any:
        """One factor per value, as an [n, 1] tensor of the site's dtype on its device."""

    def vectors(self, keys: Sequence[VectorKey]) -> Any:
        """The plan's vectors ``keys``, stacked as [n, width]."""

    def vector(self, key: VectorKey, like: Any) -> Any:
        """One plan vector, in ``like``'s dtype and on its device."""

    def stored(self, pairs: Sequence[tuple[StoreKey, int]]) -> Any:
        """Stored values ``store[key][position]`` for each pair, stacked as [n, width]."""

    def saved(self, keys: Sequence[StoreKey], mean: bool) -> Any:
        """One saved row's values, a vector per position, or (``mean``) the mean over every
        row and position of ``keys``."""

    def saved_mean(self, keys: Sequence[StoreKey], pooled: bool) -> Any:
        """The mean of saved rows ``keys``: a vector per position, or (``pooled``) one over
        their positions too."""

    def derived(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        """A value computed once per run (a mean, a spread, a basis) under ``key``."""

    def mean(self, captures: list[Any], over: str) -> Any:
        """The mean of captured rows: per position (``position``) or over all (``all``)."""

    def spread(self, captures: list[Any], cols: Any) -> float:
        """The standard deviation of every captured value (in the chosen columns)."""

    def basis(self, keys: Sequence[VectorKey]) -> Any:
        """An orthonormal basis of the span of plan vectors ``keys``, [width, rank]."""

    def project_out(self, values: Any, basis: Any) -> Any:
        """``values`` without their component in ``basis``'s span."""

    def noise(self, seed: int, like: Any) -> Any:
        """Seeded standard normal values shaped like ``like`` (the same on every device)."""

    def keep_grad(self, hidden: Any, at: At, op: Any) -> None:
        """Keep ``hidden``'s gradient at ``at`` under ``op.store`` when the backward pass runs."""

    def path_value(self, op: Any, at: At) -> Any:
        """A path_patch receiver's new value at its positions (and columns): [n, width]."""

    def row_length(self, row: int) -> int:
        """The number of real tokens of the plan's row ``row``."""

    def call(self, fn: str, values: Any, origin: str) -> Any:
        """The Python function ``fn`` given to the run, applied to a site's ``values``
        ([n, width]); its result checked to have their shape (``origin``: the op, for errors)."""
