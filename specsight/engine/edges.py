"""Edge attribution and edge ablation over a dataset's items, from batched forwards on the
component graph (:mod:`.circuit`).

* :func:`edge_scores`: EAP, ``(u_U(clean) - u_U(corrupt)) . d metric / d in_D`` summed over
  positions and averaged over items, the gradient taken on the clean run; EAP-IG averages the
  gradient over ``steps`` runs whose first-layer input is ``corrupt + k / steps * (clean -
  corrupt)``, k = 1..steps (so one step is EAP).
* :func:`ablated_metrics`: the metric of each item with the edges outside each circuit ablated
  (their upstream value replaced along that edge only, by the corrupt run's or a mean).

The metric is the logit difference (target - foil) at each item's position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..plan.graph import CircuitGraph
from .circuit import GraphForward
from .device import model_device

__all__ = ["Items", "edge_scores", "ablated_metrics", "edge_mask"]


@dataclass(frozen=True)
class Items:
    """The items of a circuit metric: clean and corrupt tokens (equal lengths per item), the
    position read and the target and foil token of each."""

    clean: Sequence[Sequence[int]]
    corrupt: Sequence[Sequence[int]]
    positions: Sequence[int]
    target: Sequence[int]
    foil: Sequence[int]

    def batches(self, size: int) -> list[range]:
        n = len(self.clean)
        return [range(i, min(n, i + size)) for i in range(0, n, size)]


def edge_mask(graph: CircuitGraph) -> torch.Tensor:
    """``[n_up, n_down]``: True where an edge joins the nodes."""
    up = torch.tensor([graph.up_layer(i) for i in range(graph.n_up)])
    down = torch.tensor([graph.down_layer(i) for i in range(graph.n_down)])
    up_layer, is_head = up[:, 0:1], up[:, 1:2].bool()
    down_layer, is_mlp = down[None, :, 0], down[None, :, 1].bool()
    return (up_layer < down_layer) | ((up_layer == down_layer) & is_head & is_mlp)


def _padded(tokens: Sequence[Sequence[int]], rows: range, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Right-padded ids and attention mask of some items (real tokens keep their positions)."""
    width = max(len(tokens[i]) for i in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, i in enumerate(rows):
        ids[j, : len(tokens[i])] = torch.tensor(list(tokens[i]))
        mask[j, : len(tokens[i])] = 1
    return ids.to(device), mask.to(device)


def _metric(logits: torch.Tensor, items: Items, rows: range) -> torch.Tensor:
    """Each item's logit difference at its position: ``[len(rows)]``, float32."""
    index = torch.arange(len(rows), device=logits.device)
    pos = torch.tensor([items.positions[i] for i in rows], device=logits.device)
    at = logits[index, pos].float()
    target = torch.tensor([items.target[i] for i in rows], device=logits.device)
    foil = torch.tensor([items.foil[i] for i in rows], device=logits.device)
    return at[index, target] - at[index, foil]


def _record(run: GraphForward, tokens: Sequence[Sequence[int]], rows: range, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Upstream outputs ``[B, P, n_up, d]`` (float32, zero past each item's tokens) and the
    attention mask of one batch of ``tokens``."""
    ids, mask = _padded(tokens, rows, device)
    with torch.no_grad():
        run.run(ids, mask)
        ups = run.upstream().float()
    return ups * mask[:, :, None, None], mask


def edge_scores(
    model: torch.nn.Module,
    graph: CircuitGraph,
    items: Items,
    *,
    steps: int,
    batch: int,
    per_token: bool = False,
    checkpoint: Callable[[], None] | None = None,
) -> torch.Tensor:
    """``[n_up, n_down]`` mean edge scores over the items (NaN where no edge joins the nodes);
    ``steps``: 1 for EAP, more for EAP-IG; ``per_token``: ``[pos, n_up, n_down]`` (items of
    one length)."""
    device = model_device(model)
    total: torch.Tensor | None = None
    with GraphForward(model, graph) as run:
        for rows in items.batches(batch):
            if checkpoint is not None:
                checkpoint()
            corrupt, mask = _record(run, items.corrupt, rows, device)
            ids, _ = _padded(items.clean, rows, device)
            grads, clean = None, None
            run.grad = True
            try:
                # the clean run first (k = steps): its upstream outputs are recorded on the way
                for k in [steps, *range(1, steps)]:
                    if k < steps:
                        assert clean is not None
                        run.embed_override = corrupt[:, :, 0] + k / steps * (clean - corrupt)[:, :, 0]  # fmt: skip
                    with torch.enable_grad():
                        value = _metric(run.run(ids, mask), items, rows).sum()
                        found = run.input_grads(value) / steps
                    grads = found if grads is None else grads + found
                    if k == steps:
                        clean = run.upstream().float() * mask[:, :, None, None]
            finally:
                run.grad, run.embed_override = False, None
            assert grads is not None and clean is not None
            diff = clean - corrupt
            # one [n_up, d] x [d, n_down] product per (item, position), summed (no copies:
            # padded positions have zero differences)
            flat_diff = diff.reshape(-1, graph.n_up, diff.shape[-1])
            flat_grad = grads.reshape(-1, graph.n_down, grads.shape[-1])
            products = torch.bmm(flat_diff, flat_grad.transpose(1, 2))
            products = products.reshape(len(rows), -1, graph.n_up, graph.n_down)
            summed = (products.sum(0) if per_token else products.sum((0, 1))).double().cpu()
            total = summed if total is None else total + summed
    assert total is not None
    scores = (total / len(items.clean)).float()
    return scores.masked_fill(~edge_mask(graph), float("nan"))


def ablated_metrics(
    model: torch.nn.Module,
    graph: CircuitGraph,
    items: Items,
    circuits: Sequence[torch.Tensor],
    *,
    ablation: str,
    batch: int,
    checkpoint: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per circuit and item ``[len(circuits), n]``, the full model's ``[n]``, the empty
    circuit's ``[n]``): the metric on the clean input with every edge outside the circuit
    (a bool ``[n_up, n_down]``) ablated, by the corrupt run's values (``corrupt``) or the mean
    over the items' clean runs and positions (``mean``)."""
    device = model_device(model)
    edges = edge_mask(graph).to(device)
    masks = [edges & ~c.to(device) for c in circuits] + [edges]
    n = len(items.clean)
    out = torch.zeros((len(masks), n))
    full = torch.zeros(n)
    with GraphForward(model, graph) as run:
        mean = _mean_upstream(run, items, batch, device) if ablation == "mean" else None
        for rows in items.batches(batch):
            if checkpoint is not None:
                checkpoint()
            if mean is None:
                values, _ = _record(run, items.corrupt, rows, device)
            else:
                values = mean
            ids, mask = _padded(items.clean, rows, device)
            with torch.inference_mode():
                full[list(rows)] = _metric(run.run(ids, mask), items, rows).cpu()
                for j, edge_mask_j in enumerate(masks):
                    run.ablate = (values, edge_mask_j)
                    try:
                        out[j, list(rows)] = _metric(run.run(ids, mask), items, rows).cpu()
                    finally:
                        run.ablate = None
    return out[:-1], full, out[-1]


def _mean_upstream(run: GraphForward, items: Items, batch: int, device: torch.device) -> torch.Tensor:  # fmt: skip
    """Each upstream node's mean output over the items' clean runs and real positions:
    ``[1, 1, n_up, d]``."""
    total, count = None, 0
    for rows in items.batches(batch):
        ups, mask = _record(run, items.clean, rows, device)
        summed = ups.sum((0, 1))
        total = summed if total is None else total + summed
        count += int(mask.sum())
    assert total is not None
    return (total / count)[None, None]
