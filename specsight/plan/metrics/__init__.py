"""The metric kinds of a plan: one record class per kind, holding what the metric reads, how
it compiles from the spec's metric (through the compiler's services), how it is read out of a
run (through the engine's), and how it is labelled and shown.

Kinds are registered by their ``kind`` tag (the spec's): :func:`metric_kind` gives the class
the compiler builds for a spec metric.
"""

from ..codec import kinds_of
from ..records import Metric
from .attribution import Attribution
from .base import AfterRun, CompileEnv, ReadBatch, ReaderParts, RowMetric, Tokens
from .circuits import EdgeAttribution, Faithfulness
from .distributions import KL, Loss, TopK
from .dla import DirectLogitAttribution
from .features import TopFeatures
from .lens import LogitLens
from .probe import Probe
from .python import PythonScore
from .recovery import Recovery
from .tokens import Accuracy, LogitDiff, Logits, LogProb, Prob

__all__ = [
    "AfterRun",
    "CompileEnv",
    "ReadBatch",
    "ReaderParts",
    "RowMetric",
    "Tokens",
    "metric_kind",
    "Logits",
    "LogProb",
    "Prob",
    "LogitDiff",
    "Accuracy",
    "TopK",
    "KL",
    "Loss",
    "LogitLens",
    "Attribution",
    "DirectLogitAttribution",
    "Probe",
    "TopFeatures",
    "Recovery",
    "EdgeAttribution",
    "Faithfulness",
    "PythonScore",
]


def metric_kind(tag: str) -> type[Metric]:
    """The record class of a metric kind (``logit_diff``, ``kl``, ...)."""
    return kinds_of(Metric)[tag]
