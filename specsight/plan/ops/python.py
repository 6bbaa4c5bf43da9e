"""The ``python`` op: a site's values at the op's positions (and heads or dims) passed through a
Python function given to the run, for every row of a forward at once when the ops share the
function (local runs only: a plan names the function, the engine holds it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..records import Op
from .env import At, Group, OpEnv

__all__ = ["CallPython"]


@dataclass(frozen=True, kw_only=True)
class CallPython(Op):
    """Replace the values at ``positions`` by ``fn(values)`` ([n, width] in and out)."""

    kind: ClassVar[str] = "python"
    fn: str

    @classmethod
    def batchable(cls, ops: list[Any], env: OpEnv) -> bool:
        return len({op.fn for op in ops}) == 1

    @classmethod
    def write(cls, hidden: Any, group: Group, env: OpEnv) -> None:
        first = group.ops[0]
        hidden[group.index] = env.call(first.fn, hidden[group.index], first.origin)

    def apply(self, hidden: Any, at: At, env: OpEnv) -> None:
        hidden[at.index] = env.call(self.fn, hidden[at.index], self.origin)
