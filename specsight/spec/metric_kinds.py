"""Spec v1 metric building blocks: what every metric kind knows before compiling (the kind's
class-level facts), the reduction over an axis, and the ``site`` selector of metrics that read
sites."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from .base import SITE_SYNTAX, PositionSelector, StrictModel

__all__ = ["Reduce", "MetricKind", "Reducible", "MetricBase", "sites_field"]


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


def sites_field(verb: str, what: str, examples: list[str]) -> Any:
    """A metric's ``site`` selector, default every layer's residual stream."""
    return Field(
        "resid_post.*",
        description=f"sites to {verb}, e.g. 'resid_post.*'",
        json_schema_extra={
            "description": f"{what}; default every layer's 'resid_post.*'. " + SITE_SYNTAX,
            "examples": examples,
        },
    )


class MetricKind(StrictModel):
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


class Reducible(MetricKind):
    reduce: Reduce | None = Field(None, description="aggregate over items (or another axis)")


class MetricBase(Reducible):
    invoke: str = Field(description="the invoke whose output is measured")
    position: PositionSelector = Field(
        "last", description="the position whose next-token output is read"
    )
    baseline: str | None = Field(
        None,
        description="a metric of the same kind on an unmodified run: adds <name>/effect = "
        "value - baseline (per item over a dataset), which 'strongest cells' ranks by",
    )
