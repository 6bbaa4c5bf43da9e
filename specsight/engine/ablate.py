"""Values the ablation ops write, computed once per run from what earlier stages captured:
a reference invoke's mean (per position or over every position), the empirical standard
deviation that scales noise, an orthonormal basis of the span a projection removes, and each
row's seeded Gaussian draw (made on the CPU, so every device gets the same numbers)."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["mean_value", "spread", "spread_key", "span_basis", "noise_draw", "project_out"]


def mean_value(captures: list[torch.Tensor], reduce: str) -> torch.Tensor:
    """The mean of captured rows ([positions, width] each): per position ([longest, width];
    a position is averaged over the rows that have it), or over rows and positions ([width])."""
    if reduce == "all":
        return torch.cat([c.double() for c in captures]).mean(0)
    longest = max(c.shape[0] for c in captures)
    total = torch.zeros(
        longest, captures[0].shape[-1], dtype=torch.float64, device=captures[0].device
    )
    count = torch.zeros(longest, 1, dtype=torch.float64, device=captures[0].device)
    for c in captures:
        total[: c.shape[0]] += c.double()
        count[: c.shape[0]] += 1
    return total / count


def spread(captures: list[torch.Tensor], cols: torch.Tensor | None) -> float:
    """The standard deviation of every value the rows hold at the site (in the chosen columns)."""
    values = torch.cat([c.double() if cols is None else c[:, cols].double() for c in captures])
    return float(values.std()) if values.numel() > 1 else math.nan


def spread_key(sources: tuple[str, ...], cols: Any) -> str:
    """Where a noise op's measured spread is found in ``EngineOutput.spreads``: its first
    source (a merged run's parts tag it, so a part finds its own) and its columns."""
    return f"{sources[0]}|{cols}"


def span_basis(vectors: list[torch.Tensor]) -> torch.Tensor:
    """An orthonormal basis of the vectors' span, [width, rank] (float64). Dependent vectors add
    nothing: directions below 1e-6 of the largest singular value are dropped (vectors written
    in float32 are dependent only to about that precision)."""
    stacked = torch.stack([v.double() for v in vectors])
    u, s, _ = torch.linalg.svd(stacked.T, full_matrices=False)
    if not len(s) or float(s[0]) == 0.0:
        raise ValueError("the vectors to project out are all zero")
    rank = int((s > s[0] * 1e-6).sum())
    return u[:, :rank]


def project_out(values: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``values`` ([..., width]) without their component in the basis' span."""
    exact = values.double()
    return (exact - (exact @ basis) @ basis.T).to(values.dtype)


def noise_draw(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal values of one row, from its own seed (float32, on the CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)
