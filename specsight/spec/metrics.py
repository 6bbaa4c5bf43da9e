"""Spec v1 metrics: what is measured on the output (claims about them: :mod:`.claims`)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from .base import SITE_SYNTAX, PositionSelector, StrictModel, TokenRef

__all__ = [
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
    "DlaMetric",
    "DLA_PARTS",
    "ProbeMetric",
    "ProbeSplit",
    "Metric",
    "METRIC_CLASSES",
    "METRIC_KINDS",
]

# --- metrics -------------------------------------------------------------------------------


class Reduce(StrictModel):
    """An aggregate of a metric over one of its axes (a dataset's items, by default): the
    statistic replaces the metric; its standard error, the per-item values and (on request) a
    seeded bootstrap interval are stored beside it (``<name>/stderr``, ``<name>/items``,
    ``<name>/ci_low``, ``<name>/ci_high``). ``reduce: mean`` is short for ``{stat: mean}``."""

    over: str = Field("item", description="the axis reduced: item, prompt, or a sweep variable")
    stat: Literal["mean", "median", "sum"] = "mean"
    ci: Literal["bootstrap"] | None = Field(
        None, description="add a percentile bootstrap interval (resampling the axis)"
    )
    level: float = Field(0.95, gt=0, lt=1, description="the interval's coverage")
    n_boot: int = Field(1000, ge=100, le=100_000, description="bootstrap resamples")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the resampling")

    @model_validator(mode="before")
    @classmethod
    def _short(cls, value: Any) -> Any:
        return {"stat": value} if isinstance(value, str) else value


def _sites_field(verb: str, what: str, examples: list[str]) -> Any:
    """A metric's ``site`` selector, default every layer's residual stream."""
    return Field(
        "resid_post.*",
        description=f"sites to {verb}, e.g. 'resid_post.*'",
        json_schema_extra={
            "description": f"{what}; default every layer's 'resid_post.*'. " + SITE_SYNTAX,
            "examples": examples,
        },
    )


class _MetricKind(StrictModel):
    # What the checks that need no model know of a metric kind (its compiled form and run-time
    # behaviour live in ``specsight.plan.metrics``).

    #: its values can be reduced over an axis
    reducible: ClassVar[bool] = True
    #: it may name a ``baseline`` metric of its kind
    takes_baseline: ClassVar[bool] = True
    #: one value per cell, differentiable: a recovery's input, a backward pass's start
    scalar: ClassVar[bool] = False
    #: reduced over its inputs unless ``reduce`` says otherwise
    reduced_by_default: ClassVar[bool] = False
    #: its result's axes whatever the invokes are (None: the measured invoke's)
    fixed_axes: ClassVar[tuple[str, ...] | None] = None
    #: it runs a backward pass of its own
    needs_backward: ClassVar[bool] = False
    #: companions with one value per cell, reduced when the metric is (dla's total)
    reduced_companions: ClassVar[tuple[str, ...]] = ()
    #: it reads every item of the dataset at once (a probe trains on all of them)
    whole_dataset: ClassVar[bool] = False

    @property
    def shaped_like(self) -> str | None:
        """The metric whose invoke gives this one its axes (None: its own invoke's)."""
        return None

    def value_axes(self) -> tuple[str, ...]:
        """The axes each cell's value adds to the result."""
        return ()

    def suffix_size(self, info: Any, sites: int) -> int:
        """The length of the axis each cell's value adds (``sites``: the sites it names, for
        kinds with a ``site`` axis; ``info``: the model's shapes)."""
        return sites

    def value_counts(self, cells: int, sites: int) -> dict[str, tuple[int, bool]]:
        """Element counts of its result tensors ("" itself, else a companion), each with
        whether it holds token ids (int64), for ``cells`` cells and ``sites`` decoded sites."""
        return {"": (cells, False)}


class _Reducible(_MetricKind):
    reduce: Reduce | None = Field(None, description="aggregate over items (or another axis)")


class _MetricBase(_Reducible):
    invoke: str = Field(description="the invoke whose output is measured")
    position: PositionSelector = Field(
        "last", description="the position whose next-token output is read"
    )
    baseline: str | None = Field(
        None,
        description="a metric of the same kind on an unmodified run: adds <name>/effect = "
        "value - baseline (per item over a dataset), which 'strongest cells' ranks by",
    )


class _TokenMetric(_MetricBase):
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


class LogitDiffMetric(_MetricBase):
    kind: Literal["logit_diff"]
    scalar: ClassVar[bool] = True
    target: TokenRef
    foil: TokenRef


class TopKMetric(_MetricBase):
    kind: Literal["top_k"]
    reducible: ClassVar[bool] = False
    takes_baseline: ClassVar[bool] = False
    k: int = Field(10, ge=1, le=1000)

    def value_counts(self, cells: int, sites: int) -> dict[str, tuple[int, bool]]:
        return {"": (cells * self.k, False), "ids": (cells * self.k, True)}


class LogitLensMetric(_MetricBase):
    """Decode intermediate residual streams through the final norm and unembedding."""

    kind: Literal["logit_lens"]
    takes_baseline: ClassVar[bool] = False
    site: str = _sites_field(
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


class KlMetric(_MetricBase):
    """KL(reference || invoke) of the next-token distributions at ``position``: how far an
    intervention moves the whole distribution, not one logit. The reference is an unmodified
    invoke giving one prompt or one per item; it runs in an earlier stage."""

    kind: Literal["kl"]
    reference: str = Field(description="the invoke whose next-token distribution is the reference")


class LossMetric(_Reducible):
    """The mean next-token cross-entropy over each prompt's tokens (nats): the side-effect
    check of a steering vector or an ablation on ordinary text."""

    kind: Literal["loss"]
    invoke: str = Field(description="the invoke whose prompts are scored")
    baseline: str | None = Field(None, description="a loss metric on an unmodified run")


class AccuracyMetric(_MetricBase):
    """1 where the top next token at ``position`` is ``target``, else 0; averaged over the
    items (or prompts) unless ``reduce`` says otherwise."""

    kind: Literal["accuracy"]
    reduced_by_default: ClassVar[bool] = True
    target: TokenRef


class RecoveryMetric(_Reducible):
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


class AttributionMetric(_MetricKind):
    """Attribution patching: per site and position, gradient x (clean - corrupt) of the
    corrupted run's logit difference; one clean forward, one corrupted forward + backward."""

    kind: Literal["attribution"]
    fixed_axes: ClassVar[tuple[str, ...] | None] = ("site", "pos")
    needs_backward: ClassVar[bool] = True
    clean: str = Field(description="the clean invoke (one prompt, no sweep)")
    corrupt: str = Field(description="the corrupted invoke, as many tokens as the clean one")
    site: str = _sites_field(
        "attribute",
        "the sites to attribute (whole-width, not per-head)",
        ["resid_post.*", "attn_out.*", "mlp_out.0:6"],
    )
    target: TokenRef
    foil: TokenRef
    position: PositionSelector = Field(
        "last", description="the position whose logit difference is differentiated"
    )


DLA_PARTS = ("embed", "heads", "attn", "mlps")


class DlaMetric(_MetricBase):
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


class ProbeMetric(_MetricKind):
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
    site: str = _sites_field(
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


Metric = Annotated[
    ProbeMetric
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
}
METRIC_KINDS = tuple(METRIC_CLASSES)
