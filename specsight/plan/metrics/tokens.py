"""Metrics of some tokens' scores in each row's next-token output: ``logits``, ``logprob`` and
``prob`` of a token (or a list: a ``token`` axis), ``logit_diff`` (target minus foil) and
``accuracy`` (1 where the target is the top token)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import CompileEnv, ReadBatch, RowMetric, Tokens

__all__ = ["Logits", "LogProb", "Prob", "LogitDiff", "Accuracy"]


@dataclass(frozen=True, kw_only=True)
class _TokenScores(RowMetric):
    """A score of each of ``tokens`` (one ``token``: ``squeeze``, no token axis)."""

    tokens: Tokens
    squeeze: bool = False

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> _TokenScores:
        squeeze = metric.token is not None
        if squeeze:
            refs = [(metric.token, ("token",))]
        else:
            refs = [(ref, ("tokens", i)) for i, ref in enumerate(metric.tokens)]
        return cls(**env.reader(name, metric, tokens=refs).fields(), squeeze=squeeze)

    def scores(self, logits: Any) -> Any:
        """Every vocabulary entry's score, [n, vocab]."""
        raise NotImplementedError

    def read(self, batch: ReadBatch) -> tuple[Any, Any]:
        values = batch.pick(self.scores(batch.logits), self.tokens)
        return (values[:, 0] if self.squeeze else values), None

    def suffix(self) -> tuple[str, ...]:
        return () if self.squeeze else ("token",)

    def suffix_values(self, axis: str) -> list[Any] | None:
        return list(self.tokens.labels) if axis == "token" else None

    def token_checks(self) -> dict[str, str]:
        return {} if self.squeeze else {"argmax": "tokens"}

    def what(self, plan: Any) -> str:
        return f"{self.kind}({', '.join(repr(t) for t in self.tokens.labels)})"

    def label(self) -> str | None:
        return f"{self.kind} of {self.tokens.labels[0]!r}" if self.tokens.labels else None


@dataclass(frozen=True, kw_only=True)
class Logits(_TokenScores):
    kind: ClassVar[str] = "logits"
    signed: ClassVar[bool] = True

    def scores(self, logits: Any) -> Any:
        return logits


@dataclass(frozen=True, kw_only=True)
class LogProb(_TokenScores):
    kind: ClassVar[str] = "logprob"

    def scores(self, logits: Any) -> Any:
        return logits.log_softmax(-1)


@dataclass(frozen=True, kw_only=True)
class Prob(_TokenScores):
    kind: ClassVar[str] = "prob"

    def scores(self, logits: Any) -> Any:
        return logits.softmax(-1)


@dataclass(frozen=True, kw_only=True)
class LogitDiff(RowMetric):
    """The target's logit minus the foil's."""

    kind: ClassVar[str] = "logit_diff"
    signed: ClassVar[bool] = True
    tokens: Tokens  # (target, foil)

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> LogitDiff:
        refs = [(metric.target, ("target",)), (metric.foil, ("foil",))]
        return cls(**env.reader(name, metric, tokens=refs).fields())

    def read(self, batch: ReadBatch) -> tuple[Any, Any]:
        both = batch.pick(batch.logits, self.tokens)
        return both[:, 0] - both[:, 1], None

    def what(self, plan: Any) -> str:
        target, foil = self.tokens.labels
        return f"logit_diff({target!r} - {foil!r})"


@dataclass(frozen=True, kw_only=True)
class Accuracy(RowMetric):
    """1 where the target is the top token (torch's argmax: the first of ties), else 0; a mean
    over the items (or prompts) unless ``reduce`` says otherwise."""

    kind: ClassVar[str] = "accuracy"
    tokens: Tokens  # (target,)

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> Accuracy:
        refs = [(metric.target, ("target",))]
        return cls(**env.reader(name, metric, tokens=refs, reduced_by_default=True).fields())

    def read(self, batch: ReadBatch) -> tuple[Any, Any]:
        target = batch.token_ids(self.tokens)[:, 0]
        return (batch.logits.argmax(-1) == target).float(), None

    def what(self, plan: Any) -> str:
        return f"accuracy({self.tokens.labels[0]!r})"
