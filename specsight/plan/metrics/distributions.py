"""Metrics of whole next-token distributions: ``top_k`` (each row's k most likely tokens and
their probabilities), ``kl`` (KL divergence from a reference invoke's distribution, the same
item or its one prompt, read in an earlier stage) and ``loss`` (the mean cross-entropy of
every next-token prediction of the row's prompt)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import RunError
from ..refs import Rows
from .base import CompileEnv, ReadBatch, RowMetric, explain_line

__all__ = ["TopK", "KL", "Loss"]


@dataclass(frozen=True, kw_only=True)
class TopK(RowMetric):
    """The k most likely next tokens of each row: probabilities, and ids in ``/ids``."""

    kind: ClassVar[str] = "top_k"
    view: ClassVar[str] = "tokens"
    ranks_tokens: ClassVar[bool] = True
    companions: ClassVar[tuple[str, ...]] = ("ids",)
    trailing: ClassVar[tuple[str, ...]] = ("k",)
    k: int

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> TopK:
        vocab = env.vocab_size
        if vocab and metric.k > vocab:
            raise env.fail(
                "bad-k",
                f"k = {metric.k} but the model has {vocab} outputs",
                ("metrics", name, "k"),
                f"use k <= {vocab}",
            )
        return cls(**env.reader(name, metric).fields("tokens"), k=metric.k)

    def read(self, batch: ReadBatch) -> tuple[Any, Any]:
        logits = batch.logits
        if self.k > logits.shape[-1]:
            raise RunError(
                f"top_k asks for {self.k} outputs but the model returns {logits.shape[-1]}",
                hint=f"use k <= {logits.shape[-1]}",
            )
        return logits.softmax(-1).topk(self.k, dim=-1)

    def what(self, plan: Any) -> str:
        return f"top_k(k={self.k})"


@dataclass(frozen=True, kw_only=True)
class KL(RowMetric):
    """KL(reference || row) of the next-token distributions, per row."""

    kind: ClassVar[str] = "kl"
    #: the reference row and position of each entry of ``rows``
    references: Rows
    reference_positions: tuple[int, ...]

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> KL:
        parts = env.reader(name, metric)
        rows, positions = env.reference_rows(name, metric, parts)
        return cls(**parts.fields("tokens"), references=rows, reference_positions=positions)

    def logit_reads(self) -> Iterator[tuple[int, int]]:
        yield from zip(self.rows, self.positions)
        yield from zip(self.references, self.reference_positions)

    def reference_reads(self) -> Iterator[tuple[int, int]]:
        """The (row, position) pairs whose distributions a later stage compares with."""
        return zip(self.references, self.reference_positions)

    def read(self, batch: ReadBatch) -> tuple[Any, Any]:
        reference = batch.reference_logp(self)
        logp = batch.logits.log_softmax(-1)
        return (reference.exp() * (reference - logp)).sum(-1), None

    def what(self, plan: Any) -> str:
        reference = plan.rows[self.references[0]].invoke
        return f"KL({reference} || {self.invoke}) of the next-token distributions"


@dataclass(frozen=True, kw_only=True)
class Loss(RowMetric):
    """The mean cross-entropy of a row's next-token predictions (NaN for a one-token row)."""

    kind: ClassVar[str] = "loss"

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> Loss:
        return cls(**env.reader(name, metric, last=True).fields("tokens"))

    def logit_reads(self) -> Iterator[tuple[int, int]]:
        for row, last in zip(self.rows, self.positions):
            for position in range(last + 1):
                yield row, position

    def read(self, batch: ReadBatch) -> tuple[Any, Any]:
        nan = batch.logits.new_tensor(float("nan"))
        values = []
        for logits, targets in batch.sequences():
            if targets is None:
                values.append(nan)
                continue
            logp = logits.float().log_softmax(-1)
            values.append(-logp.gather(1, targets[:, None]).mean())
        return batch.stack(values), None

    def explain(self, plan: Any) -> str:
        where = "(mean cross-entropy of every next-token prediction)"
        return explain_line(self, plan, "loss", where=where)
