"""Effects and aggregates. A metric with a baseline gets ``<name>/effect``, its value minus
the baseline's (item by item when the baseline has items). Aggregates over a metric's items: the statistic (mean, median or sum) replaces the
metric, and beside it go the per-item values (``<name>/items``), the standard error
(``<name>/stderr``) and, on request, a percentile bootstrap interval (``<name>/ci_low``,
``<name>/ci_high``).

The standard error of a mean is the sample standard deviation over sqrt(n), of a sum that
deviation times sqrt(n); a median's, and a recovery of means', is the standard deviation of
the seeded bootstrap's statistics. A recovery of means resamples the items of its three
inputs together (they are paired).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..plan import Plan, Reduce

__all__ = ["aggregate"]

_CHUNK = 100  # bootstrap resamples computed at once (bounds the memory they take)


def aggregate(plan: Plan, metrics: dict[str, torch.Tensor]) -> None:
    """Replace every reduced metric in ``metrics`` (per-row values, recoveries included) by its
    aggregate, adding the companions; inputs are read before any is replaced."""
    raw = dict(metrics)
    for metric in plan.metrics:
        baseline = getattr(metric, "baseline", None)
        if baseline is not None:  # per item when the baseline has items (broadcast)
            raw[f"{metric.name}/effect"] = raw[metric.name] - raw[baseline]
            metrics[f"{metric.name}/effect"] = raw[f"{metric.name}/effect"]
    for metric in plan.metrics:
        if metric.reduce is not None:
            _reduced(metric, metric.reduce, raw, metrics)


def _reduced(metric: Any, spec: Reduce, raw: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:  # fmt: skip
    if getattr(metric, "baseline", None) is not None:
        metrics[f"{metric.name}/effect"] = _plain(raw[f"{metric.name}/effect"], spec)(None)
    n = spec.size
    of_means = metric.reduces == "means"
    if of_means:
        statistic = metric.statistic(
            raw, lambda values, index: _reduce(_pick(values, index), spec.stat)
        )
    else:
        statistic = _plain(raw[metric.name], spec)
    value = statistic(None)
    metrics[metric.name] = value
    metrics[f"{metric.name}/items"] = raw[metric.name]
    for companion in metric.reduced_companions:
        key = f"{metric.name}/{companion}"
        metrics[key] = _plain(raw[key], spec)(None)
        metrics[f"{key}/items"] = raw[key]
    boot = None
    if spec.ci or spec.stat == "median" or of_means:
        boot = _bootstrap(statistic, n, spec)
    if spec.stat == "median" or of_means:
        stderr = boot.std(-1) if n > 1 else torch.full_like(value, math.nan)  # type: ignore[union-attr]
    else:
        items = raw[metric.name].float().movedim(spec.axis, -1)
        spread = items.std(-1) if n > 1 else torch.full_like(value, math.nan)
        stderr = spread / math.sqrt(n) if spec.stat == "mean" else spread * math.sqrt(n)
    metrics[f"{metric.name}/stderr"] = stderr.to(value.dtype)
    if spec.ci:
        tail = (1 - spec.level) / 2
        assert boot is not None
        low, high = torch.quantile(boot, torch.tensor([tail, 1 - tail]), dim=-1)
        metrics[f"{metric.name}/ci_low"] = low.to(value.dtype)
        metrics[f"{metric.name}/ci_high"] = high.to(value.dtype)


Statistic = Callable[[torch.Tensor | None], torch.Tensor]


def _reduce(values: torch.Tensor, stat: str) -> torch.Tensor:
    """The statistic over the last axis (a median halfway between the middle two values)."""
    if stat == "sum":
        return values.sum(-1)
    if stat == "mean":
        return values.mean(-1)
    ordered = values.sort(-1).values
    n = ordered.shape[-1]
    return (ordered[..., (n - 1) // 2] + ordered[..., n // 2]) / 2


def _pick(values: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Values (items last) at resampled item indices [B, n] -> [..., B, n]; all when None."""
    return values if index is None else values[..., index]


def _plain(items: torch.Tensor, spec: Reduce) -> Statistic:
    values = items.float().movedim(spec.axis, -1)

    def statistic(index: torch.Tensor | None) -> torch.Tensor:
        return _reduce(_pick(values, index), spec.stat)

    return statistic


def _bootstrap(statistic: Statistic, n: int, spec: Reduce) -> torch.Tensor:
    """The statistic on ``n_boot`` seeded resamples of the items: [..., n_boot]."""
    generator = torch.Generator().manual_seed(spec.seed)
    index = torch.randint(n, (spec.n_boot, n), generator=generator)
    chunks = [statistic(index[i : i + _CHUNK]) for i in range(0, len(index), _CHUNK)]
    return torch.cat(chunks, -1)
