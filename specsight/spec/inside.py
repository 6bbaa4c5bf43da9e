"""Spec v1 metrics that read the model's insides rather than its output alone: direct logit
attribution (``dla``), linear probes (``probe``) and an SAE's strongest features
(``top_features``)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from .base import PositionSelector, StrictModel, TokenRef
from .metric_kinds import MetricBase, MetricKind, sites_field

__all__ = ["DLA_PARTS", "DlaMetric", "ProbeMetric", "ProbeSplit", "TopFeaturesMetric"]


DLA_PARTS = ("embed", "heads", "attn", "mlps")


class DlaMetric(MetricBase):
    """Direct logit attribution: each component's direct contribution to the logit difference
    (target - foil; or to the target's logit without a foil) at ``position``, through the
    final norm with its scale frozen at the run's value and the unembedding. Components: the
    embedding (what enters the first layer), each attention head (or each attention layer)
    and each MLP; the rest (biases of the attention output, the final norm and the
    unembedding) is one ``bias`` component. ``<name>/total`` is the model's own logit
    difference and ``<name>/residual`` what the components leave of it (rounding only)."""

    kind: Literal["dla"]
    takes_baseline: ClassVar[bool] = False
    reduced_companions: ClassVar[tuple[str, ...]] = ("total", "residual")
    target: TokenRef
    foil: TokenRef | None = Field(None, description="omit to attribute the target's logit")
    by: list[Literal["embed", "heads", "attn", "mlps"]] = Field(
        ["embed", "heads", "mlps"],
        min_length=1,
        description="the components reported: embed, heads ([layer, head]) or attn (per "
        "layer), mlps (per layer); bias is always reported",
    )

    @field_validator("by")
    @classmethod
    def _heads_or_attn(cls, by: list[str]) -> list[str]:
        if "heads" in by and "attn" in by:
            raise ValueError(
                "lists both heads and attn, but a layer's attn is its heads' sum (plus the "
                "output bias): keep one"
            )
        if len(set(by)) != len(by):
            raise ValueError("lists a part twice: name each once")
        return by

    def value_axes(self) -> tuple[str, ...]:
        return ("component",)

    def suffix_size(self, info: Any, sites: int) -> int:
        """The components: the parts ``by`` names, then the bias."""
        per_part = {
            "embed": 1,
            "heads": info.n_layers * info.n_heads,
            "attn": info.n_layers,
            "mlps": info.n_layers,
        }
        return sum(per_part[part] for part in self.by) + 1

    def value_counts(self, cells: int, sites: int) -> dict[str, tuple[int, bool]]:
        # ``sites``: the number of components (suffix_size)
        return {"": (cells * sites, False), "total": (cells, False), "residual": (cells, False)}


class ProbeSplit(StrictModel):
    """How a probe's items split into training and held-out items (a seeded permutation)."""

    test: float = Field(0.25, gt=0, lt=1, description="the share of items held out")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the permutation")
    by: str | None = Field(
        None,
        description="a column ('{pair}'): items with the same value stay on the same side, so "
        "no held-out item has a near twin among the training items",
        pattern=r"^\{[A-Za-z_][A-Za-z0-9_]*\}$",
    )


class ProbeMetric(MetricKind):
    """Linear probes: one logistic regression per site, trained on the dataset's items (the
    site's value at ``position``) to predict ``label``, a column; full-batch L-BFGS in float64
    on features standardised with the training items' mean and deviation, mean cross-entropy
    + l2 / 2 * |W|^2 (binary: one weight vector, as scikit-learn). The result is the held-out
    accuracy per site; beside it ``<name>/auroc`` (two classes), ``<name>/train_accuracy``,
    and the weights and bias for the raw activations (``<name>/weight``, ``<name>/bias``)."""

    kind: Literal["probe"]
    reducible: ClassVar[bool] = False
    takes_baseline: ClassVar[bool] = False
    fixed_axes: ClassVar[tuple[str, ...] | None] = ("site",)
    whole_dataset: ClassVar[bool] = True
    invoke: str = Field(description="the invoke over the dataset whose items are probed")
    site: str = sites_field(
        "probe",
        "the sites to probe, one probe each (whole-width sites: resid_*, attn_out, mlp_out, "
        "mlp_act, ...)",
        ["resid_post.*", "mlp_out.0:6"],
    )
    position: PositionSelector = Field("last", description="the position whose value is read")
    label: str = Field(
        description="the dataset column holding each item's class, as a template: '{column}'",
        pattern=r"^\{[A-Za-z_][A-Za-z0-9_]*\}$",
    )
    split: ProbeSplit = Field(default_factory=ProbeSplit)
    l2: float = Field(1e-3, ge=0, description="L2 penalty on the standardised weights")
    max_iter: int = Field(500, ge=1, le=100_000, description="L-BFGS iterations at most")

    def value_axes(self) -> tuple[str, ...]:
        return ("site",)


class TopFeaturesMetric(MetricKind):
    """An SAE's k strongest features at one position of each row of an invoke (per item over
    a dataset): their activations, and the feature indices in ``<name>/ids``."""

    kind: Literal["top_features"]
    reducible: ClassVar[bool] = False
    takes_baseline: ClassVar[bool] = False
    invoke: str = Field(description="the invoke whose rows are read")
    sae: str = Field(description="the SAE (a name under saes:) whose features are ranked")
    k: int = Field(10, ge=1, le=10_000, description="features kept per row")
    position: PositionSelector = Field("last", description="the position whose features are read")

    def value_axes(self) -> tuple[str, ...]:
        return ("rank",)

    def suffix_size(self, info: Any, sites: int) -> int:
        return self.k

    def value_counts(self, cells: int, sites: int) -> dict[str, tuple[int, bool]]:
        return {"": (cells * self.k, False), "ids": (cells * self.k, True)}
