"""Spec v1 building blocks shared by the spec's modules: the strict base model, sweep
placeholders, position selectors and token references."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "SPEC_VERSION",
    "NAME_PATTERN",
    "PLACEHOLDER_PATTERN",
    "SITE_SYNTAX",
    "Placeholder",
    "Number",
    "StrictModel",
    "TokenSelector",
    "PositionSelector",
    "Positions",
    "TokenRef",
]

SPEC_VERSION = 1
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]*$"
PLACEHOLDER_PATTERN = r"^-?\{[A-Za-z_][A-Za-z0-9_]*\}$"

Placeholder = Annotated[
    str,
    Field(
        pattern=PLACEHOLDER_PATTERN, description="a sweep variable, e.g. '{factor}' or '-{factor}'"
    ),
]
Number = Union[float, Placeholder]

#: How a site is written, for the schema's descriptions of ``site`` fields (the grammar
#: :func:`specsight.sites.resolve_site` accepts; ``{var}`` placeholders are filled first).
SITE_SYNTAX = (
    "A canonical site: NAME.LAYER ('resid_post.5', 'head_z.2'; a negative layer counts from "
    "the end: 'resid_post.-1'), a layer range NAME.START:STOP[:STEP] ('mlp_out.0:4' is layers "
    "0-3, 'resid_post.::2' every other layer), every layer NAME.* ('resid_post.*'), or a sweep "
    "variable NAME.{layer}; model-wide sites take no layer ('embed', 'final_norm', 'logits'). "
    "NAME is one of embed, resid_pre, resid_mid, resid_post, attn_out, mlp_out, mlp_act, q, k, "
    "v, head_z, attn_pattern, final_norm, logits, where the model's family has it. "
    "Or a module path: a module's output ('model.layers.5.mlp'), or its input with '.input' "
    "('model.layers.5.mlp.down_proj.input'; '.output' is the default); a path component may be "
    "* (every index), START:STOP ('model.layers.0:4.mlp') or a sweep variable "
    "('model.layers.{layer}.mlp'). `specsight sites MODEL` lists a model's sites and modules; "
    "`specsight schema --model MODEL` writes a schema that completes them. An SAE declared "
    "under 'saes:' adds sae.NAME.features (its feature activations; 'dims' picks features), "
    "sae.NAME.recon and sae.NAME.error."
)


class StrictModel(BaseModel):
    """The base of every spec model: frozen, unknown keys and non-finite numbers refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- selectors -----------------------------------------------------------------------------


class TokenSelector(StrictModel):
    """The positions of a piece of text in the prompt: ``{token: " John", occurrence: 2}``.
    Text that encodes to several tokens selects all of them unless ``part`` says ``first`` or
    ``last`` (causal tracing reads the last token of the subject)."""

    token: str = Field(
        min_length=1,
        description="text as the tokenizer spells it, e.g. ' John'; may be several tokens",
    )
    occurrence: int = Field(
        1,
        description="1 = first occurrence, 2 = second, -1 = last",
        json_schema_extra={"not": {"const": 0}},
    )
    part: Literal["all", "first", "last"] = Field(
        "all",
        description="of a text that is several tokens: all of them (default), the first or "
        "the last",
    )

    @field_validator("occurrence")
    @classmethod
    def _nonzero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("occurrence counts from 1 (first) or from -1 (last); 0 is not allowed")
        return value


PositionSelector = Union[
    int,
    Annotated[
        str,
        Field(
            description="'all', 'last', 'first', an index such as '-2', a slice 'a:b', or a placeholder '{pos}'"
        ),
    ],
    TokenSelector,
]
Positions = Union[PositionSelector, list[PositionSelector]]


TokenRef = Union[Annotated[str, Field(min_length=1)], Annotated[int, Field(ge=0)]]
