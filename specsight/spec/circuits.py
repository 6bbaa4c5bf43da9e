"""Spec v1 metrics of circuits on the component graph (heads, MLPs, the embedding, the
logits): ``edge_attribution`` scores every edge (EAP, EAP-IG) and ``faithfulness`` checks a
circuit (a set of edges) by ablating every edge outside it."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from .base import PositionSelector, StrictModel, TokenRef
from .metric_kinds import MetricKind

__all__ = ["CircuitEdges", "EdgeAttributionMetric", "FaithfulnessMetric"]


class _CircuitMetric(MetricKind):
    """What both circuit metrics read: a clean and a corrupt invoke over the same items (the
    same number of tokens per item), and the logit difference at ``position``."""

    reducible: ClassVar[bool] = False
    takes_baseline: ClassVar[bool] = False
    whole_dataset: ClassVar[bool] = True
    clean: str = Field(description="the clean invoke (a dataset's items, or a list of prompts)")
    corrupt: str = Field(description="the corrupt invoke: as many tokens as clean, item by item")
    target: TokenRef
    foil: TokenRef
    position: PositionSelector = Field(
        "last", description="the position whose logit difference (target - foil) is the metric"
    )

    @property
    def invoke(self) -> str:
        """The invoke whose rows the metric is laid out on (the clean one)."""
        return self.clean


class EdgeAttributionMetric(_CircuitMetric):
    """Edge attribution patching: every edge U->D of the component graph scored as
    (U's output on clean - on corrupt) . d metric / d D's input, summed over positions and
    averaged over items. ``eap`` takes the gradient on the clean run; ``eap_ig`` averages it
    over ``steps`` runs whose input embeddings go from corrupt to clean (k / steps, k =
    1..steps). The result is ``[upstream, downstream]`` (NaN where no edge joins them)."""

    kind: Literal["edge_attribution"]
    fixed_axes: ClassVar[tuple[str, ...] | None] = ("upstream", "downstream")
    method: Literal["eap", "eap_ig"] = Field("eap", description="eap, or eap_ig (integrated)")
    positions: Literal["summed", "per_token"] = Field(
        "summed",
        description="per_token: a node per position too (items of one length, e.g. one "
        "template); the result is [pos, upstream, downstream]",
    )
    steps: int = Field(5, ge=1, le=100, description="eap_ig: interpolation steps")
    top: int = Field(20, ge=1, le=1000, description="edges the summary lists")

    @model_validator(mode="after")
    def _steps_for_ig(self) -> EdgeAttributionMetric:
        if "steps" in self.model_fields_set and self.method == "eap":
            raise ValueError("steps is for method: eap_ig (eap takes one gradient)")
        return self

    def value_axes(self) -> tuple[str, ...]:
        return (("pos",) if self.positions == "per_token" else ()) + ("upstream", "downstream")

    def suffix_size(self, info: Any, sites: int) -> int:
        per_layer_down = info.n_heads + 2 * info.n_kv_heads + 1
        n_up = 1 + info.n_layers * (info.n_heads + 1)
        return n_up * (info.n_layers * per_layer_down + 1)


class CircuitEdges(StrictModel):
    """A circuit: the ``top`` edges of an edge_attribution metric (by absolute score; a list
    of sizes gives one circuit per size), a circuit file written by ``run --out``, or the
    edges listed (``'head.3.1->mlp.5'``)."""

    top: int | list[int] | None = Field(None, description="circuit size(s) in edges")
    from_: str | None = Field(None, alias="from", description="the edge_attribution metric")
    file: str | None = Field(None, description="a circuit file (JSON, from run --out)")
    edges: list[str] | None = Field(None, description="the edges, 'UP->DOWN'")

    @model_validator(mode="after")
    def _one_source(self) -> CircuitEdges:
        given = [k for k in ("file", "edges") if getattr(self, k) is not None]
        ranked = self.top is not None or self.from_ is not None
        if ranked and (self.top is None or self.from_ is None):
            raise ValueError("top and from go together: {top: 200, from: METRIC}")
        if len(given) + ranked != 1:
            raise ValueError("give one of {top: N, from: METRIC}, {file: PATH} or {edges: [...]}")
        sizes = self.sizes()
        if any(k < 0 for k in sizes) or len(set(sizes)) != len(sizes):
            raise ValueError("circuit sizes are distinct counts of edges (0 or more)")
        if isinstance(self.top, list) and not self.top:
            raise ValueError("top lists at least one size")
        return self

    def sizes(self) -> list[int]:
        if self.top is None:
            return []
        return list(self.top) if isinstance(self.top, list) else [self.top]


class FaithfulnessMetric(_CircuitMetric):
    """How much of the model's metric a circuit keeps: the logit difference on the clean
    items with every edge outside the circuit ablated (along that edge only, its upstream value
    replaced by the corrupt run's, or by its mean over the clean items and positions), as a
    fraction of the full model's (mean over items / mean over items, with a bootstrap
    interval). Beside it: the circuit's, the full model's and the empty circuit's mean
    metric, and the normalised faithfulness (circuit - empty) / (full - empty)."""

    kind: Literal["faithfulness"]
    fixed_axes: ClassVar[tuple[str, ...] | None] = ("edges",)
    circuit: CircuitEdges
    ablation: Literal["corrupt", "mean"] = Field(
        "corrupt", description="what an ablated edge carries: the corrupt run's value, or a mean"
    )
    level: float = Field(0.95, gt=0, lt=1, description="the bootstrap interval's coverage")
    n_boot: int = Field(1000, ge=100, le=100_000, description="bootstrap resamples")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the resampling")

    def value_axes(self) -> tuple[str, ...]:
        return ("edges",)

    def suffix_size(self, info: Any, sites: int) -> int:
        return max(1, len(self.circuit.sizes()))

    def value_counts(self, cells: int, sites: int) -> dict[str, tuple[int, bool]]:
        each = (cells * sites, False)
        names = ("", "ci_low", "ci_high", "circuit", "normalized")
        return {**{n: each for n in names}, "full": (cells, False), "ablated": (cells, False)}
