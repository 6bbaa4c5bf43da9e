"""The hand-written baseline of ``circuits.py``'s faithfulness: per item, a forward on the
clean prompt with hooks that, at every receiver, add one term (A_U - u_U) per ablated edge
into it (a Python loop over the edges), A the corrupt run's upstream outputs and u this
forward's. A head's q, k or v input is recomputed through the layer's first norm and the
head's rows of its projection. Returns the mean logit difference (target - foil)."""

from __future__ import annotations

from typing import Any

import torch
from circuits import Llama  # beside this script


def ablated_by_hand(lm: Any, rows: list[dict[str, Any]], circuit: list[str]) -> float:
    m = Llama(lm.model)
    ups, downs = m.names()
    kept = set(circuit)
    into: dict[str, list[int]] = {d: [] for d in downs}  # ablated upstream indices per receiver
    for u, up in enumerate(ups):
        up_layer = -1 if up == "embed" else int(up.split(".")[1])
        for down in downs:
            down_layer = m.n_layers if down == "logits" else int(down.split(".")[1])
            same = up.startswith("head") and down == f"mlp.{up_layer}"
            if (up_layer < down_layer or same) and f"{up}->{down}" not in kept:
                into[down].append(u)
    total = 0.0
    for row in rows:
        clean, corrupt = (torch.tensor([lm.tokenizer.encode(row[k])]) for k in ("clean", "corrupt"))
        target, foil = (lm.tokenizer.encode(row[k])[0] for k in ("io", "s"))
        ablation = m.record(corrupt)
        logits = _ablated_forward(m, clean, ablation, into)
        total += float(logits[target] - logits[foil])
    return total / len(rows)


def _ablated_forward(m: Llama, ids: torch.Tensor, ablation: torch.Tensor, into: dict[str, list[int]]) -> torch.Tensor:  # fmt: skip
    made: list[torch.Tensor] = []  # this forward's upstream outputs, [P, d] each
    state: dict[str, torch.Tensor] = {}

    def delta(down: str) -> torch.Tensor:
        out = torch.zeros_like(ablation[0])
        for u in into[down]:
            out = out + (ablation[u] - made[u])
        return out

    handles = []
    for i, layer in enumerate(m.layers):
        attn, ln1 = layer.self_attn, layer.input_layernorm

        def layer_in(mod: Any, a: Any, i: int = i) -> None:
            if i == 0:
                made.append(a[0][0])
            state["x"] = a[0][0]

        def proj(mod: Any, a: Any, o: torch.Tensor, group: str, n: int, i: int = i, ln1: Any = ln1) -> torch.Tensor:  # fmt: skip
            o = o.clone()
            w = mod.weight.reshape(n, m.dh, -1)
            for h in range(n):
                x = state["x"] + delta(f"head.{i}.{h}.{group}")
                o[0, :, h * m.dh : (h + 1) * m.dh] = ln1.forward(x) @ w[h].T  # no hooks
            return o

        def heads(mod: Any, a: Any, i: int = i) -> None:
            z = a[0][0].reshape(a[0].shape[1], m.h, m.dh)
            made.extend(torch.einsum("phk,hkd->hpd", z, m.w_o[i]).unbind(0))

        def mlp_in(mod: Any, a: Any, i: int = i) -> tuple:
            return (a[0] + delta(f"mlp.{i}")[None],)

        handles.append(ln1.register_forward_pre_hook(layer_in))
        for group, module, n in (("q", attn.q_proj, m.h), ("k", attn.k_proj, m.g), ("v", attn.v_proj, m.g)):  # fmt: skip
            handles.append(module.register_forward_hook(lambda mod, a, o, g=group, n=n, p=proj: p(mod, a, o, g, n)))  # fmt: skip
        handles.append(attn.o_proj.register_forward_pre_hook(heads))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(mlp_in))
        handles.append(layer.mlp.register_forward_hook(lambda mod, a, o: made.append(o[0])))
    handles.append(m.model.model.norm.register_forward_pre_hook(lambda mod, a: (a[0] + delta("logits")[None],)))  # fmt: skip
    try:
        with torch.inference_mode():
            return m.model(ids).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
