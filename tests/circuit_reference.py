"""An independent reference for edge-level circuit analysis (EAP, EAP-IG, edge ablation, path
patching), written for the tests only.

It re-implements the transformer forward in plain torch from the weights of a Hugging Face
``LlamaForCausalLM`` (and Mistral / Qwen2, same layout) or ``GPT2LMHeadModel`` as a "split
residual" forward, as TransformerLens does with ``use_split_qkv_input``: every downstream node
(each head's q, each kv head's k and v, each MLP, the logits) gets its own copy of its
residual-stream input, assembled as the explicit sum of the outputs of the upstream nodes that
have an edge into it, plus the attention output biases (which belong to no node).

Upstream nodes: ``embed`` (token embedding, plus the position embedding on GPT-2), then per
layer ``head.L.H`` (head H's z times its slice of the output projection, without bias) and
``mlp.L``. Downstream nodes: per layer ``head.L.H.q``, ``head.L.G.k``, ``head.L.G.v``,
``mlp.L``; finally ``logits``. An edge U->D exists iff layer(U) < layer(D), or U is a head of
layer L and D is ``mlp.L`` (``embed`` has layer -1, ``logits`` has layer n_layers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

Edits = dict[tuple[str, str], Tensor]


def _hf(model: Any) -> nn.Module:
    """The Hugging Face model (accepts a loader wrapper that holds it as ``.model``)."""
    return model if isinstance(model, nn.Module) else model.model


def _is_gpt2(model: nn.Module) -> bool:
    return hasattr(model, "transformer")


def _dims(model: nn.Module) -> tuple[int, int, int, int]:
    """(n_layers, n_heads, n_kv_heads, d_head)."""
    c = model.config
    n_heads = c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    d_head = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    return c.num_hidden_layers, n_heads, n_kv, d_head


def graph(model: Any) -> tuple[list[str], list[str]]:
    """(upstream node names, downstream node names), in the reference order."""
    n_layers, n_heads, n_kv, _ = _dims(_hf(model))
    ups, downs = ["embed"], []
    for layer in range(n_layers):
        ups += [f"head.{layer}.{h}" for h in range(n_heads)] + [f"mlp.{layer}"]
        downs += [f"head.{layer}.{h}.q" for h in range(n_heads)]
        downs += [f"head.{layer}.{g}.{kv}" for kv in "kv" for g in range(n_kv)]
        downs.append(f"mlp.{layer}")
    return ups, [*downs, "logits"]


def _layer(name: str) -> int:
    if name == "embed":
        return -1
    if name == "logits":
        return 1 << 30
    return int(name.split(".")[1])


def has_edge(up: str, down: str) -> bool:
    """Whether the edge ``up -> down`` is in the graph."""
    lu, ld = _layer(up), _layer(down)
    return lu < ld or (up.startswith("head.") and down == f"mlp.{lu}")


def edge_names(model: Any) -> list[str]:
    """Every edge ``"UP->DOWN"``, upstream-major."""
    ups, downs = graph(model)
    return [f"{u}->{d}" for u in ups for d in downs if has_edge(u, d)]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _attn_weights(model: nn.Module, layer: int) -> dict[str, Any]:
    """Per-head weights: wq [n_heads, d, dh] (q = x @ wq[h] + bq[h]), wk/wv [n_kv, d, dh],
    wo [n_heads, dh, d] (out = z @ wo[h]), biases (or None), the norms and the MLP."""
    n_layers, n_heads, n_kv, dh = _dims(model)
    if _is_gpt2(model):
        block = model.transformer.h[layer]
        d = model.config.hidden_size
        w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # [d, 3d], [3d]
        split = [
            w[:, i * d : (i + 1) * d].reshape(d, n_heads, dh).transpose(0, 1) for i in range(3)
        ]
        bias = [b[i * d : (i + 1) * d].reshape(n_heads, dh) for i in range(3)]
        wo = block.attn.c_proj.weight.reshape(n_heads, dh, d)
        return {
            "wq": split[0], "wk": split[1], "wv": split[2],
            "bq": bias[0], "bk": bias[1], "bv": bias[2],
            "wo": wo, "bo": block.attn.c_proj.bias,
            "norm1": block.ln_1, "norm2": block.ln_2, "mlp": block.mlp,
        }  # fmt: skip
    block = model.model.layers[layer]
    attn = block.self_attn

    def proj(lin: nn.Linear, n: int) -> tuple[Tensor, Tensor | None]:
        w = lin.weight.reshape(n, dh, -1).transpose(1, 2)
        return w, None if lin.bias is None else lin.bias.reshape(n, dh)

    (wq, bq), (wk, bk), (wv, bv) = (
        proj(attn.q_proj, n_heads),
        proj(attn.k_proj, n_kv),
        proj(attn.v_proj, n_kv),
    )
    wo = attn.o_proj.weight.T.reshape(n_heads, dh, -1)
    return {
        "wq": wq, "wk": wk, "wv": wv, "bq": bq, "bk": bk, "bv": bv,
        "wo": wo, "bo": attn.o_proj.bias,
        "norm1": block.input_layernorm, "norm2": block.post_attention_layernorm,
        "mlp": block.mlp,
    }  # fmt: skip


def split_forward(
    model: Any,
    ids: list[int],
    *,
    edits: Edits | None = None,
    deltas: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The split-residual forward of one prompt: (logits [P, vocab], upstream outputs
    {name: [P, d]}). ``edits[(up, down)]`` replaces ``up``'s output along that edge only;
    ``deltas[down]`` is added to ``down``'s input."""
    model = _hf(model)
    edits, deltas = edits or {}, deltas or {}
    ups, downs = graph(model)
    for u, d in edits:
        if u not in ups or d not in downs or not has_edge(u, d):
            raise KeyError(f"no edge {u}->{d}")
    for d in deltas:
        if d not in downs:
            raise KeyError(f"no downstream node {d}")
    n_layers, n_heads, n_kv, dh = _dims(model)
    gpt2 = _is_gpt2(model)
    device = next(model.parameters()).device
    ids_t = torch.tensor(ids, device=device)
    pos = torch.arange(len(ids), device=device)
    if gpt2:
        embed = model.transformer.wte(ids_t) + model.transformer.wpe(pos)
    else:
        embed = model.model.embed_tokens(ids_t)
        cos, sin = model.model.rotary_emb(embed[None], pos[None])
        cos, sin = cos[0], sin[0]  # [P, dh]
    up: dict[str, Tensor] = {"embed": embed}
    const = torch.zeros_like(embed[0])  # attention output biases so far

    def read(down: str) -> Tensor:
        total = const
        for name, value in up.items():
            if has_edge(name, down):
                total = total + edits.get((name, down), value)
        return total + deltas[down] if down in deltas else total

    up_dtype = torch.promote_types(embed.dtype, torch.float32)  # softmax in >= float32
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool, device=device).tril()
    scale = dh**-0.5
    for layer in range(n_layers):
        w = _attn_weights(model, layer)

        def head_in(kind: str, h: int, w: dict[str, Any] = w, layer: int = layer) -> Tensor:
            x = w["norm1"](read(f"head.{layer}.{h}.{kind}")) @ w[f"w{kind}"][h]
            x = x if w[f"b{kind}"] is None else x + w[f"b{kind}"][h]
            return x if gpt2 or kind == "v" else x * cos + _rotate_half(x) * sin

        ks = [head_in("k", g) for g in range(n_kv)]
        vs = [head_in("v", g) for g in range(n_kv)]
        s = (
            scale / (layer + 1)
            if getattr(model.config, "scale_attn_by_inverse_layer_idx", False)
            else scale
        )
        for h in range(n_heads):
            g = h // (n_heads // n_kv)  # GQA: the kv head this query head reads
            scores = (head_in("q", h) @ ks[g].T * s).masked_fill(~causal, float("-inf"))
            pattern = torch.softmax(scores.to(up_dtype), dim=-1).to(scores.dtype)
            up[f"head.{layer}.{h}"] = pattern @ vs[g] @ w["wo"][h]
        if w["bo"] is not None:
            const = const + w["bo"]
        up[f"mlp.{layer}"] = w["mlp"](w["norm2"](read(f"mlp.{layer}")))
    x = read("logits")
    if gpt2:
        return model.lm_head(model.transformer.ln_f(x)), up
    return model.lm_head(model.model.norm(x)), up


def _metric(logits: Tensor, target: int, foil: int, position: int) -> Tensor:
    return logits[position, target] - logits[position, foil]


def eap_reference(
    model: Any,
    clean_ids: list[int],
    corrupt_ids: list[int],
    target: int,
    foil: int,
    position: int,
    steps: int = 1,
) -> dict[str, float]:
    """Every edge's EAP score (steps=1) or EAP-IG score (steps>1, the embed node interpolated
    from corrupt (k=0) to clean (k=steps), gradients averaged over k=1..steps):
    sum over positions and dims of (u_U(clean) - u_U(corrupt)) * dm/d(input of D)."""
    ups, downs = graph(model)
    with torch.no_grad():
        _, clean = split_forward(model, clean_ids)
        _, corrupt = split_forward(model, corrupt_ids)
    grads = {d: torch.zeros_like(clean["embed"]) for d in downs}
    for k in range(1, steps + 1):
        edits: Edits = {}
        if k < steps:
            emb = corrupt["embed"] + k / steps * (clean["embed"] - corrupt["embed"])
            edits = {("embed", d): emb for d in downs}
        with torch.enable_grad():
            deltas = {d: torch.zeros_like(clean["embed"], requires_grad=True) for d in downs}
            logits, _ = split_forward(model, clean_ids, edits=edits, deltas=deltas)
            got = torch.autograd.grad(
                _metric(logits, target, foil, position), list(deltas.values())
            )
        for d, g in zip(downs, got, strict=True):
            grads[d] += g / steps
    return {
        f"{u}->{d}": float(((clean[u] - corrupt[u]) * grads[d]).sum())
        for u in ups
        for d in downs
        if has_edge(u, d)
    }


def _parse(edge: str) -> tuple[str, str]:
    up, down = edge.split("->")
    return up.strip(), down.strip()


def edge_ablation_reference(
    model: Any,
    clean_ids: list[int],
    corrupt_ids: list[int],
    target: int,
    foil: int,
    position: int,
    ablated_edges: list[str],
) -> float:
    """m on the clean prompt where each ablated edge carries the upstream node's output from
    the (unedited) corrupt run; everything else is recomputed."""
    with torch.no_grad():
        _, corrupt = split_forward(model, corrupt_ids)
        edits = {(u, d): corrupt[u] for u, d in map(_parse, ablated_edges)}
        logits, _ = split_forward(model, clean_ids, edits=edits)
    return float(_metric(logits, target, foil, position))


def path_patch_reference(
    model: Any,
    base_ids: list[int],
    from_ids: list[int],
    senders: list[str],
    receivers: list[str],
    target: int,
    foil: int,
    position: int,
) -> float:
    """Two-stage path patching: each receiver's input is fixed to its base-run value plus, for
    each sender with an edge into it, u_S(from) - u_S(base); the rest of the base run is
    recomputed. Done as edge edits: every edge into a receiver carries the base run's output
    (the from run's for senders), so the receiver's input is exactly that stage-1 sum."""
    ups, downs = graph(model)
    for name in senders:
        if name not in ups:
            raise KeyError(f"no upstream node {name}")
    with torch.no_grad():
        _, base = split_forward(model, base_ids)
        _, source = split_forward(model, from_ids)
        edits: Edits = {}
        for r in receivers:
            if r not in downs:
                raise KeyError(f"no downstream node {r}")
            for u in ups:
                if has_edge(u, r):
                    edits[(u, r)] = source[u] if u in senders else base[u]
        logits, _ = split_forward(model, base_ids, edits=edits)
    return float(_metric(logits, target, foil, position))
