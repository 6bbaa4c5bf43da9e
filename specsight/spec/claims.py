"""Spec v1 claims: expectations about a metric or saved value, checked after the run, and the
backward pass a spec may ask for."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from .base import StrictModel, TokenRef

__all__ = ["Expectation", "Backward"]

# --- expectations --------------------------------------------------------------------------

CellValue = Union[int, float, Annotated[str, Field(min_length=1)]]
CellSelector = Union[CellValue, Annotated[list[CellValue], Field(min_length=1)]]
Expected = Union[float, list[Any]]

_CHECKS = ("equals", "approx", "greater_than", "less_than", "argmax", "top_k")


class Expectation(StrictModel):
    """A claim about a metric or saved value; ``specsight check`` fails when it does not hold.

    ``where`` picks cells of a swept result (``{layer: "0:19", pos: 9}``: an axis value, a list
    or a range); ``over`` says whether ``all`` picked cells (default) or ``any`` must pass.
    """

    metric: str | None = Field(
        None, description="a metric name, or one of its results: dla/residual, probe/auroc"
    )
    saved: str | None = Field(None, description="a saved value's name")
    where: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_+]*$")], CellSelector] = Field(
        default_factory=dict, description="axis -> value, list of values or 'start:stop' range"
    )
    over: Literal["all", "any"] = "all"
    equals: Expected | None = Field(None, description="exactly this value (or nested list)")
    approx: Expected | None = Field(None, description="this value within rtol/atol")
    rtol: float = Field(1e-5, ge=0)
    atol: float = Field(1e-6, ge=0)
    greater_than: float | None = None
    less_than: float | None = None
    argmax: TokenRef | None = Field(
        None, description="the top token (top_k, logit_lens, or among a metric's tokens)"
    )
    top_k: TokenRef | None = Field(
        None, description="a token that must be among a top_k metric's tokens"
    )
    message: str | None = Field(None, description="what the claim means, shown when it fails")

    @model_validator(mode="after")
    def _one_target_some_check(self) -> Expectation:
        if (self.metric is None) == (self.saved is None):
            raise ValueError("give exactly one of 'metric' or 'saved'")
        if all(getattr(self, check) is None for check in _CHECKS):
            raise ValueError("give a check: " + ", ".join(_CHECKS))
        return self


class Backward(StrictModel):
    """A backward pass from a metric (summed over its rows), for ``save`` ops with ``grad``."""

    metric: str = Field(description="a metric of kind logits, logprob, prob or logit_diff")
