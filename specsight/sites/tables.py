"""The canonical site tables, loaded from ``sites.json`` beside this module (torch-free).

Each family maps canonical names to a :class:`SiteTemplate`: a module path template (``{L}`` is
the layer), whether the site is the module's ``input``, ``output`` or attention ``pattern``,
the width of its last dimension, and for head sites how that dimension splits into heads.
``extends`` in the data copies another family's sites and unsupported notes (not its docs,
which name that family's specifics) before applying overrides.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any, NamedTuple

__all__ = [
    "CANONICAL",
    "SiteTemplate",
    "HeadLayout",
    "load_families",
    "common_docs",
    "head_layout",
]

#: every canonical site name, in the order tables and docs list them
CANONICAL: tuple[str, ...] = (
    "embed",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "mlp_act",
    "q",
    "k",
    "v",
    "head_z",
    "attn_pattern",
    "final_norm",
    "logits",
)
_IOS = ("input", "output", "pattern")
_WIDTHS = ("d_model", "d_mlp", "vocab")
_LAYOUTS = ("separate", "fused", "interleaved")
_PARTS = ("q", "k", "v")


class SiteTemplate(NamedTuple):
    """One canonical site of a family. ``[0]`` is the module template and ``[1]`` the io, as
    in the plain ``(module, io)`` pairs older code reads."""

    module: str
    io: str
    width: str = "d_model"
    #: "q" (n_heads heads) or "kv" (n_kv_heads heads) for head sites, else None
    heads: str | None = None
    layout: str = "separate"
    part: str | None = None
    doc: str = ""


class HeadLayout(NamedTuple):
    """Where head ``h``'s column ``j`` sits in the module's last dimension:
    ``base + h * stride + j`` for ``j < d_head``; ``module_width`` is that dimension's size."""

    n_heads: int
    d_head: int
    base: int
    stride: int
    module_width: int


def _template(family: str, name: str, data: dict[str, Any], doc: str) -> SiteTemplate:
    where = f"sites.json: {family}.{name}"
    if name not in CANONICAL:
        raise ValueError(f"{where}: unknown canonical site")
    tpl = SiteTemplate(
        module=data["module"],
        io=data["io"],
        width=data.get("width", "d_model"),
        heads=data.get("heads"),
        layout=data.get("layout", "separate"),
        part=data.get("part"),
        doc=doc,
    )
    if tpl.io not in _IOS or tpl.width not in _WIDTHS or tpl.layout not in _LAYOUTS:
        raise ValueError(f"{where}: bad io, width or layout")
    if tpl.heads not in (None, "q", "kv") or (tpl.layout != "separate" and tpl.part not in _PARTS):
        raise ValueError(f"{where}: bad heads or part")
    return tpl


@functools.lru_cache(maxsize=1)
def _raw() -> dict[str, Any]:
    text = resources.files("specsight.sites").joinpath("sites.json").read_text(encoding="utf-8")
    return json.loads(text)


def common_docs() -> dict[str, str]:
    """What each canonical site means in general."""
    return dict(_raw()["common_docs"])


def load_families() -> dict[str, dict[str, Any]]:
    """Family name -> {label, tiny (tiny model ids), architectures, layers, attention, sites,
    unsupported, docs}."""
    raw = _raw()["families"]
    general = common_docs()
    out: dict[str, dict[str, Any]] = {}

    def build(name: str) -> dict[str, Any]:
        if name in out:
            return out[name]
        data = raw[name]
        base = build(data["extends"]) if "extends" in data else None
        sites_data: dict[str, dict[str, Any]] = {}
        docs: dict[str, str] = {}
        unsupported: dict[str, str] = {}
        if base is not None:
            sites_data = {k: v._asdict() for k, v in base["sites"].items()}
            unsupported = dict(base["unsupported"])
        for key in data.get("drop", ()):
            sites_data.pop(key, None)
        sites_data.update(data.get("sites", {}))
        docs.update(data.get("docs", {}))
        unsupported.update(data.get("unsupported", {}))
        sites = {}
        for key, entry in sites_data.items():
            entry = {k: v for k, v in entry.items() if k != "doc"}
            sites[key] = _template(name, key, entry, docs.get(key) or general.get(key, ""))
        family = {
            "label": data.get("label", name),
            "tiny": list(data.get("tiny", ())),
            "architectures": list(data["architectures"]),
            "layers": data.get("layers", base["layers"] if base else None),
            "attention": data.get("attention", base["attention"] if base else None),
            "sites": sites,
            "unsupported": {k: v for k, v in unsupported.items() if k not in sites},
            "docs": docs,
        }
        out[name] = family
        return family

    for name in raw:
        build(name)
    return {name: out[name] for name in raw}


def head_layout(tpl: SiteTemplate, n_heads: int, n_kv_heads: int, d_head: int) -> HeadLayout:
    """The column layout of a head site's module tensor."""
    count = n_heads if tpl.heads == "q" else n_kv_heads
    if tpl.layout == "separate":
        return HeadLayout(count, d_head, 0, d_head, count * d_head)
    index = _PARTS.index(tpl.part or "q")
    if tpl.layout == "fused":  # [q (n_heads) | k (n_kv) | v (n_kv)]
        base = (0, n_heads * d_head, (n_heads + n_kv_heads) * d_head)[index]
        return HeadLayout(count, d_head, base, d_head, (n_heads + 2 * n_kv_heads) * d_head)
    # interleaved: per head [q k v], every head has its own key and value
    return HeadLayout(count, d_head, index * d_head, 3 * d_head, 3 * n_heads * d_head)
