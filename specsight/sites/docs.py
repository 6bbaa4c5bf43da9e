"""Describing sites for people: ``specsight sites MODEL`` and the README's family table.

Both are generated from the site tables, so they cannot drift from what the compiler resolves.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..models import ModelInfo
from .resolve import FAMILIES, Site, family_table, resolve_site, site_shape
from .tables import CANONICAL, common_docs

__all__ = ["describe_sites", "sites_table_markdown", "update_readme_table", "TABLE_MARKERS"]

TABLE_MARKERS = ("<!-- sites-table:start -->", "<!-- sites-table:end -->")


def _where(site: Site) -> str:
    """``(output)``, or for fused projections the columns of head h."""
    layout = site.heads
    if layout is None or site.io == "pattern":
        return f"({site.io})"
    own = layout.module_width == layout.n_heads * layout.d_head
    if layout.stride == layout.d_head and layout.base == 0 and own:
        return f"({site.io})"
    if layout.stride == layout.d_head:
        stop = layout.base + layout.n_heads * layout.d_head
        return f"({site.io}, columns {layout.base}:{stop})"
    return (
        f"({site.io}, head h: columns {layout.stride}h+{layout.base}"
        f":{layout.stride}h+{layout.base + layout.d_head})"
    )


def describe_sites(info: ModelInfo, *, max_modules: int = 400) -> str:
    """Canonical sites with their modules and shapes, then the module tree (repeated layers
    folded)."""
    table = family_table(info)
    family = info.family or ("unknown, site table inferred" if table else "unknown")
    heads = (
        f"{info.n_heads} heads ({info.n_kv_heads} key/value) of {info.d_head}"
        if info.n_heads
        else "no attention heads"
    )
    if info.inputs == "tensor":  # built by a factory: only the module tree is known
        lines = [
            f"{info.model_id}: {info.architecture}, built by a factory: no canonical sites; "
            "ops name the module paths below, with their input or output",
        ]
    else:
        image = info.image or {}
        outputs = (
            f"{info.vocab_size} classes, {image['size'][0]}x{image['size'][1]} images "
            f"in {image['seq_len']} positions (class token + patches)"
            if info.inputs == "image"
            else f"vocabulary {info.vocab_size}"
        )
        lines = [
            f"{info.model_id}: {info.architecture} (family {family}), {info.n_layers} layers, "
            f"d_model {info.d_model}, {heads}, d_mlp {info.d_mlp}, {outputs}",
        ]
    if table:
        lines.append(f"canonical sites (L = 0..{info.n_layers - 1}):")
        for name, tpl in table["sites"].items():
            layered = "{L}" in tpl[0]
            site = resolve_site(f"{name}.0" if layered else name, info)[0]
            label = f"{name}.L" if layered else name
            module = tpl[0].replace("{L}", "L")
            shape = "[batch, " + site_shape(site)[1:]
            lines.append(f"  {label:<14} {module} {_where(site)}  {shape}")
        if table["unsupported"]:
            lines.append("not available here:")
            for name, reason in table["unsupported"].items():
                lines.append(f"  {name:<14} {reason}")
        if table["docs"]:
            lines.append(f"what sites mean on {table['label']}:")
            for name in table["sites"]:
                if name in table["docs"]:
                    lines.append(f"  {name:<14} {table['docs'][name]}")
    else:
        lines.append("no canonical site table for this architecture: use raw module paths")
    layers = table["layers"] + "." if table else None
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


def sites_table_markdown() -> str:
    """The README's families x canonical sites table, with what differs per family."""
    header = "| family | tiny model | " + " | ".join(f"`{n}`" for n in CANONICAL) + " |"
    rule = "| --- | --- |" + " --- |" * len(CANONICAL)
    rows = [header, rule]
    for table in FAMILIES.values():
        tiny = ", ".join(f"`{t}`" for t in table["tiny"])
        cells = []
        for name in CANONICAL:
            tpl = table["sites"].get(name)
            if tpl is None:
                cells.append("–")
            elif tpl[1] == "pattern":
                cells.append("eager")
            elif getattr(tpl, "layout", "separate") != "separate":
                cells.append(f"✓ {tpl.layout}")
            else:
                cells.append("✓")
        rows.append(f"| {table['label']} | {tiny} | " + " | ".join(cells) + " |")
    inferred = {"embed", "resid_pre", "resid_post", "attn_out", "mlp_out", "final_norm", "logits"}
    cells = ["inferred" if name in inferred else "–" for name in CANONICAL]
    rows.append("| any other model | `tiny-mamba` | " + " | ".join(cells) + " |")
    lines = rows + [
        "",
        "✓ supported; `fused` / `interleaved`: split out of a fused projection; `eager`: needs "
        "`model: {attn_implementation: eager}` (save only); `inferred`: found from the module "
        "tree when the names allow (`specsight sites MODEL` shows what was found); – not "
        "available.",
        "",
        "Per-head sites (`q`, `k`, `v`, `head_z`, `attn_pattern`) take `heads:` on any op: an "
        "index, a list (`heads: [0, 3]`), `all` (the default) or a sweep variable "
        '(`sweep: {head: all}` with `heads: "{head}"`; on `k` / `v` sites under grouped-query '
        "attention `head: all` means the key/value heads). `add` / `set` vectors have the chosen "
        "heads' width (heads x d_head); saves come back as `[pos, heads, d_head]`, and "
        "`attn_pattern` saves as `[pos, heads, key]`.",
        "",
        "What each site means (all families unless noted below):",
        "",
    ]
    lines += [f"- `{name}`: {text}" for name, text in common_docs().items()]
    lines += ["", "Per family:", ""]
    for table in FAMILIES.values():
        docs = table["docs"]
        notes = [f"`{name}`: {docs[name]}" for name in CANONICAL if name in docs]
        notes += [f"no `{name}`: {text}" for name, text in table["unsupported"].items()]
        if notes:
            lines.append(f"- {table['label']} ({', '.join(table['architectures'])}):")
            lines += [f"  - {note}" for note in notes]
        else:
            lines.append(f"- {table['label']} ({', '.join(table['architectures'])})")
    return "\n".join(lines)


def update_readme_table(readme: Path, *, write: bool = True) -> bool:
    """Replace the table between the markers in ``readme``; True when it was already current."""
    text = readme.read_text(encoding="utf-8")
    start, end = TABLE_MARKERS
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {start} ... {end} markers")
    fresh = f"{start}\n{sites_table_markdown()}\n{end}"
    new = pattern.sub(lambda _m: fresh, text)
    if write and new != text:
        readme.write_text(new, encoding="utf-8")
    return new == text
