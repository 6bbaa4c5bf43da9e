"""Sites: where in a model an op acts.

A site is a module's input or output. Users name it either canonically (``resid_post.5``,
``attn_out.3``, ``embed``, ``logits``), through the per-family tables below, or by a raw
module path (``model.layers.5.mlp``, ``model.layers.5.mlp.input``). Layer ranges
(``resid_post.0:12``) and wildcards (``resid_post.*``, ``model.layers.*.mlp``) expand to
several concrete sites.

The tables are data: a family maps each canonical name to a module path template and whether
the site is that module's ``input`` or ``output``. A site always means the hidden-state tensor,
whatever the module returns (a tensor, a tuple, a ModelOutput).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from .errors import did_you_mean
from .modelinfo import ModelInfo

__all__ = ["FAMILIES", "Site", "SiteError", "detect_family", "resolve_site", "canonical_names"]

#: family -> architectures it covers, the layer stack, and canonical sites.
#: ``{L}`` stands for the layer index. Sites without ``{L}`` are model-wide.
FAMILIES: dict[str, dict] = {
    "llama": {
        "architectures": [
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "Olmo2ForCausalLM",
        ],
        "layers": "model.layers",
        "sites": {
            "embed": ("model.embed_tokens", "output"),
            "resid_pre": ("model.layers.{L}", "input"),
            "resid_mid": ("model.layers.{L}.post_attention_layernorm", "input"),
            "resid_post": ("model.layers.{L}", "output"),
            "attn_out": ("model.layers.{L}.self_attn", "output"),
            "mlp_out": ("model.layers.{L}.mlp", "output"),
            "final_norm": ("model.norm", "output"),
            "logits": ("lm_head", "output"),
        },
    },
    "gpt2": {
        "architectures": ["GPT2LMHeadModel"],
        "layers": "transformer.h",
        "sites": {
            "embed": ("transformer.wte", "output"),
            "resid_pre": ("transformer.h.{L}", "input"),
            "resid_mid": ("transformer.h.{L}.ln_2", "input"),
            "resid_post": ("transformer.h.{L}", "output"),
            "attn_out": ("transformer.h.{L}.attn", "output"),
            "mlp_out": ("transformer.h.{L}.mlp", "output"),
            "final_norm": ("transformer.ln_f", "output"),
            "logits": ("lm_head", "output"),
        },
    },
}

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


def detect_family(architecture: str, module_names: tuple[str, ...] | list[str] = ()) -> str | None:
    """The site-table family of a model, from its class name (or its module tree)."""
    for family, table in FAMILIES.items():
        if architecture in table["architectures"]:
            return family
    names = set(module_names)
    for family, table in FAMILIES.items():
        probe = table["sites"]["resid_post"][0].replace("{L}", "0")
        mid = table["sites"]["resid_mid"][0].replace("{L}", "0")
        if probe in names and mid in names:
            return family
    return None


def canonical_names(info: ModelInfo) -> list[str]:
    """Canonical site names usable on this model (layer sites shown as ``name.L``)."""
    if info.family is None:
        return []
    return [
        f"{name}.L" if "{L}" in module else name
        for name, (module, _io) in FAMILIES[info.family]["sites"].items()
    ]


def _layer_of(module: str, info: ModelInfo) -> int | None:
    if info.family is None:
        return None
    prefix = FAMILIES[info.family]["layers"] + "."
    if module.startswith(prefix):
        head = module[len(prefix) :].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return None


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


def _resolve_canonical(name: str, layer_text: str | None, info: ModelInfo, site: str) -> list[Site]:
    table = FAMILIES[info.family]["sites"]  # type: ignore[index]
    module_tpl, io = table[name]
    if "{L}" not in module_tpl:
        if layer_text is not None:
            raise SiteError(f"site '{name}' takes no layer index", f"write '{name}'")
        return [Site(module_tpl, io, name, None)]
    if layer_text is None:
        raise SiteError(
            f"site '{name}' needs a layer index",
            f"write '{name}.5', '{name}.0:{info.n_layers}' or '{name}.*'",
        )
    layers = _parse_layers(layer_text, info.n_layers, site)
    return [Site(module_tpl.replace("{L}", str(L)), io, f"{name}.{L}", L) for L in layers]


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


def resolve_site(text: str, info: ModelInfo) -> list[Site]:
    """Resolve a site string to concrete sites, or raise :class:`SiteError` with a hint."""
    text = text.strip()
    if not text:
        raise SiteError(
            "site is empty", "name a canonical site such as 'resid_post.5' or a module path"
        )
    family_sites = FAMILIES[info.family]["sites"] if info.family else {}
    head, _, rest = text.partition(".")
    if head in family_sites:
        return _resolve_canonical(head, rest or None, info, text)

    names = set(info.module_names)
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


def _site_hint(module: str, info: ModelInfo) -> str:
    names = list(info.module_names)
    # Suggest against names of the same depth first: 'model.layer.5' -> 'model.layers.5'.
    depth = module.count(".")
    same_depth = [n for n in names if n and n.count(".") == depth]
    head, dot, rest = module.partition(".")
    canon = list(FAMILIES[info.family]["sites"]) if info.family else []
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


def describe_sites(info: ModelInfo, *, max_modules: int = 400) -> str:
    """Canonical sites with their modules and widths, then the module tree (repeated layers folded)."""
    lines = [
        f"{info.model_id}: {info.architecture} (family {info.family or 'unknown'}), "
        f"{info.n_layers} layers, d_model {info.d_model}, {info.n_heads} heads "
        f"({info.n_kv_heads} key/value), vocabulary {info.vocab_size}",
    ]
    if info.family:
        lines.append(f"canonical sites (L = 0..{info.n_layers - 1}):")
        for name, (module, io) in FAMILIES[info.family]["sites"].items():
            label = f"{name}.L" if "{L}" in module else name
            width = info.vocab_size if name == "logits" else info.d_model
            lines.append(
                f"  {label:<14} {module.replace('{L}', 'L')} ({io})  [batch, pos, {width}]"
            )
    else:
        lines.append("no canonical site table for this architecture: use raw module paths")
    layers = FAMILIES[info.family]["layers"] + "." if info.family else None
    lines.append("modules:")
    shown = 0
    for name, kind in info.modules:
        if layers and name.startswith(layers):
            index = name[len(layers) :].split(".", 1)[0]
            if index.isdigit() and int(index) > 0:
                continue
        lines.append(f"  {name} ({kind})")
        shown += 1
        if shown >= max_modules:
            lines.append("  ...")
            break
    if layers and info.n_layers > 1:
        lines.append(
            f"  ({layers}1 .. {layers}{info.n_layers - 1} repeat the structure of {layers}0)"
        )
    return "\n".join(lines)
