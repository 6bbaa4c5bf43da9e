"""Site names of a model for the spec's JSON schema: what ``specsight schema --model ID`` adds
so that editors complete a model's sites (torch-free; the model's structure comes from its
:class:`~specsight.models.ModelInfo`, no weights).

:func:`site_groups` lists the names the model accepts, grouped: one group per canonical site,
one per module of the repeated layer, one for the modules outside the layers. A group holds the
forms a spec writes for a sweep or for every layer (``resid_post.{layer}``, ``resid_post.*``)
and the concrete name at each layer (``resid_post.0`` ... ``resid_post.29``); module groups hold
each module's path (its output) and the path with ``.input``.

:func:`model_schema` puts them in the schema. Every ``site`` field gets
``anyOf: [{"$ref": "#/$defs/ModelSite"}, {"type": "string"}]`` where ``ModelSite`` is an
``anyOf`` of one ``enum`` per group: the YAML language server and VS Code complete a value from
the ``enum`` s inside ``anyOf``, while the string branch's ``pattern`` (:func:`site_pattern`)
keeps every other form the model could resolve (a layer range, another sweep variable, a module
path with an index range) free of false errors and flags a typo ('resid_pots.3'). The field's
own constraints stay, so the schema refuses everything the generic one refuses. ``enum`` rather than ``examples``: the
YAML language server shows a value's ``examples`` on hover, every one of them, always; it shows
an ``enum`` only where the value is in it, and then only that group's few dozen names.
"""

from __future__ import annotations

import copy
import re
from typing import Any, NamedTuple
from urllib.parse import quote

from ..models import ModelInfo
from .resolve import SAE_PARTS, family_table

__all__ = [
    "DEF_NAME",
    "FORM_NAME",
    "LAYER_VARIABLE",
    "SiteGroup",
    "model_schema",
    "sae_group",
    "site_groups",
    "site_names",
    "site_pattern",
]

#: the ``$defs`` entry holding the model's site names
DEF_NAME = "ModelSite"
#: the ``$defs`` entry holding the pattern of every site string the model could resolve
FORM_NAME = "ModelSiteForm"
#: the sweep variable of the templated forms: ``resid_post.{layer}``
LAYER_VARIABLE = "layer"
#: module classes without a forward of their own: a hook on them never fires
_CONTAINERS = frozenset({"ModuleList", "ModuleDict", "ParameterList", "ParameterDict"})
_OUTSIDE = "modules outside the layers"
_IO_SUFFIXES = (".input", ".output")


class SiteGroup(NamedTuple):
    """Names of one canonical site, or of one module at every layer, for completion."""

    #: ``resid_post.L``, ``model.layers.L.mlp``, or "modules outside the layers"
    label: str
    #: what the names mean (shown by editors)
    description: str
    names: tuple[str, ...]


def _layer_forms(template: str, n_layers: int) -> list[str]:
    """``{L}`` in ``template`` as the sweep variable, as every layer, then as each layer."""
    return [
        template.replace("{L}", "{" + LAYER_VARIABLE + "}"),
        template.replace("{L}", "*"),
        *(template.replace("{L}", str(layer)) for layer in range(n_layers)),
    ]


def _canonical_groups(info: ModelInfo, table: dict) -> list[SiteGroup]:
    groups = []
    for name, tpl in table["sites"].items():
        layered = "{L}" in tpl[0]
        label = f"{name}.L" if layered else name
        names = _layer_forms(f"{name}.{{L}}", info.n_layers) if layered else [name]
        doc = getattr(tpl, "doc", "")
        where = f"{tpl[0].replace('{L}', 'L')} ({tpl[1]})"
        groups.append(
            SiteGroup(label, f"{label}: {where}" + (f": {doc}" if doc else ""), tuple(names))
        )
    return groups


def _layer_template(module: str, layers: str | None) -> str | None:
    """``model.layers.{L}.mlp`` for ``model.layers.3.mlp``; None outside the layer stack."""
    if not layers or not module.startswith(layers + "."):
        return None
    index, _, rest = module[len(layers) + 1 :].partition(".")
    if not index.isdigit():
        return None
    return f"{layers}.{{L}}" + (f".{rest}" if rest else "")


def _with_inputs(paths: list[str]) -> tuple[str, ...]:
    """The module paths (their output), then the same paths with ``.input``; no repeats. A
    templated path ending in a module named ``input`` or ``output`` gets ``.output``, else
    its last part would read as the io of its parent (``vit.layers.*.output``)."""
    outputs = [
        f"{path}.output" if ("*" in path or "{" in path) and path.endswith(_IO_SUFFIXES) else path
        for path in paths
    ]
    return tuple(dict.fromkeys([*outputs, *(f"{path}.input" for path in paths)]))


def _site_modules(info: ModelInfo, table: dict | None) -> list[tuple[str, str]]:
    """The (module, class) pairs a site may name: not a container (its hook never fires), not
    a path starting with a canonical name (it would resolve as that canonical site)."""
    canonical = set(table["sites"]) if table else set()
    return [
        (module, kind)
        for module, kind in info.modules
        if module and kind not in _CONTAINERS and module.split(".", 1)[0] not in canonical
    ]


def _module_groups(info: ModelInfo, table: dict | None) -> list[SiteGroup]:
    layers = table["layers"] if table else None
    per_layer: dict[str, list[tuple[str, str]]] = {}
    outside: list[str] = []
    for module, kind in _site_modules(info, table):
        template = _layer_template(module, layers)
        if template is None:
            outside.append(module)
        else:
            per_layer.setdefault(template, []).append((module, kind))
    groups = []
    for template, found in per_layer.items():
        label = template.replace("{L}", "L")
        forms = _layer_forms(template, 0) + [module for module, _ in found]
        description = f"{label} ({found[0][1]}): the module's output, or its input with .input"
        groups.append(SiteGroup(label, description, _with_inputs(forms)))
    if outside:
        description = "modules outside the layers: a module's output, or its input with .input"
        groups.append(SiteGroup(_OUTSIDE, description, _with_inputs(outside)))
    return groups


def site_groups(info: ModelInfo) -> list[SiteGroup]:
    """The site names ``info``'s model accepts, grouped for completion: canonical sites first
    (none for a model without a site table), then module paths."""
    table = family_table(info)
    canonical = _canonical_groups(info, table) if table else []
    return canonical + _module_groups(info, table)


def site_names(info: ModelInfo) -> list[str]:
    """Every name of :func:`site_groups`, in order."""
    return list(dict.fromkeys(name for group in site_groups(info) for name in group.names))


#: a layer or index in a site: a number (negative from the end), a range, *, a sweep variable
_INDEX = r"(?:-?[0-9]+|-?[0-9]*:-?[0-9]*(?::-?[0-9]+)?|\*|\{[A-Za-z_][A-Za-z0-9_]*\})"


def _module_form(module: str) -> str:
    """A module path as a pattern whose index components take any index form."""
    return r"\.".join(_INDEX if part.isdigit() else re.escape(part) for part in module.split("."))


def site_pattern(info: ModelInfo) -> str:
    """A regular expression (ECMA-262, as JSON Schema reads it) of every site string ``info``'s
    model could resolve: canonical names with any layer form, model-wide names, module paths
    (any index form, ``.input`` / ``.output``), SAE parts; a typo matches none of them."""
    table = family_table(info)
    forms: list[str] = []
    if table:
        layered = sorted(n for n, tpl in table["sites"].items() if "{L}" in tpl[0])
        wide = sorted(n for n, tpl in table["sites"].items() if "{L}" not in tpl[0])
        if layered:
            forms.append(f"(?:{'|'.join(map(re.escape, layered))})\\.{_INDEX}")
        forms += [re.escape(name) for name in wide]
    modules = sorted({_module_form(module) for module, _ in _site_modules(info, table)})
    if modules:
        forms.append(f"(?:{'|'.join(modules)})(?:\\.input|\\.output)?")
    forms.append(f"sae\\.[A-Za-z_][A-Za-z0-9_\\-]*\\.(?:{'|'.join(SAE_PARTS)})")
    return f"^(?:{'|'.join(forms)})$"


def _complete_sites(node: Any, refs: list[dict[str, Any]]) -> int:
    """Give every string ``site`` property below ``node`` the model's names, and refuse any
    other string that names no site of the model; how many."""
    count = 0
    if isinstance(node, dict):
        site = node.get("properties", {}).get("site")
        options = site.get("anyOf", []) if isinstance(site, dict) else []
        optional = [o.get("type") for o in options] == ["string", "null"]  # site: str | None
        if isinstance(site, dict) and (
            (site.get("type") == "string" and "anyOf" not in site) or optional
        ):
            site.pop("examples", None)  # the generic examples may not be this model's names
            site["anyOf"] = copy.deepcopy(refs) + ([{"type": "null"}] if optional else [])
            count += 1
        count += sum(_complete_sites(value, refs) for value in node.values())
    elif isinstance(node, list):
        count += sum(_complete_sites(value, refs) for value in node)
    return count


def sae_group(names: tuple[str, ...] | list[str]) -> SiteGroup:
    """The sites of the SAEs named ``names`` (their features, reconstruction and error)."""
    sites = tuple(f"sae.{name}.{part}" for name in names for part in SAE_PARTS)
    return SiteGroup("sae.NAME.*", "the parts of the spec's SAEs (saes:)", sites)


def model_schema(
    schema: dict[str, Any], info: ModelInfo, saes: tuple[str, ...] | list[str] = ()
) -> dict[str, Any]:
    """A copy of the spec's JSON ``schema`` whose ``site`` fields complete ``info``'s site names
    (see the module's docstring), and those of SAEs named ``saes``; it validates what
    ``schema`` does, except site strings that no site of the model could be (typos)."""
    out = copy.deepcopy(schema)
    groups = site_groups(info) + ([sae_group(saes)] if saes else [])
    if not groups:  # nothing to complete (a model without modules)
        return out
    out.setdefault("$defs", {})[DEF_NAME] = {
        "description": f"the sites of {info.model_id} ({info.architecture}, "
        f"{info.n_layers} layers): canonical names, then module paths",
        "anyOf": [{"description": g.description, "enum": list(g.names)} for g in groups],
    }
    out["$defs"][FORM_NAME] = {
        "description": f"any site string {info.model_id} could resolve (a typo matches none)",
        "type": "string",
        "pattern": site_pattern(info),
    }
    _complete_sites(out, [{"$ref": f"#/$defs/{DEF_NAME}"}, {"$ref": f"#/$defs/{FORM_NAME}"}])
    if "$id" in out:  # another schema than the generic one: another id
        out["$id"] = f"{out['$id']}?model={quote(info.model_id, safe='')}"
    out["$comment"] = (
        f"site names of {info.model_id}: written by `specsight schema --model {info.model_id}`"
    )
    return out
