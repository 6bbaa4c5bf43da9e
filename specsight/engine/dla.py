"""Direct logit attribution after a run (the ``dla`` metric's arithmetic): each part ``c`` of
the final residual stream contributes ``c . u`` to the logit difference, where ``u`` is the
unembedding's direction of target - foil taken back through the final norm with the run's
scale frozen: ``u = w * (W_U[target] - W_U[foil]) / scale``, centred for a LayerNorm (which
centres its input, a linear map). The scale is read off the norm's own input and output at that
position, and an RMSNorm's weight off the norm itself (applied to a vector of ones), so
variants (Gemma's 1 + w, eps inside or outside) need no special case. A head's contribution
is ``z_h . (W_O^T u)_h``: ``W_O^T u`` is the vector-Jacobian product of the attention's output
projection, whatever module implements it (Linear, GPT-2's Conv1D)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["direct_attribution"]


def direct_attribution(
    values: dict[str, Any],
    token_ids: list[list[int]],
    modules: tuple[torch.nn.Module, torch.nn.Module, list[torch.nn.Module]],
    *,
    centered: bool,
    n_heads: int,
) -> dict[str, torch.Tensor]:
    """Per row: ``embed`` [n, 1], ``heads`` [n, layers * heads] (with ``o_proj`` modules),
    ``attn`` and ``mlps`` [n, layers], ``bias`` [n] (the attention output projections', the
    final norm's and the unembedding's), all float32 on the CPU. ``values``: the rows' final
    norm input and output, embedding, per layer attention part (head z, or attn_out) and
    mlp_out, each [n, width]."""
    norm, unembed, o_proj = modules
    weight = unembed.weight
    device = weight.device
    ids = torch.tensor(token_ids, device=device)
    direction = weight[ids[:, 0]].float()
    bias = torch.zeros(len(token_ids), device=device)
    if unembed.bias is not None:
        bias = bias + unembed.bias[ids[:, 0]].float()
    if ids.shape[1] == 2:
        direction = direction - weight[ids[:, 1]].float()
        if unembed.bias is not None:
            bias = bias - unembed.bias[ids[:, 1]].float()
    u, norm_bias = _through_norm(norm, values, direction, centered)
    bias = bias + (norm_bias * direction).sum(-1)

    def read(value: torch.Tensor) -> torch.Tensor:
        return (value.to(device).float() * u).sum(-1)

    out = {
        "embed": read(values["embed"])[:, None],
        "mlps": torch.stack([read(v) for v in values["mlps"]], -1),
    }
    if o_proj:
        per_layer = [
            _heads(o, z.to(device), u, n_heads) for o, z in zip(o_proj, values["attention"])
        ]
        out["heads"] = torch.cat([h for h, _ in per_layer], -1)
        bias = bias + sum(b for _, b in per_layer)
    else:
        out["attn"] = torch.stack([read(v) for v in values["attention"]], -1)
    out["bias"] = bias
    return {name: tensor.detach().cpu() for name, tensor in out.items()}


def _through_norm(
    norm: torch.nn.Module, values: dict[str, Any], direction: torch.Tensor, centered: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The direction each part is read along (``u``, [n, d_model]) and the norm's bias."""
    x = values["norm_in"].to(direction.device).float()
    y = values["norm_out"].to(direction.device).float()
    d_model = x.shape[-1]
    if centered:
        w = norm.weight.float() if getattr(norm, "weight", None) is not None else None
        b = norm.bias.float() if getattr(norm, "bias", None) is not None else None
        w = torch.ones(d_model, device=x.device) if w is None else w.to(x.device)
        b = torch.zeros(d_model, device=x.device) if b is None else b.to(x.device)
        x = x - x.mean(-1, keepdim=True)
    else:  # proportional to the effective weight: the factor cancels in the scale below
        probe = next(norm.parameters(), torch.empty(0)).dtype
        probe = probe if probe.is_floating_point else torch.float32
        with torch.inference_mode():
            ones = torch.ones(1, 1, d_model, dtype=probe, device=_device_of(norm, x))
            w = norm(ones).reshape(-1).float().to(x.device)
        b = torch.zeros(d_model, device=x.device)
    scale = (w * x).norm(dim=-1) / (y - b).norm(dim=-1)
    u = w * direction / scale[:, None]
    if centered:
        u = u - u.mean(-1, keepdim=True)
    return u, b


def _heads(
    o_proj: torch.nn.Module, z: torch.Tensor, u: torch.Tensor, n_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's contribution [n, heads] and the projection's bias term [n]."""
    dtype = next(o_proj.parameters()).dtype
    with torch.inference_mode(False), torch.enable_grad():
        zero = torch.zeros(z.shape, dtype=dtype, device=u.device, requires_grad=True)
        out = o_proj(zero)
        (back,) = torch.autograd.grad(out, zero, grad_outputs=u.to(out.dtype))
    per_head = (z.float() * back.float()).reshape(z.shape[0], n_heads, -1).sum(-1)
    return per_head, (out.detach().float() * u).sum(-1)


def _device_of(module: torch.nn.Module, fallback: torch.Tensor) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else fallback.device
