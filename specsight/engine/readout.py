"""Reading results out of a run: metric values from logits, the logit lens, and saved values
assembled from per-row pieces (padded with NaN where prompts differ in length)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import RunError
from ..plan import Forward

__all__ = ["assemble", "logit_lens", "metric_rows", "metric_values", "read_metric"]


def metric_values(
    kind: str, logits: torch.Tensor, tokens: tuple[int, ...] | torch.Tensor, k: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A metric of each row's logits ([rows, vocab]); ``tokens`` are the ids every row reads,
    or an [rows, n] tensor of each row's own (a dataset's per-item answers)."""
    logits = logits.float()

    def pick(values: torch.Tensor) -> torch.Tensor:
        if isinstance(tokens, torch.Tensor):
            return values.gather(1, tokens)
        return values[:, list(tokens)]

    if kind == "logits":
        return pick(logits), None
    if kind == "logprob":
        return pick(torch.log_softmax(logits, -1)), None
    if kind == "prob":
        return pick(torch.softmax(logits, -1)), None
    if kind == "logit_diff":
        both = pick(logits)
        return both[:, 0] - both[:, 1], None
    if kind == "accuracy":  # the target is the top token (torch's argmax: the first of ties)
        if isinstance(tokens, torch.Tensor):
            target = tokens[:, 0]
        else:
            target = torch.full((logits.shape[0],), tokens[0], device=logits.device)
        return (logits.argmax(-1) == target).float(), None
    if kind == "top_k":
        if (k or 10) > logits.shape[-1]:
            raise RunError(
                f"top_k asks for {k or 10} outputs but the model returns {logits.shape[-1]}",
                hint=f"use k <= {logits.shape[-1]}",
            )
        probs, ids = torch.softmax(logits, -1).topk(k or 10, dim=-1)
        return probs, ids
    raise RunError(f"unknown metric kind '{kind}'")


def metric_rows(
    metric: Any,
    kind: str,
    slots: dict[int, int],
    forward: Forward,
    logits: torch.Tensor,
    column: Callable[[int], int],
    rows: tuple[Any, ...] = (),
    references: dict[tuple[int, int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """A metric's values on the rows of this forward it reads: (values, token ids or None,
    the rows' slots in the metric's result), or None when it reads none of them. ``rows``
    (the plan's) give a loss its tokens; ``references`` a kl its reference distributions."""
    picked = [(i, row) for i, row in enumerate(forward.rows) if row in slots]
    if not picked:
        return None
    device = logits.device
    local = torch.tensor([i for i, _ in picked], device=device)
    pos = torch.tensor([column(metric.positions[slots[row]]) for _, row in picked], device=device)
    index = torch.tensor([slots[row] for _, row in picked])
    if kind == "kl":
        assert references is not None
        reference = torch.stack(
            [
                references[
                    (metric.reference_rows[slots[row]], metric.reference_positions[slots[row]])
                ]
                for _, row in picked
            ]
        ).to(device)
        logp = torch.log_softmax(logits[local, pos].float(), -1)
        return (reference.exp() * (reference - logp)).sum(-1), None, index
    if kind == "loss":
        return (
            torch.stack([_loss(rows[row].tokens, logits[i], column) for i, row in picked]),
            None,
            index,
        )
    tokens: tuple[int, ...] | torch.Tensor = metric.tokens
    if metric.row_tokens:
        tokens = torch.tensor([metric.row_tokens[slots[row]] for _, row in picked], device=device)
    values, token_ids = metric_values(kind, logits[local, pos], tokens, metric.k)
    return values, token_ids, index


def _loss(
    tokens: tuple[int, ...], logits: torch.Tensor, column: Callable[[int], int]
) -> torch.Tensor:
    """The mean cross-entropy of a row's next-token predictions (NaN for a one-token row)."""
    if len(tokens) < 2:
        return torch.tensor(float("nan"), device=logits.device)
    cols = torch.tensor([column(p) for p in range(len(tokens) - 1)], device=logits.device)
    logp = torch.log_softmax(logits[cols].float(), -1)
    targets = torch.tensor(tokens[1:], device=logits.device)
    return -logp.gather(1, targets[:, None]).mean()


def read_metric(
    metric: Any,
    slots: dict[int, int],
    forward: Forward,
    logits: torch.Tensor,
    column: Callable[[int], int],
    buffers: dict[str, torch.Tensor],
    rows: tuple[Any, ...] = (),
    references: dict[tuple[int, int], torch.Tensor] | None = None,
) -> None:
    """Compute one metric for the rows of this forward into its result buffer."""
    picked = metric_rows(metric, metric.kind, slots, forward, logits, column, rows, references)
    if picked is None:
        return
    values, token_ids, index = picked
    for name, tensor in ((metric.name, values), (f"{metric.name}/ids", token_ids)):
        if tensor is None:
            continue
        if name not in buffers:
            buffers[name] = torch.empty((len(metric.rows), *tensor.shape[1:]), dtype=tensor.dtype)
        buffers[name][index] = tensor.cpu()


def logit_lens(
    metric: Any, store: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module]
) -> dict[str, torch.Tensor]:
    """Decode stored residuals through the final norm and unembedding (after hooks are gone)."""
    norm, unembed = (modules[name] for name in metric.lens_modules)
    hidden = torch.cat([store[key] for key in metric.store_keys])
    with torch.inference_mode():
        normed = norm(hidden.unsqueeze(0))
        weight = next(unembed.parameters(), None)
        if weight is not None:  # some norms (Mamba's) return float32 from bf16 inputs
            normed = normed.to(weight.dtype)
        probs = torch.softmax(unembed(normed)[0].float(), -1)
    top_probs, top_ids = probs.topk(metric.k or 5, dim=-1)
    shape = (*metric.shape, len(metric.sites))
    if metric.row_tokens:  # each row's own token, for each of its sites
        ids = torch.tensor([t[0] for t in metric.row_tokens]).repeat_interleave(len(metric.sites))
        headline = probs.gather(1, ids.to(probs.device)[:, None])[:, 0]
    elif metric.tokens:
        headline = probs[:, metric.tokens[0]]
    else:
        headline = top_probs[:, 0]
    return {
        metric.name: headline.cpu().reshape(shape),
        f"{metric.name}/ids": top_ids.cpu().reshape(*shape, -1),
        f"{metric.name}/probs": top_probs.cpu().reshape(*shape, -1),
    }


def to_host(store: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The store on the CPU, copied in one transfer per dtype rather than one per value (each
    device-to-host copy waits for the device)."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key, value in store.items():
        if value.device.type != "cpu":
            by_dtype.setdefault(value.dtype, []).append(key)
    if not by_dtype:
        return store
    out = dict(store)
    for keys in by_dtype.values():
        flat = torch.cat([store[key].detach().reshape(-1) for key in keys]).cpu()
        offset = 0
        for key in keys:
            size = store[key].numel()
            out[key] = flat[offset : offset + size].view(store[key].shape)
            offset += size
    return out


def assemble(
    keys: tuple[str, ...], shape: tuple[int, ...], store: dict[str, torch.Tensor]
) -> torch.Tensor:
    pieces = [
        store[key].float().cpu()
        if store[key].dtype in (torch.bfloat16, torch.float16)
        else store[key].cpu()
        for key in keys
    ]
    # pieces differ in positions (prompts of different lengths) and, for attention patterns,
    # in keys: pad every axis to the longest with NaN
    longest = [max(sizes) for sizes in zip(*(p.shape for p in pieces))]
    if len(pieces) == 1:
        stacked = pieces[0].unsqueeze(0)
    elif any(list(p.shape) != longest for p in pieces):
        padded = torch.full((len(pieces), *longest), float("nan"), dtype=pieces[0].dtype)
        for i, piece in enumerate(pieces):
            padded[(i, *(slice(0, n) for n in piece.shape))] = piece
        stacked = padded
    else:
        stacked = torch.stack(pieces)
    return stacked.reshape(*shape, *stacked.shape[1:]) if shape else stacked[0]
