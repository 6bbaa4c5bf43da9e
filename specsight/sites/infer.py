"""Site tables for models without one, inferred from the module tree (torch-free).

The layer stack is the longest run of numbered children (``x.0``, ``x.1``, ...) of one module
that share their class; inside its first block, children named like attention (``attn``,
``attention``, ``self_attention``) and MLPs (``mlp``, ``ffn``, ``feed_forward``) give
``attn_out`` and ``mlp_out``. The token embedding is the first embedding module before the
stack, the final norm a norm after it, and the unembedding a top-level linear head. Sites that
need knowledge of the block's internals (``resid_mid``, heads, ``mlp_act``) are not inferred:
the returned table says so in ``unsupported``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from .tables import CANONICAL, SiteTemplate, common_docs

__all__ = ["infer_family"]

_ATTENTION = re.compile(r"^(self_?attn|self_?attention|attn|attention|mixer_attn)$")
_MLP = re.compile(r"^(mlp|ffn|feed_?forward|ff|moe|block_sparse_moe)$")
_HEADS = ("lm_head", "embed_out", "output", "head", "unembed")
_NO_TABLE = "not inferred without a site table for {arch}: use a raw module path"


def _layer_stacks(modules: tuple[tuple[str, str], ...]) -> list[tuple[str, int, int]]:
    """(path, number of blocks, registration index of block 0) for each numbered run."""
    runs: dict[str, dict[int, str]] = {}
    first: dict[str, int] = {}
    for i, (name, kind) in enumerate(modules):
        parent, _, last = name.rpartition(".")
        if parent and last.isdigit():
            runs.setdefault(parent, {})[int(last)] = kind
            first.setdefault(parent, i)
    stacks = []
    for parent, blocks in runs.items():
        kinds = {blocks.get(i) for i in range(len(blocks))}
        if len(kinds) == 1 and None not in kinds:  # 0..n-1, one class
            stacks.append((parent, len(blocks), first[parent]))
    return stacks


def _child(children: list[str], pattern: re.Pattern[str]) -> str | None:
    return next((c for c in children if pattern.match(c)), None)


@functools.lru_cache(maxsize=16)
def infer_family(
    architecture: str, modules: tuple[tuple[str, str], ...], n_layers: int
) -> dict[str, Any] | None:
    """A family table (same shape as :data:`specsight.sites.FAMILIES` values) or None."""
    stacks = _layer_stacks(modules)
    if not stacks:
        return None
    # Prefer a stack with exactly n_layers blocks, then the longest, then the first.
    path, count, start = max(stacks, key=lambda s: (s[1] == n_layers, s[1], -s[2]))
    names = [name for name, _ in modules]
    kinds = dict(modules)
    block = f"{path}.0"
    children = [n[len(block) + 1 :] for n in names if n.startswith(block + ".")]
    children = [c for c in children if "." not in c]
    sites: dict[str, SiteTemplate] = {}
    docs = common_docs()

    def add(name: str, module: str, io: str, width: str = "d_model", doc: str = "") -> None:
        sites[name] = SiteTemplate(module, io, width, doc=doc or docs.get(name, ""))

    before = [n for n in names[:start] if "Embedding" in kinds[n]]
    token_embeds = [
        n for n in before if re.search(r"(wte|tok|word|embed_in|embed_tokens|embeddings$)", n)
    ]
    embed = (token_embeds or [n for n in before if "Position" not in kinds[n]] or [None])[0]
    if embed is not None:
        add("embed", embed, "output")
    add("resid_pre", f"{path}.{{L}}", "input")
    add("resid_post", f"{path}.{{L}}", "output")
    attention = _child(children, _ATTENTION)
    if attention:
        add("attn_out", f"{path}.{{L}}.{attention}", "output", doc="the attention module's output")
    mlp = _child(children, _MLP)
    if mlp:
        add("mlp_out", f"{path}.{{L}}.{mlp}", "output", doc="the MLP module's output")
    end = start + sum(1 for n in names if n.startswith(path + "."))
    parent = path.rpartition(".")[0]
    # the final norm: a norm beside the stack, registered after it (or named 'final')
    norms = [
        (i, n)
        for i, n in enumerate(names)
        if n.rpartition(".")[0] == parent
        and not n.startswith(path)
        and re.search(r"(norm|ln_f|^ln|\.ln)", n.lower())
    ]
    final = [n for i, n in norms if i >= end] or [n for _, n in norms if "final" in n]
    if final:
        add("final_norm", final[-1], "output")
    head = next((n for n in names if n in _HEADS and kinds[n] == "Linear"), None)
    if head:
        add("logits", head, "output", "vocab")
    reason = _NO_TABLE.format(arch=architecture)
    unsupported = {name: reason for name in CANONICAL if name not in sites}
    if not attention:
        unsupported["attn_out"] = (
            f"no attention child found in {block} (children: {', '.join(children)})"
        )
    if not mlp:
        unsupported["mlp_out"] = f"no MLP child found in {block} (children: {', '.join(children)})"
    ordered = {name: sites[name] for name in CANONICAL if name in sites}
    return {
        "label": f"{architecture} (inferred)",
        "architectures": [architecture],
        "layers": path,
        "attention": attention,
        "sites": ordered,
        "unsupported": unsupported,
        "docs": {},
        "inferred": True,
    }
