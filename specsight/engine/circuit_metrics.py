"""The engine's side of the circuit metrics (:mod:`specsight.plan.metrics.circuits`): their
items handed to :mod:`.edges`, a circuit's edges picked from scores, and faithfulness with
its bootstrap interval over items."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .edges import Items, ablated_metrics, edge_mask, edge_scores

__all__ = ["circuit_scores", "circuit_faithfulness", "ranked", "top_edges"]

#: items per forward of a circuit metric
BATCH = 8


def _items(record: Any) -> Items:
    return Items(
        clean=record.clean_tokens,
        corrupt=record.corrupt_tokens,
        positions=record.positions,
        target=record.targets,
        foil=record.foils,
    )


def circuit_scores(model: torch.nn.Module, record: Any, checkpoint: Callable[[], None] | None) -> torch.Tensor:  # fmt: skip
    """An edge_attribution metric's ``[upstream, downstream]`` scores."""
    return edge_scores(
        model,
        record.graph,
        _items(record),
        steps=record.steps,
        batch=BATCH,
        per_token=record.per_token,
        checkpoint=checkpoint,
    )


def ranked(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The flat indices of the ``k`` edges of largest absolute score, strongest first (ties:
    the first in row-major order; NaN, no edge, last): how a circuit is picked from scores
    (``[n_up, n_down]``, or per position ``[pos, n_up, n_down]``)."""
    flat = torch.nan_to_num(scores.float().abs().flatten(), nan=-1.0)
    return torch.sort(flat, descending=True, stable=True).indices[:k]


def top_edges(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The :func:`ranked` edges as a bool mask shaped like ``scores``."""
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    chosen[ranked(scores, k)] = True
    return chosen.reshape(scores.shape)


def _circuits(record: Any, scores: torch.Tensor | None) -> list[torch.Tensor]:
    graph = record.graph
    if scores is not None:
        return [top_edges(scores.float(), k) for k in record.sizes]
    per_token = bool(record.edges) and len(record.edges[0]) == 3
    shape = (len(record.clean_tokens[0]),) if per_token else ()
    chosen = torch.zeros((*shape, graph.n_up, graph.n_down), dtype=torch.bool)
    for edge in record.edges:
        chosen[(edge[2], *edge[:2]) if per_token else edge] = True
    return [chosen & edge_mask(graph)]


def circuit_faithfulness(
    model: torch.nn.Module,
    record: Any,
    scores: torch.Tensor | None,
    checkpoint: Callable[[], None] | None,
) -> dict[str, torch.Tensor]:
    """Faithfulness per circuit (mean with the circuit / mean of the full model) and its
    companions: bootstrap interval, the circuit's mean metric, the normalised faithfulness
    ((circuit - empty) / (full - empty)), the full model's and the empty circuit's mean."""
    circuits = _circuits(record, scores)
    per_item, full, empty = ablated_metrics(
        model,
        record.graph,
        _items(record),
        circuits,
        ablation=record.ablation,
        batch=BATCH,
        checkpoint=checkpoint,
    )
    per_item, full, empty = per_item.double(), full.double(), empty.double()
    n = full.numel()
    generator = torch.Generator().manual_seed(record.seed)
    picks = torch.randint(0, n, (record.n_boot, n), generator=generator)
    boot = per_item[:, picks].mean(-1) / full[picks].mean(-1)  # [circuits, n_boot]
    tail = (1 - record.level) / 2
    low = torch.quantile(boot, tail, dim=-1)
    high = torch.quantile(boot, 1 - tail, dim=-1)
    circuit_mean = per_item.mean(-1)
    full_mean, empty_mean = full.mean(), empty.mean()
    return {
        "": (circuit_mean / full_mean).float(),
        "ci_low": low.float(),
        "ci_high": high.float(),
        "circuit": circuit_mean.float(),
        "normalized": ((circuit_mean - empty_mean) / (full_mean - empty_mean)).float(),
        "full": full_mean.float(),
        "ablated": empty_mean.float(),
    }
