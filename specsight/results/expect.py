"""Checking a spec's ``expect:`` claims against its results.

Each claim becomes an :class:`Outcome`: whether it held, where it is in the spec, what it
claims in words, and, when it failed, the expected value and the actual values of the first
failing cells (with their axis labels).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..plan import PlanExpectation
from .labels import axis_labels

__all__ = ["Outcome", "evaluate", "describe"]

_SHOWN_CELLS = 5


@dataclass(frozen=True)
class Outcome:
    """The verdict on one expectation."""

    index: int
    ok: bool
    location: str
    claim: str
    detail: str = ""
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        text = f"{mark} {self.location}: {self.claim}"
        if self.message:
            text += f" ({self.message})"
        if not self.ok and self.detail:
            text += f"\n     {self.detail}"
        return text


def _where_text(exp: PlanExpectation, meta: dict[str, Any]) -> str:
    parts = []
    for axis, chosen in zip(exp.axes, exp.select):
        if chosen is None:
            continue
        values = axis_labels(meta, axis)
        shown = [str(values[i]) if i < len(values) else str(i) for i in chosen]
        text = (
            shown[0]
            if len(shown) == 1
            else f"{shown[0]}..{shown[-1]}"
            if len(shown) > 4
            else ",".join(shown)
        )
        parts.append(f"{axis}={text}")
    return f"[{', '.join(parts)}]" if parts else ""


def describe(exp: PlanExpectation, meta: dict[str, Any] | None = None) -> str:
    """The claim in words: ``logit_diff[layer=0..18, pos=9] > 5 (all cells)``."""
    target = exp.target + _where_text(exp, meta or {})
    checks = exp.checks
    said = []
    if "equals" in checks:
        said.append(f"== {checks['equals']}")
    if "approx" in checks:
        said.append(f"~= {checks['approx']} (rtol {checks['rtol']}, atol {checks['atol']})")
    if "greater_than" in checks:
        said.append(f"> {checks['greater_than']}")
    if "less_than" in checks:
        said.append(f"< {checks['less_than']}")
    if "argmax" in checks:
        said.append(f"has top token {exp.token_str!r}")
    if "top_k" in checks:
        said.append(f"has {exp.token_str!r} among its top tokens")
    quantifier = " (all cells)" if exp.over == "all" else " (any cell)"
    return f"{target} {' and '.join(said)}" + (quantifier if _cells(exp, meta) != 1 else "")


def _cells(exp: PlanExpectation, meta: dict[str, Any] | None) -> int | None:
    shape = (meta or {}).get("shape")
    if shape is None:
        return None
    count = 1
    for size, chosen in zip(shape, exp.select):
        count *= len(chosen) if chosen is not None else size
    return count


def _select(tensor: torch.Tensor, select: tuple) -> tuple[torch.Tensor, list[list[int]]]:
    kept: list[list[int]] = []
    for dim, chosen in enumerate(select):
        if dim >= tensor.ndim:
            break
        if chosen is None:
            kept.append(list(range(tensor.shape[dim])))
            continue
        tensor = tensor.index_select(dim, torch.tensor(chosen, dtype=torch.long))
        kept.append(list(chosen))
    return tensor, kept


def _mask(
    exp: PlanExpectation, tensors: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Per cell: did every check pass; also the values shown for failing cells."""
    checks = exp.checks
    values = tensors[exp.target].detach().float()
    cell_dims = len(exp.axes)  # a top_k's trailing k axis is not a cell axis
    values, kept = _select(values, exp.select)
    mask = torch.ones(values.shape[:cell_dims], dtype=torch.bool)
    shown = values
    numeric = {
        k: v for k, v in checks.items() if k in ("equals", "approx", "greater_than", "less_than")
    }
    if numeric:
        ok = torch.ones_like(values, dtype=torch.bool)
        if "equals" in numeric:
            ok &= values == torch.tensor(numeric["equals"], dtype=values.dtype)
        if "approx" in numeric:
            expected = torch.tensor(numeric["approx"], dtype=values.dtype)
            ok &= (values - expected).abs() <= checks["atol"] + checks["rtol"] * expected.abs()
        if "greater_than" in numeric:
            ok &= values > numeric["greater_than"]
        if "less_than" in numeric:
            ok &= values < numeric["less_than"]
        while ok.ndim > mask.ndim:
            ok = ok.all(-1)
        mask &= ok
    if "argmax" in checks or "top_k" in checks:
        if exp.token_source == "ids":  # the top tokens, in the ``/ids`` companion
            ids, _ = _select(tensors[f"{exp.target}/ids"], exp.select)
            if "argmax" in checks:
                mask &= ids[..., 0] == exp.token_id
            if "top_k" in checks:
                mask &= (ids == exp.token_id).any(-1)
        else:  # argmax among the metric's own tokens (the last axis)
            winners = values.argmax(-1)
            mask = mask.all(-1) if mask.ndim > winners.ndim else mask
            mask &= winners == exp.token_index
            shown = winners.float()
    return mask, shown, kept


def _failing_cells(
    exp: PlanExpectation,
    mask: torch.Tensor,
    shown: torch.Tensor,
    kept: list[list[int]],
    meta: dict[str, Any],
) -> str:
    bad = (~mask).nonzero().tolist()
    parts = []
    for coords in bad[:_SHOWN_CELLS]:
        where = []
        for dim, i in enumerate(coords):
            axis = exp.axes[dim] if dim < len(exp.axes) else f"dim{dim}"
            labels = axis_labels(meta, axis)
            original = kept[dim][i] if dim < len(kept) else i
            where.append(f"{axis}={labels[original] if original < len(labels) else original}")
        value = shown[tuple(coords)]
        value_text = (
            f"{float(value):.4g}"
            if value.numel() == 1
            else str([round(float(v), 4) for v in value.flatten()[:5]])
        )
        parts.append(f"{', '.join(where) or 'value'}: {value_text}")
    more = f" (and {len(bad) - _SHOWN_CELLS} more)" if len(bad) > _SHOWN_CELLS else ""
    return f"{len(bad)} of {mask.numel()} cell(s) fail: " + "; ".join(parts) + more


def evaluate(
    expectations: tuple[PlanExpectation, ...] | list[PlanExpectation],
    tensors: Mapping[str, torch.Tensor],
    tensors_meta: dict[str, dict[str, Any]],
) -> list[Outcome]:
    """Check every expectation against a run's tensors (by name) and their manifest entries."""
    outcomes = []
    for exp in expectations:
        meta = tensors_meta.get(exp.target, {})
        claim = describe(exp, meta)
        mask, shown, kept = _mask(exp, tensors)
        ok = bool(mask.all()) if exp.over == "all" else bool(mask.any())
        detail = "" if ok else _failing_cells(exp, mask, shown, kept, meta)
        if not ok and exp.over == "any":
            detail = "no cell passes; " + detail
        outcomes.append(Outcome(exp.index, ok, exp.location, claim, detail, exp.message))
    return outcomes
