"""``path_patch`` at one receiver of one row: the receiver's input set to the unpatched run's
input plus each sender's change (its output in the ``from`` run minus in the unpatched run),
read from captures of an earlier stage, and written after the receiver's norm so that only
the receiver reads it: a head's q, k or v through the head's own columns of its projection,
an MLP's and the logits' at their norms' outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..records import Op
from ..refs import StoreKey
from .env import At, OpEnv

__all__ = ["PathPatch", "Sender"]


@dataclass(frozen=True, kw_only=True)
class Sender:
    """One sender's captured outputs (whole rows): in the ``from`` run and in the unpatched
    run. A head's are the output projection's input (``head`` >= 0: its columns go through
    ``o_proj``'s); the embedding's and an MLP's are what they add to the residual stream."""

    source: StoreKey
    base: StoreKey
    head: int = -1
    o_proj: str = ""


@dataclass(frozen=True, kw_only=True)
class PathPatch(Op):
    """Set one receiver's input at ``positions``, written through its ``norm``: at the norm's
    output (an MLP, the logits) or, for a head's q, k or v, at the head's columns (``cols``)
    of the projection's output."""

    kind: ClassVar[str] = "path_patch"
    base_input: StoreKey
    senders: tuple[Sender, ...]
    norm: str = ""
    #: a head's q, k or v: the normed input goes through the projection's columns from
    #: ``first`` (else the norm's output is written as it is)
    project: bool = False
    first: int = 0
    n_heads: int = 0
    d_head: int = 0

    def reads(self) -> tuple[StoreKey, ...]:
        return (self.base_input, *(k for s in self.senders for k in (s.source, s.base)))

    def apply(self, hidden: Any, at: At, env: OpEnv) -> None:
        hidden[at.index] = env.path_value(self, at).to(hidden.device, hidden.dtype)
