"""Resolving sites: where in a model an op acts.

A site is a module's input or output. Users name it either canonically (``resid_post.5``,
``attn_out.3``, ``head_z.2``, ``embed``, ``logits``), through the per-family tables, or by a raw
module path (``model.layers.5.mlp``, ``model.layers.5.mlp.input``). Layer ranges
(``resid_post.0:12``) and wildcards (``resid_post.*``, ``model.layers.*.mlp``) expand to
several concrete sites.

The tables are data (``sites.json``, loaded by :mod:`.tables`): a family maps
each canonical name to a module path template, whether the site is that module's ``input`` or
``output`` (or, for ``attn_pattern``, the attention weights it returns), and for per-head sites
which columns of the module's tensor hold each head. A site always means the hidden-state
tensor, whatever the module returns (a tensor, a tuple, a ModelOutput). Models of no known
family get a table inferred from their module tree (:mod:`.infer`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..errors import did_you_mean
from ..models import ModelInfo
from .infer import infer_family
from .tables import CANONICAL, HeadLayout, head_layout, load_families

__all__ = [
    "FAMILIES",
    "SAE_PARTS",
    "SaeSites",
    "Site",
    "SiteError",
    "canonical_names",
    "detect_family",
    "family_table",
    "head_columns",
    "resolve_site",
    "site_shape",
]

#: family -> {label, architectures, layers (the layer stack), attention, sites, unsupported,
#: docs}, loaded from ``data/sites.json``. ``sites`` maps canonical names to
#: :class:`~specsight.sites.tables.SiteTemplate` (``[0]`` the module template, ``[1]`` the io);
#: ``{L}`` stands for the layer index; sites without ``{L}`` are model-wide.
FAMILIES: dict[str, dict] = load_families()

_IO = ("input", "output")


class SiteError(ValueError):
    """A site string that cannot be resolved; carries a hint for the user."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True, order=True)
class Site:
    """A concrete site: one module's input or output."""

    module: str
    io: str
    #: the name a user sees (canonical when the site came from one, else the raw path)
    name: str
    #: layer index when the site sits inside a layer, else None
    layer: int | None = None
    #: width of the site's last dimension when known before running (canonical sites)
    width: int | None = None
    #: head sites: how the module tensor's last dimension splits into heads
    heads: HeadLayout | None = None
    #: the canonical name without its layer ('resid_post'); None for raw paths
    canonical: str | None = None
    #: SAE sites: the SAE's name and the part of it (features, recon, error); ``module`` and
    #: ``io`` are the site the SAE reads
    sae: str | None = None
    part: str | None = None


#: the sites an SAE adds (``sae.NAME.PART``)
SAE_PARTS = ("features", "recon", "error")


@dataclass(frozen=True)
class SaeSites:
    """What resolving an SAE's sites needs of it: the site it reads, its feature count, and
    for a transcoder the site it stands in for (where all its parts are hooked)."""

    base: Site
    d_sae: int
    out: Site | None = None


def detect_family(architecture: str, module_names: tuple[str, ...] | list[str] = ()) -> str | None:
    """The site-table family of a model, from its class name, else from its module tree: the
    family all of whose layer-0 modules exist, the most specific one when several fit."""
    for family, table in FAMILIES.items():
        if architecture in table["architectures"]:
            return family
    names = set(module_names)
    best: tuple[int, str] | None = None
    for family, table in FAMILIES.items():
        needed = {tpl[0].replace("{L}", "0") for tpl in table["sites"].values()}
        if needed <= names and (best is None or len(needed) > best[0]):
            best = (len(needed), family)
    return best[1] if best else None


def family_table(info: ModelInfo) -> dict | None:
    """The site table of a model: its family's, else one inferred from its module tree."""
    if info.family is not None:
        return FAMILIES[info.family]
    if not info.modules or info.inputs == "tensor":  # factory models: raw module paths only
        return None
    return infer_family(info.architecture, info.modules, info.n_layers)


def canonical_names(info: ModelInfo) -> list[str]:
    """Canonical site names usable on this model (layer sites shown as ``name.L``)."""
    table = family_table(info)
    if table is None:
        return []
    return [f"{name}.L" if "{L}" in tpl[0] else name for name, tpl in table["sites"].items()]


def _layer_of(module: str, info: ModelInfo) -> int | None:
    table = family_table(info)
    if table is None:
        return None
    prefix = table["layers"] + "."
    if module.startswith(prefix):
        head = module[len(prefix) :].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return None


def _sizes(info: ModelInfo) -> dict[str, int]:
    return {
        "d_model": info.d_model,
        "d_mlp": info.d_mlp or 4 * info.d_model,
        "vocab": info.vocab_size,
    }


def _make_site(name: str, tpl: tuple, info: ModelInfo, layer: int | None) -> Site:
    module = tpl[0] if layer is None else tpl[0].replace("{L}", str(layer))
    label = name if layer is None else f"{name}.{layer}"
    heads = None
    width: int | None = None
    if getattr(tpl, "heads", None):
        heads = head_layout(tpl, info.n_heads, info.n_kv_heads, info.d_head)
        width = None if tpl[1] == "pattern" else heads.n_heads * heads.d_head
    else:
        width = _sizes(info)[getattr(tpl, "width", "d_model")]
    return Site(module, tpl[1], label, layer, width, heads, name)


def head_columns(site: Site, heads: list[int] | None) -> tuple[tuple[int, int], ...] | None:
    """Column ranges of the chosen heads (all when None) in the site module's last dimension,
    merged where adjacent; None when that is the whole dimension. For ``attn_pattern`` sites
    the ranges index the head axis itself."""
    layout = site.heads
    if layout is None:
        return None
    chosen = list(range(layout.n_heads)) if heads is None else heads
    if site.io == "pattern":
        spans = [(h, h + 1) for h in chosen]
        full = layout.n_heads
    else:
        spans = [
            (layout.base + h * layout.stride, layout.base + h * layout.stride + layout.d_head)
            for h in chosen
        ]
        full = layout.module_width
    merged: list[tuple[int, int]] = []
    for start, stop in spans:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    if merged == [(0, full)]:
        return None
    return tuple(merged)


def site_shape(site: Site) -> str:
    """The per-row shape of a site, for listings: ``[pos, 64]``, ``[pos, 4 heads, 16]``."""
    if site.io == "pattern" and site.heads is not None:
        return f"[pos, {site.heads.n_heads} heads, pos]"
    if site.heads is not None:
        return f"[pos, {site.heads.n_heads} heads, {site.heads.d_head}]"
    return f"[pos, {site.width if site.width is not None else '?'}]"


def _parse_layers(text: str, n_layers: int, site: str) -> list[int]:
    """``5`` / ``-1`` / ``*`` / ``0:12`` / ``::2`` into layer indices, range-checked."""
    if text == "*":
        return list(range(n_layers))
    if re.fullmatch(r"-?\d+", text):
        layer = int(text)
        if not -n_layers <= layer < n_layers:
            raise SiteError(
                f"layer {layer} is out of range in '{site}': the model has {n_layers} layers",
                f"use 0..{n_layers - 1}, or a negative index from the end",
            )
        return [layer % n_layers]
    match = re.fullmatch(r"(-?\d*):(-?\d*)(?::(-?\d+))?", text)
    if match:
        start, stop, step = (int(g) if g else None for g in match.groups())
        if step == 0:
            raise SiteError(f"layer range step cannot be 0 in '{site}'")
        layers = list(range(n_layers))[slice(start, stop, step)]
        if not layers:
            raise SiteError(
                f"layer range '{text}' in '{site}' selects no layer of {n_layers}",
                f"use a range inside 0:{n_layers}",
            )
        return layers
    raise SiteError(
        f"'{text}' is not a layer in '{site}'",
        "a layer is an integer, a range such as 0:12, or *",
    )


def _resolve_canonical(
    table: dict, name: str, layer_text: str | None, info: ModelInfo, site: str
) -> list[Site]:
    tpl = table["sites"][name]
    if "{L}" not in tpl[0]:
        if layer_text is not None:
            raise SiteError(f"site '{name}' takes no layer index", f"write '{name}'")
        return [_make_site(name, tpl, info, None)]
    if layer_text is None:
        raise SiteError(
            f"site '{name}' needs a layer index",
            f"write '{name}.5', '{name}.0:{info.n_layers}' or '{name}.*'",
        )
    layers = _parse_layers(layer_text, info.n_layers, site)
    return [_make_site(name, tpl, info, layer) for layer in layers]


def _expand_raw(pattern: str, info: ModelInfo, site: str) -> list[str]:
    """Expand ``*`` and ``a:b`` path components against the module tree."""
    names = info.module_names
    parts = pattern.split(".")
    if not any(p == "*" or ":" in p for p in parts):
        return [pattern] if pattern in set(names) else []
    regex_parts = []
    for part in parts:
        if part == "*" or ":" in part:
            regex_parts.append(r"(\d+)")
        else:
            regex_parts.append(re.escape(part))
    regex = re.compile(r"\.".join(regex_parts) + r"$")
    found = []
    for name in names:
        match = regex.match(name)
        if not match:
            continue
        ok = True
        for part, value in zip([p for p in parts if p == "*" or ":" in p], match.groups()):
            if ":" in part:
                start, _, stop = part.partition(":")
                lo = int(start) if start else 0
                hi = int(stop) if stop else 1 << 30
                ok = ok and lo <= int(value) < hi
        if ok:
            found.append(name)
    return found


def resolve_site(
    text: str, info: ModelInfo, saes: Mapping[str, SaeSites] | None = None
) -> list[Site]:
    """Resolve a site string to concrete sites, or raise :class:`SiteError` with a hint;
    ``saes``: the spec's SAEs, whose parts are sites ``sae.NAME.PART``."""
    text = text.strip()
    if not text:
        raise SiteError(
            "site is empty", "name a canonical site such as 'resid_post.5' or a module path"
        )
    if text.startswith("sae.") and "sae" not in info.module_names:
        return [_sae_site(text, saes or {})]
    table = family_table(info)
    head, _, rest = text.partition(".")
    if table is not None and head in table["sites"]:
        return _resolve_canonical(table, head, rest or None, info, text)
    names = set(info.module_names)
    if head in CANONICAL and head not in names and info.inputs == "tensor":
        shown = [n for n in info.module_names if n.count(".") <= 1][:12]
        raise SiteError(
            f"canonical site '{head}' needs a site table; a model built by a factory has none",
            "name a module path with .input or .output (default), e.g. one of: " + ", ".join(shown),
        )
    if head in CANONICAL and head not in names:
        what = table["label"] if table else f"{info.architecture} (no site table)"
        reason = (table or {}).get("unsupported", {}).get(head, "no module holds it")
        raise SiteError(
            f"canonical site '{head}' is not available for {what}: {reason}",
            "see `specsight sites MODEL` for the sites this model has",
        )

    module, io = text, "output"
    last = text.rsplit(".", 1)
    if len(last) == 2 and last[1] in _IO and text not in names:
        module, io = last[0], last[1]
    elif text in _IO:
        raise SiteError(f"site '{text}' names no module", "write 'MODULE.input' or 'MODULE.output'")
    modules = _expand_raw(module, info, text)
    if not modules:
        raise SiteError(f"no module or canonical site '{text}'", _site_hint(module, info))
    return [Site(m, io, m if io == "output" else f"{m}.{io}", _layer_of(m, info)) for m in modules]


def _sae_site(text: str, saes: Mapping[str, SaeSites]) -> Site:
    """``sae.NAME.PART``: a part of one of the spec's SAEs, at the site it reads."""
    _, _, rest = text.partition(".")
    name, _, part = rest.partition(".")
    if name not in saes:
        hint = did_you_mean(name, list(saes)) if saes else None
        raise SiteError(
            f"no SAE named '{name}' in '{text}'"
            + (f"; the spec's SAEs: {', '.join(saes)}" if saes else ""),
            hint
            or f"declare it under 'saes:', e.g. saes: {{{name}: {{path: FOLDER, site: "
            "resid_post.6}}",
        )
    if part not in SAE_PARTS:
        raise SiteError(
            f"'{part}' is not a part of SAE '{name}' in '{text}'",
            did_you_mean(part, list(SAE_PARTS)) or "write sae.NAME.features, .recon or .error",
        )
    sae = saes[name]
    base = sae.out or sae.base
    width = sae.d_sae if part == "features" else base.width
    return replace(
        base, name=text, width=width, heads=None, canonical=f"sae.{part}", sae=name, part=part
    )


def _site_hint(module: str, info: ModelInfo) -> str:
    names = list(info.module_names)
    # Suggest against names of the same depth first: 'model.layer.5' -> 'model.layers.5'.
    depth = module.count(".")
    same_depth = [n for n in names if n and n.count(".") == depth]
    head, dot, rest = module.partition(".")
    table = family_table(info)
    canon = list(table["sites"]) if table else []
    close = difflib.get_close_matches(head, canon, n=1, cutoff=0.6)
    if close and not any(n.startswith(head + ".") for n in names):
        return f"did you mean '{close[0]}{dot}{rest}'?"
    hint = did_you_mean(module, same_depth, n=1) or did_you_mean(module, names, n=1)
    if hint is None:
        examples = ", ".join(canonical_names(info)[:4])
        hint = "see `specsight sites MODEL` for the module tree" + (
            f"; canonical sites: {examples}, ..." if examples else ""
        )
    return hint
