"""Labels of result axes, from a tensor's manifest entry: what the summary, heatmaps,
expectations and run comparisons print for a cell (``layer=3, pos=9: Mary``)."""

from __future__ import annotations

from typing import Any

from ..compile.templates import column_names, render

__all__ = ["axis_labels", "coords", "cell_label", "metric_label"]


def axis_labels(meta: dict[str, Any], axis: str) -> list[str]:
    """Display labels of a result axis from its manifest entry: token strings for a token axis,
    else the axis labels (``9: Mary``) when there are any, else the axis values."""
    if axis == "token":
        return [repr(t) for t in meta.get("token_strs", [])]
    labels = meta.get("axis_labels", {}).get(axis)
    if labels:
        return [str(label) for label in labels]
    return [str(v) for v in meta.get("axis_values", {}).get(axis) or []]


def coords(index: int, shape: tuple[int, ...]) -> list[int]:
    """The multi-index of flat (row-major) position ``index`` in a tensor of ``shape``."""
    out = []
    for size in reversed(shape):
        out.append(index % size)
        index //= size
    return list(reversed(out))


def cell_label(meta: dict[str, Any], axes: list[str], index: list[int]) -> str:
    """``layer=3, pos=9: Mary``: the labels of one cell's coordinates."""
    parts = []
    for axis, i in zip(axes, index):
        labels = axis_labels(meta, axis)
        parts.append(f"{axis}={labels[i] if i < len(labels) else i}")
    return ", ".join(parts)


def metric_label(meta: dict[str, Any], manifest: dict[str, Any], shown: int = 2) -> str | None:
    """What a metric's value is (``prob of ' Paris'``), its dataset columns rendered for the
    first ``shown`` items (``logit_diff(' Mary' - ' John'), ... (16 items)``); a template whose
    items are not recorded is marked ``per item``."""
    label = meta.get("label")
    if not label or not column_names(label):
        return label
    items = (manifest.get("dataset") or {}).get("items")
    if not isinstance(items, list) or not items:
        return f"{label} per item"
    rendered = [render(label, row) for row in items[:shown]]
    more = f", ... ({len(items)} items)" if len(items) > shown else ""
    return ", ".join(rendered) + more
