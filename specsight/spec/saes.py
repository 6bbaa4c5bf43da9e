"""Spec v1: sparse autoencoders (``saes:``) whose features, reconstruction and error become
sites (``sae.NAME.features``, ``sae.NAME.recon``, ``sae.NAME.error``), and transcoders that
read one site and stand in for another's value.

An SAE is a folder in SAELens's format (``cfg.json`` + ``sae_weights.safetensors``), named by
``path`` (beside the spec; local runs only) or by ``id`` (an SAE registered with
``specsight run --sae ID=PATH`` or a server's ``--sae``, or a built-in one).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from .base import SITE_SYNTAX, StrictModel

__all__ = ["SAE_PARTS", "SaeEntry"]

#: the sites an SAE adds, by part: what each holds
SAE_PARTS = {
    "features": "the feature activations, [pos, d_sae]",
    "recon": "the reconstruction decode(features), [pos, d_in]",
    "error": "the input minus its reconstruction, [pos, d_in]",
}


class SaeEntry(StrictModel):
    """One sparse autoencoder (or transcoder) and the site it reads."""

    path: str | None = Field(
        None,
        min_length=1,
        description="a folder in SAELens's format beside the spec (cfg.json, "
        "sae_weights.safetensors); local runs only",
    )
    id: str | None = Field(
        None,
        min_length=1,
        description="a registered SAE: built in, or named by `--sae ID=PATH` on `specsight "
        "run` or on the server",
    )
    site: str = Field(
        min_length=1,
        description="the site the SAE reads. " + SITE_SYNTAX,
        json_schema_extra={"examples": ["resid_post.6", "mlp_out.6", "model.layers.6.mlp"]},
    )
    site_out: str | None = Field(
        None,
        min_length=1,
        description="transcoders: the site whose value the decoder stands in for (e.g. "
        "mlp_out.6 for a transcoder reading mlp_in.6)",
    )
    keep_error: bool = Field(
        True,
        description="transcoders: keep the true value's error term (out - decode), so an "
        "untouched transcoder changes nothing; false replaces the value by the decoder's",
    )

    @model_validator(mode="after")
    def _one_source(self) -> SaeEntry:
        if (self.path is None) == (self.id is None):
            raise ValueError(
                "an SAE is named by 'path' (a folder beside the spec) or by 'id' (a "
                "registered SAE) | give exactly one of them"
            )
        if self.site_out is None and not self.keep_error:
            raise ValueError("'keep_error' goes with 'site_out' (transcoders) | remove it")
        return self
