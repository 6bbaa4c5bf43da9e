"""Spec v1 ops: what an invoke does at a model site (save, zero, scale, add, set, patch, and the
ablation family: mean_ablate, resample_ablate, noise, project_out, clamp, skip), and the
vectors ``add``/``set`` take (inline, from a file beside the spec, or a saved value).

Placeholders ``{name}`` in op fields refer to sweep variables (``{layer}``, ``{pos}``, ...).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from .base import SITE_SYNTAX, Number, Placeholder, Positions, StrictModel
from .python import FN_FIELD

__all__ = [
    "PythonOp",
    "FileVector",
    "SavedVector",
    "MeanDiffVector",
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
    "MeanAblateOp",
    "ResampleAblateOp",
    "NoiseOp",
    "ProjectOutOp",
    "ClampOp",
    "SkipOp",
    "PathPatchOp",
    "DimSelector",
    "invoke_sources",
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


class MeanDiffVector(StrictModel):
    """A steering vector from contrastive data: the mean of one saved set (the positive
    prompts' values at a site) minus the mean of another (the negative prompts')."""

    mean_diff: Annotated[list[str], Field(min_length=2, max_length=2)] = Field(
        description="[positive, negative]: the names of two saved values, each from any number "
        "of prompts or dataset items",
        json_schema_extra={"examples": [["pos/resid_post.6", "neg/resid_post.6"]]},
    )
    reduce: Literal["mean", "none"] = Field(
        "mean",
        description="'mean': one vector, each set pooled over its rows and positions; 'none': "
        "a vector per saved position, each set averaged over its rows",
    )
    norm: Literal["none", "unit", "match_site"] = Field(
        "none",
        description="'unit': scaled to length 1; 'match_site': scaled to the mean length of the "
        "site's values at the positions the op writes, in the run it steers",
    )


VectorSource = Union[list[float], FileVector, SavedVector, MeanDiffVector]


# --- ops -----------------------------------------------------------------------------------


HeadIndex = Union[int, Placeholder]
HeadSelector = Union[Literal["all"], HeadIndex, Annotated[list[HeadIndex], Field(min_length=1)]]


StepSelector = Union[
    Literal["prompt", "all"],
    Annotated[str, Field(pattern=r"^\d*:\d*$", description="a range of steps 'start:stop'")],
    Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)],
]


DimIndex = Union[
    Annotated[int, Field(ge=0)],
    Annotated[str, Field(pattern=r"^\d*:\d*$", description="a range of dims 'start:stop'")],
    Placeholder,
]
DimSelector = Union[DimIndex, Annotated[list[DimIndex], Field(min_length=1)]]


#: short (error hints); the schema adds the whole grammar
_SITE = "where the op acts: a canonical site ('resid_post.5') or a module path"


class SiteOp(StrictModel):
    site: str = Field(
        min_length=1,
        description=_SITE,
        json_schema_extra={
            "description": f"{_SITE}; several at once with a layer range or *. {SITE_SYNTAX}",
            "examples": ["resid_post.5", "resid_post.{layer}", "mlp_out.0:4", "model.layers.5.mlp"],
        },
    )
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
    dims: DimSelector | None = Field(
        None,
        description="neurons or features of the site's last dimension the op reads and writes: "
        "an index, a range 'a:b', or a list; default all (not with 'heads')",
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


_FROM_CONFIG = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)
Seed = Union[Annotated[int, Field(ge=0, le=2**63 - 1)], Placeholder]


class MeanAblateOp(SiteOp):
    """Replace the site with its mean over another invoke's rows (a reference prompt set or a
    dataset): per position (``over: items``), or over every position too (``over: positions``)."""

    model_config = _FROM_CONFIG

    op: Literal["mean_ablate"]
    from_: str = Field(alias="from", description="the invoke whose rows the mean is taken over")
    over: Literal["items", "positions"] = Field(
        "items",
        description="items: a mean per position over the rows; positions: one mean over the "
        "rows and their positions",
    )


class ResampleAblateOp(SiteOp):
    """Replace the site with its value in another item of an invoke over the same dataset (or
    list of prompts): item i reads item pi(i), pi a seeded derangement (no item reads itself)."""

    model_config = _FROM_CONFIG

    op: Literal["resample_ablate"]
    from_: str = Field(alias="from", description="the invoke the values come from")
    seed: Seed = 0


class NoiseOp(SiteOp):
    """Add Gaussian noise: ``std`` absolute, or ``scale`` times the site's empirical standard
    deviation over another invoke's rows (``std_of``; causal tracing uses 3x that of the
    embeddings). Seeded per item: an item gets the same noise in every sweep cell and every
    invoke with the same seed."""

    op: Literal["noise"]
    std: Number | None = Field(None, description="the noise's standard deviation")
    scale: Number = Field(1.0, description="with std_of: a multiple of the empirical std")
    std_of: str | None = Field(
        None, description="an invoke whose values at the site give the empirical std"
    )
    seed: Seed = 0


class ProjectOutOp(SiteOp):
    """Remove the component along a direction, or a subspace spanned by several vectors (they
    need not be orthogonal): x - Q Q^T x with Q an orthonormal basis of their span."""

    op: Literal["project_out"]
    vectors: Union[Annotated[list[list[float]], Field(min_length=1)], FileVector] = Field(
        description="one vector per row (a list of lists), or a file of a [k, width] array"
    )


class ClampOp(SiteOp):
    """Set the chosen dims (``dims``) of the site to a value, e.g. a feature to a constant."""

    op: Literal["clamp"]
    value: Number


class SkipOp(SiteOp):
    """Skip a layer: its output (``site: resid_post.L``) is set to its input (resid_pre.L)."""

    op: Literal["skip"]


class PathPatchOp(SiteOp):
    """Path patching: the senders' outputs (``embed``, ``head.L.H``, ``mlp.L``) take their
    values from ``from``, and their change reaches only the receivers' inputs (``head.L.H.q``,
    ``head.L.G.k``, ``head.L.G.v``, ``mlp.L``, ``logits``), every other path frozen at the
    unpatched run's values (``base``: an invoke of the same prompts without ops; default the
    one found). Each receiver reads its input in ``base`` plus, for every sender that writes
    before it reads, the sender's output in ``from`` minus its output in ``base``; everything
    after the receivers is recomputed."""

    model_config = _FROM_CONFIG

    op: Literal["path_patch"]
    #: not written: path_patch names graph nodes, not a site (hidden from the schema)
    site: SkipJsonSchema[Literal["receivers"]] = "receivers"
    senders: Annotated[list[str], Field(min_length=1)] = Field(
        description="upstream nodes: 'embed', 'head.L.H', 'mlp.L' (templates such as "
        "'head.{layer}.{head}' take a sweep's values)"
    )
    receivers: Annotated[list[str], Field(min_length=1)] = Field(
        description="downstream nodes: 'head.L.H.q', 'head.L.G.k', 'head.L.G.v', 'mlp.L', 'logits'"
    )
    from_: str = Field(alias="from", description="the invoke the senders' values come from")
    base: str | None = Field(
        None,
        description="the unpatched run of this invoke's prompts (an invoke with the same prompt "
        "and no ops); default: the one the spec has",
    )

    @model_validator(mode="after")
    def _no_site_selectors(self) -> PathPatchOp:
        for name in ("heads", "dims", "steps"):
            if getattr(self, name) is not None:
                raise ValueError(f"path_patch takes no '{name}': it names its nodes")
        return self


class PythonOp(SiteOp):
    """Replace the site's values at the chosen positions (heads, dims) by a Python function of
    them ([n, width] in, the same shape out, for the rows of a forward at once): local runs
    only, ``specsight.run(spec, functions={name: fn})``."""

    op: Literal["python"]
    fn: str = FN_FIELD


Op = Annotated[
    PathPatchOp
    | PythonOp
    | SaveOp
    | ZeroOp
    | ScaleOp
    | AddOp
    | SetOp
    | PatchOp
    | MeanAblateOp
    | ResampleAblateOp
    | NoiseOp
    | ProjectOutOp
    | ClampOp
    | SkipOp,
    Field(discriminator="op"),
]
OP_CLASSES: dict[str, type[SiteOp]] = {
    "save": SaveOp,
    "zero": ZeroOp,
    "scale": ScaleOp,
    "add": AddOp,
    "set": SetOp,
    "patch": PatchOp,
    "mean_ablate": MeanAblateOp,
    "resample_ablate": ResampleAblateOp,
    "noise": NoiseOp,
    "project_out": ProjectOutOp,
    "clamp": ClampOp,
    "skip": SkipOp,
    "path_patch": PathPatchOp,
    "python": PythonOp,
}
OP_NAMES = tuple(OP_CLASSES)


def invoke_sources(op: SiteOp) -> list[tuple[str, str]]:
    """(field, invoke) for every other invoke an op reads: patch and ablation sources, the
    invoke whose spread scales noise."""
    if isinstance(op, PatchOp | MeanAblateOp | ResampleAblateOp):
        return [("from", op.from_)]
    if isinstance(op, PathPatchOp):
        return [("from", op.from_)] + ([("base", op.base)] if op.base else [])
    if isinstance(op, NoiseOp) and op.std_of is not None:
        return [("std_of", op.std_of)]
    return []
