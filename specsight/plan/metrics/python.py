"""The ``python`` metric: one value per row from a Python function of the row's next-token
logits at the metric's position, given to the run (local runs only: a plan names the function,
the engine holds it), read a forward's rows at a time like the built-in metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import CompileEnv, ReadBatch, RowMetric

__all__ = ["PythonScore"]


@dataclass(frozen=True, kw_only=True)
class PythonScore(RowMetric):
    """``fn(logits)``: [n, vocab] float32 in, [n] out."""

    kind: ClassVar[str] = "python"
    signed: ClassVar[bool] = True
    fn: str

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> PythonScore:
        return cls(**env.reader(name, metric).fields("tokens"), fn=metric.fn)

    def read(self, batch: ReadBatch) -> tuple[Any, Any]:
        return batch.call_metric(self.fn, batch.logits, str(self.name)), None

    def what(self, plan: Any) -> str:
        return f"python {self.fn}(logits)"
