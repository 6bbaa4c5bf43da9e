"""Patching recovery: ``(patched - corrupt) / (clean - corrupt)`` of three other metrics, per
cell (and per item over a dataset), or, reduced ``of: means``, the recovery of their means
with a bootstrap that resamples the three inputs' items together (they are paired)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..records import Metric
from ..refs import InvokeRef, ResultRef
from .base import CompileEnv, dims_text, reduced_text

__all__ = ["Recovery"]


@dataclass(frozen=True, kw_only=True)
class Recovery(Metric):
    """Shaped like the patched metric; clean and corrupt give one value (or one per item)."""

    kind: ClassVar[str] = "recovery"
    signed: ClassVar[bool] = True
    center: ClassVar[float | None] = 0.0
    patched: ResultRef
    clean: ResultRef
    corrupt: ResultRef
    #: reduced ``of: means``: the recovery of the means, not a statistic of the recoveries
    of_means: bool = False
    #: whether the clean and the corrupt metric have a value per item
    per_item: tuple[bool, bool] = (False, False)

    @property
    def reduces(self) -> str:  # type: ignore[override]
        return "means" if self.of_means else "items"

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> Recovery:
        env.check_recovery(name, metric)
        patched = env.spec_metric(metric.patched)
        axes, shape, each = env.result_axes(patched.invoke)
        reduce = env.reduce(name, metric, axes, shape, each)
        per_item = tuple(env.input_axis(env.spec_metric(ref).invoke) is not None for ref in (metric.clean, metric.corrupt))  # fmt: skip
        return cls(
            name=ResultRef(name),
            invoke=InvokeRef(patched.invoke),
            axes=axes,
            shape=shape,
            reduce=reduce,
            patched=ResultRef(metric.patched),
            clean=ResultRef(metric.clean),
            corrupt=ResultRef(metric.corrupt),
            of_means=reduce is not None and metric.of == "means",
            per_item=per_item if reduce is not None else (False, False),
        )

    def inputs(self) -> tuple[ResultRef, ...]:
        return (self.patched, self.clean, self.corrupt)

    def finish(self, after: Any) -> dict[str, Any]:
        patched, clean, corrupt = (after.metrics[name] for name in self.inputs())
        return {self.name: (patched - corrupt) / (clean - corrupt)}

    def statistic(
        self, raw: dict[str, Any], reduce_over: Callable[..., Any]
    ) -> Callable[[Any], Any]:
        """The reduction as a function of resampled item indices (None: every item): the
        recovery of the means; ``reduce_over(values, index)`` is the reduction's statistic
        over the last axis."""
        axis = self.reduce.axis  # type: ignore[union-attr]
        patched = raw[self.patched].float().movedim(axis, -1)
        others = []
        for name, has_items in zip((self.clean, self.corrupt), self.per_item):
            value = raw[name].float()
            others.append((value.movedim(0, -1), True) if has_items else (value, False))

        def statistic(index: Any) -> Any:
            p = reduce_over(patched, index)
            clean, corrupt = (
                reduce_over(value, index)
                if has_items
                else (value if index is None else value[..., None])
                for value, has_items in others
            )
            return (p - corrupt) / (clean - corrupt)

        return statistic

    def explain(self, plan: Any) -> str:
        p, c, k = self.patched, self.clean, self.corrupt
        what = f"recovery = ({p} - {k}) / ({c} - {k})"
        if self.of_means:
            what = f"recovery of means = (mean {p} - mean {k}) / (mean {c} - mean {k})"
        return f"  {self.name}: {what} -> [{dims_text(self)}]{reduced_text(self)}"
