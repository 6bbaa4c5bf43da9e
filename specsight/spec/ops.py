"""Spec v1 ops: what an invoke does at a model site (save, zero, scale, add, set, patch), and
the vectors ``add``/``set`` take (inline, from a file beside the spec, or a saved value).

Placeholders ``{name}`` in op fields refer to sweep variables (``{layer}``, ``{pos}``, ...).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import ConfigDict, Field

from .base import Number, Placeholder, Positions, StrictModel

__all__ = [
    "FileVector",
    "SavedVector",
    "VectorSource",
    "HeadSelector",
    "StepSelector",
    "SiteOp",
    "SaveOp",
    "ZeroOp",
    "ScaleOp",
    "AddOp",
    "SetOp",
    "PatchOp",
    "Op",
    "OP_CLASSES",
    "OP_NAMES",
]


# --- vectors -------------------------------------------------------------------------------


class FileVector(StrictModel):
    """A vector stored in a .safetensors or .npy file beside the spec."""

    file: str = Field(min_length=1)
    key: str | None = Field(None, description="tensor name inside a .safetensors file")


class SavedVector(StrictModel):
    """A value saved by another invoke (``save`` op), by its name."""

    saved: str = Field(min_length=1)
    reduce: Literal["none", "mean"] = Field(
        "none", description="'mean' averages the saved value over its positions"
    )


VectorSource = Union[list[float], FileVector, SavedVector]


# --- ops -----------------------------------------------------------------------------------


HeadIndex = Union[int, Placeholder]
HeadSelector = Union[Literal["all"], HeadIndex, Annotated[list[HeadIndex], Field(min_length=1)]]


StepSelector = Union[
    Literal["prompt", "all"],
    Annotated[str, Field(pattern=r"^\d*:\d*$", description="a range of steps 'start:stop'")],
    Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)],
]


class SiteOp(StrictModel):
    site: str = Field(min_length=1, description="canonical site ('resid_post.5') or module path")
    positions: Positions = Field("all", description="token positions the op acts on")
    steps: StepSelector | None = Field(
        None,
        description="generating invokes only: the forward steps the op applies to; step 0 is "
        "the prompt pass ('prompt'), step s >= 1 feeds new token s-1; 'all' (default), a list "
        "or a range 'a:b'. In steps >= 1 the only position is the new token: positions "
        "'all', 'last' and -1 select it, other positions exist only in the prompt pass",
    )
    heads: HeadSelector | None = Field(
        None,
        description="attention heads of a per-head site (head_z, q, k, v, attn_pattern): "
        "'all', an index, a list, or '{head}'; default all heads",
    )


class SaveOp(SiteOp):
    """Keep the value of a site in the results."""

    op: Literal["save"]
    name: str | None = Field(
        None, description="result name; default '<invoke>/<site>' ('<invoke>/<site>/grad')"
    )
    grad: bool = Field(
        False,
        description="keep the gradient of the spec's 'backward' metric with respect to the "
        "site instead of its value",
    )


class ZeroOp(SiteOp):
    """Set the site to zero at the chosen positions."""

    op: Literal["zero"]


class ScaleOp(SiteOp):
    """Multiply the site by a factor."""

    op: Literal["scale"]
    factor: Number


class AddOp(SiteOp):
    """Add a vector (inline, from a file, or a saved value) times a coefficient."""

    op: Literal["add"]
    vector: VectorSource
    coeff: Number = 1.0


class SetOp(SiteOp):
    """Replace the site with a value (inline, from a file, or a saved value)."""

    op: Literal["set"]
    value: VectorSource


class PatchOp(SiteOp):
    """Replace the site with the same site's value in another invoke."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True
    )

    op: Literal["patch"]
    from_: str = Field(alias="from", description="the invoke to copy from")
    source_positions: Positions | None = Field(
        None, description="positions in the source prompt; default: the same selectors"
    )


Op = Annotated[SaveOp | ZeroOp | ScaleOp | AddOp | SetOp | PatchOp, Field(discriminator="op")]
OP_CLASSES: dict[str, type[SiteOp]] = {
    "save": SaveOp,
    "zero": ZeroOp,
    "scale": ScaleOp,
    "add": AddOp,
    "set": SetOp,
    "patch": PatchOp,
}
OP_NAMES = tuple(OP_CLASSES)
