"""Joining the outputs of a run in blocks of items (see :mod:`specsight.compile.blocks`).

Each block's engine output (per-item values, not yet aggregated) is kept on the host; at the end
the tensors that have an ``item`` axis are joined along it, those of invokes that run once are
taken from the first block, and the joined metrics are aggregated as one run's would be. A
value that is padded per block (saved positions of prompts of different lengths) is padded to
the longest over all blocks.
"""

from __future__ import annotations

import torch

from ..plan import Plan
from .execute import EngineOutput, finish_metrics

__all__ = ["BlockJoin"]


def _item_axes(plan: Plan) -> dict[str, int]:
    """Result tensor name -> its ``item`` axis, for the tensors of invokes over the dataset."""
    over = plan.item_invokes
    axes: dict[str, int] = {}
    for metric in plan.metrics:
        if metric.invoke in over and "item" in metric.axes:
            axis = metric.axes.index("item")
            for name in (metric.name, *(f"{metric.name}/{c}" for c in metric.companions)):
                axes[name] = axis
    for save in plan.saves:
        if save.invoke in over and "item" in save.axes:
            axes[save.name] = save.axes.index("item")
    return axes


def _join(parts: list[torch.Tensor], axis: int) -> torch.Tensor:
    """``parts`` concatenated along ``axis``, each padded on its other axes to the largest
    (NaN for floating values, 0 otherwise)."""
    longest = [max(p.shape[d] for p in parts) for d in range(parts[0].dim())]
    padded = []
    for part in parts:
        if all(part.shape[d] == longest[d] or d == axis for d in range(part.dim())):
            padded.append(part)
            continue
        shape = [part.shape[axis] if d == axis else n for d, n in enumerate(longest)]
        fill = float("nan") if part.is_floating_point() else 0
        full = torch.full(shape, fill, dtype=part.dtype)
        full[tuple(slice(0, n) for n in part.shape)] = part
        padded.append(full)
    return torch.cat(padded, dim=axis)


class BlockJoin:
    """Collects the blocks' outputs in item order; :meth:`finish` joins them."""

    def __init__(self) -> None:
        self.first: EngineOutput | None = None
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.item_axes: dict[str, int] = {}
        self.forwards = 0
        self.rows = 0
        self.blocks = 0

    def add(self, plan: Plan, out: EngineOutput) -> None:
        """Keep one block's per-item tensors (and all of the first block's output)."""
        if self.first is None:
            self.first = out
            self.item_axes = _item_axes(plan)
        for tensors in (out.metrics, out.saves):
            for name, tensor in tensors.items():
                if name in self.item_axes:
                    self.parts.setdefault(name, []).append(tensor.cpu())
        if self.first is not out:  # the run's timings: every block's, summed
            for key, seconds in out.timings.items():
                self.first.timings[key] = self.first.timings.get(key, 0.0) + seconds
        self.forwards += len(plan.forwards)
        self.rows += len(plan.rows)
        self.blocks += 1

    def finish(self, whole: Plan) -> EngineOutput:
        """The run's output: per-item tensors joined, metrics aggregated over every item."""
        if self.first is None:
            raise ValueError("no block was run")
        out = self.first
        for name, parts in self.parts.items():
            target = out.metrics if name in out.metrics else out.saves
            target[name] = _join(parts, self.item_axes[name])
        out.metrics = finish_metrics(whole, out.metrics)
        out.counts = {"rows": self.rows, "forwards": self.forwards, "blocks": self.blocks}
        return out
