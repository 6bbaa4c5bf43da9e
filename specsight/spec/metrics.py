"""Spec v1 metrics: what is measured on the output (claims about them: :mod:`.claims`)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from .base import PositionSelector, TokenRef
from .circuits import CircuitEdges, EdgeAttributionMetric, FaithfulnessMetric
from .inside import DLA_PARTS, DlaMetric, ProbeMetric, ProbeSplit, TopFeaturesMetric
from .metric_kinds import MetricBase, MetricKind, Reduce, Reducible, sites_field
from .python import PythonMetric

__all__ = [
    "PythonMetric",
    "Reduce",
    "LogitsMetric",
    "LogprobMetric",
    "ProbMetric",
    "LogitDiffMetric",
    "TopKMetric",
    "LogitLensMetric",
    "RecoveryMetric",
    "KlMetric",
    "LossMetric",
    "AccuracyMetric",
    "AttributionMetric",
    "CircuitEdges",
    "EdgeAttributionMetric",
    "FaithfulnessMetric",
    "DlaMetric",
    "DLA_PARTS",
    "ProbeMetric",
    "ProbeSplit",
    "TopFeaturesMetric",
    "Metric",
    "METRIC_CLASSES",
    "METRIC_KINDS",
]


class _TokenMetric(MetricBase):
    token: TokenRef | None = None
    tokens: list[TokenRef] | None = Field(None, min_length=1)

    scalar: ClassVar[bool] = True

    @model_validator(mode="after")
    def _one_of(self) -> _TokenMetric:
        if (self.token is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'token' (one token) or 'tokens' (a list)")
        return self

    def value_axes(self) -> tuple[str, ...]:
        return ("token",) if self.tokens is not None else ()

    def value_counts(self, cells: int, sites: int) -> dict[str, tuple[int, bool]]:
        return {"": (cells * len(self.tokens or [None]), False)}


class LogitsMetric(_TokenMetric):
    kind: Literal["logits"]


class LogprobMetric(_TokenMetric):
    kind: Literal["logprob"]


class ProbMetric(_TokenMetric):
    kind: Literal["prob"]


class LogitDiffMetric(MetricBase):
    kind: Literal["logit_diff"]
    scalar: ClassVar[bool] = True
    target: TokenRef
    foil: TokenRef


class TopKMetric(MetricBase):
    kind: Literal["top_k"]
    reducible: ClassVar[bool] = False
    takes_baseline: ClassVar[bool] = False
    k: int = Field(10, ge=1, le=1000)

    def value_counts(self, cells: int, sites: int) -> dict[str, tuple[int, bool]]:
        return {"": (cells * self.k, False), "ids": (cells * self.k, True)}


class LogitLensMetric(MetricBase):
    """Decode intermediate residual streams through the final norm and unembedding."""

    kind: Literal["logit_lens"]
    takes_baseline: ClassVar[bool] = False
    site: str = sites_field(
        "decode",
        "the residual-stream sites to decode (d_model wide: resid_*, attn_out, mlp_out, ...)",
        ["resid_post.*", "resid_mid.0:12"],
    )
    token: TokenRef | None = Field(None, description="report this token's probability per site")
    k: int = Field(5, ge=1, le=100, description="top tokens kept per site")

    def value_axes(self) -> tuple[str, ...]:
        return ("site",)

    def value_counts(self, cells: int, sites: int) -> dict[str, tuple[int, bool]]:
        top = cells * sites * self.k
        return {"": (cells * sites, False), "ids": (top, True), "probs": (top, False)}


class KlMetric(MetricBase):
    """KL(reference || invoke) of the next-token distributions at ``position``: how far an
    intervention moves the whole distribution, not one logit. The reference is an unmodified
    invoke giving one prompt or one per item; it runs in an earlier stage."""

    kind: Literal["kl"]
    reference: str = Field(description="the invoke whose next-token distribution is the reference")


class LossMetric(Reducible):
    """The mean next-token cross-entropy over each prompt's tokens (nats): the side-effect
    check of a steering vector or an ablation on ordinary text."""

    kind: Literal["loss"]
    invoke: str = Field(description="the invoke whose prompts are scored")
    baseline: str | None = Field(None, description="a loss metric on an unmodified run")


class AccuracyMetric(MetricBase):
    """1 where the top next token at ``position`` is ``target``, else 0; averaged over the
    items (or prompts) unless ``reduce`` says otherwise."""

    kind: Literal["accuracy"]
    reduced_by_default: ClassVar[bool] = True
    target: TokenRef


class RecoveryMetric(Reducible):
    """Patching recovery: (patched - corrupt) / (clean - corrupt), from three other metrics.

    Over a dataset, ``of: items`` (default) is each item's recovery (reduced by ``reduce``,
    e.g. the mean of recoveries); ``of: means`` is the recovery of the means, (mean patched -
    mean corrupt) / (mean clean - mean corrupt), reduced over ``reduce.over`` (item)."""

    kind: Literal["recovery"]
    of: Literal["items", "means"] = Field(
        "items", description="items: per-item recovery; means: the recovery of the means"
    )
    patched: str = Field(description="the metric measured with the patch (often swept)")
    clean: str = Field(description="the same metric on the clean run")
    corrupt: str = Field(description="the same metric on the corrupted run without patches")

    @property
    def shaped_like(self) -> str | None:
        return self.patched


class AttributionMetric(MetricKind):
    """Attribution patching: per site and position, gradient x (clean - corrupt) of the
    corrupted run's logit difference; one clean forward, one corrupted forward + backward."""

    kind: Literal["attribution"]
    fixed_axes: ClassVar[tuple[str, ...] | None] = ("site", "pos")
    needs_backward: ClassVar[bool] = True
    clean: str = Field(description="the clean invoke (one prompt, no sweep)")
    corrupt: str = Field(description="the corrupted invoke, as many tokens as the clean one")
    site: str = sites_field(
        "attribute",
        "the sites to attribute (whole-width, not per-head)",
        ["resid_post.*", "attn_out.*", "mlp_out.0:6"],
    )
    target: TokenRef
    foil: TokenRef
    position: PositionSelector = Field(
        "last", description="the position whose logit difference is differentiated"
    )


Metric = Annotated[
    PythonMetric
    | EdgeAttributionMetric
    | FaithfulnessMetric
    | TopFeaturesMetric
    | ProbeMetric
    | AttributionMetric
    | DlaMetric
    | LogitsMetric
    | LogprobMetric
    | ProbMetric
    | LogitDiffMetric
    | TopKMetric
    | LogitLensMetric
    | RecoveryMetric
    | KlMetric
    | LossMetric
    | AccuracyMetric,
    Field(discriminator="kind"),
]
METRIC_CLASSES: dict[str, type[BaseModel]] = {
    "logits": LogitsMetric,
    "logprob": LogprobMetric,
    "prob": ProbMetric,
    "logit_diff": LogitDiffMetric,
    "top_k": TopKMetric,
    "logit_lens": LogitLensMetric,
    "recovery": RecoveryMetric,
    "attribution": AttributionMetric,
    "kl": KlMetric,
    "loss": LossMetric,
    "accuracy": AccuracyMetric,
    "dla": DlaMetric,
    "probe": ProbeMetric,
    "top_features": TopFeaturesMetric,
    "edge_attribution": EdgeAttributionMetric,
    "faithfulness": FaithfulnessMetric,
    "python": PythonMetric,
}
METRIC_KINDS = tuple(METRIC_CLASSES)
