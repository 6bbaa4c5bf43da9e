"""Sites: where in a model an op acts (torch-free).

- :func:`resolve_site`: a canonical name (``resid_post.5``, ``head_z.2``, ``logits``) or a raw
  module path (``model.layers.5.mlp.input``, wildcards and ranges) into concrete :class:`Site` s;
- the per-family tables (:data:`FAMILIES`, data in ``sites.json``) and, for other models, a table
  inferred from the module tree (:func:`family_table`, :func:`detect_family`);
- :func:`describe_sites` and the README's family table (:mod:`.docs`);
- :func:`model_schema`: the spec's JSON schema completing one model's site names (:mod:`.schema`).
"""

from .docs import TABLE_MARKERS, describe_sites, sites_table_markdown, update_readme_table
from .resolve import (
    FAMILIES,
    SAE_PARTS,
    SaeSites,
    Site,
    SiteError,
    canonical_names,
    detect_family,
    family_table,
    head_columns,
    resolve_site,
    site_shape,
)
from .schema import SiteGroup, model_schema, site_groups, site_names
from .tables import CANONICAL, HeadLayout, SiteTemplate

__all__ = [
    "CANONICAL",
    "FAMILIES",
    "SAE_PARTS",
    "SaeSites",
    "HeadLayout",
    "SiteTemplate",
    "Site",
    "SiteError",
    "SiteGroup",
    "TABLE_MARKERS",
    "canonical_names",
    "describe_sites",
    "detect_family",
    "family_table",
    "head_columns",
    "model_schema",
    "resolve_site",
    "site_groups",
    "site_names",
    "site_shape",
    "sites_table_markdown",
    "update_readme_table",
]
