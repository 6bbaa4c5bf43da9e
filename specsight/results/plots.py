"""Heatmaps of metrics swept over two axes, written beside the results (matplotlib, Agg) as
``<metric>.png`` and ``<metric>.svg``, with the cells as ``<metric>.csv`` (one row per cell:
both axes' values and labels, the value, and its stderr where there is one)."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from .colours import colour_scale, matplotlib_cmap
from .frames import coordinate
from .labels import axis_labels

__all__ = ["write_heatmaps"]


def _labels(meta: dict[str, Any], axis: str, size: int) -> list[str]:
    labels = axis_labels(meta, axis)
    return labels if len(labels) == size else [str(i) for i in range(size)]


def _file_name(name: str, suffix: str = ".png") -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + suffix


def _write_csv(
    path: Path, name: str, data: Any, meta: dict[str, Any], axes: list[str], stderr: Any
) -> None:
    rows, cols = data.shape
    row_labels, col_labels = _labels(meta, axes[0], rows), _labels(meta, axes[1], cols)
    row_values, col_values = coordinate(meta, axes[0], rows)[0], coordinate(meta, axes[1], cols)[0]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        header = [axes[0], f"{axes[0]}_label", axes[1], f"{axes[1]}_label", name]
        writer.writerow(header + (["stderr"] if stderr is not None else []))
        for r in range(rows):
            for c in range(cols):
                row = [row_values[r], row_labels[r], col_values[c], col_labels[c]]
                row.append(repr(float(data[r, c])))
                writer.writerow(row + ([repr(float(stderr[r, c]))] if stderr is not None else []))


def write_heatmaps(metrics: dict[str, Any], manifest: dict[str, Any], folder: Path) -> list[Path]:
    """A PNG, SVG and CSV per metric with exactly two named axes; returns the PNGs written."""
    plotted = []
    for name, tensor in metrics.items():
        meta = manifest.get("tensors", {}).get(name, {})
        axes = meta.get("axes", [])
        if meta.get("companion_of") or tensor.ndim != 2 or len(axes) != 2:
            continue
        plotted.append((name, tensor, meta, axes))
    if not plotted:
        return []
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    for name, tensor, meta, axes in plotted:
        data = tensor.float().numpy()
        rows, cols = data.shape
        fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * cols + 2.5), max(4.0, 0.28 * rows + 1.8)))
        scale = colour_scale(meta, tensor.double(), None, metrics)
        finite = data[data == data]
        centre = scale["center"]
        span = float(abs(finite - centre).max()) if finite.size and centre is not None else 1.0
        image = ax.imshow(
            data,
            aspect="auto",
            cmap=matplotlib_cmap(centre is not None),
            vmin=centre - (span or 1.0) if centre is not None else None,
            vmax=centre + (span or 1.0) if centre is not None else None,
            interpolation="nearest",
        )
        ax.set_xticks(
            range(cols), _labels(meta, axes[1], cols), rotation=60, ha="right", fontsize=8
        )
        ax.set_yticks(range(rows), _labels(meta, axes[0], rows), fontsize=8)
        ax.set_xlabel(axes[1])
        ax.set_ylabel(axes[0])
        spec_name = manifest.get("spec", {}).get("name") or ""
        ax.set_title(f"{name} ({spec_name})" if spec_name else name)
        fig.colorbar(image, ax=ax, label=name)
        fig.tight_layout()
        path = folder / _file_name(name)
        fig.savefig(path, dpi=110)
        fig.savefig(folder / _file_name(name, ".svg"))
        plt.close(fig)
        stderr = metrics.get(f"{name}/stderr")
        stderr = (
            stderr.float().numpy() if stderr is not None and stderr.shape == tensor.shape else None
        )
        _write_csv(folder / _file_name(name, ".csv"), name, data, meta, axes, stderr)
        written.append(path)
    return written
