"""Heatmaps of metrics swept over two axes, written beside the results (matplotlib, Agg)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .labels import axis_labels

__all__ = ["write_heatmaps"]


def _labels(meta: dict[str, Any], axis: str, size: int) -> list[str]:
    labels = axis_labels(meta, axis)
    return labels if len(labels) == size else [str(i) for i in range(size)]


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png"


def write_heatmaps(metrics: dict[str, Any], manifest: dict[str, Any], folder: Path) -> list[Path]:
    """One PNG per metric with exactly two named axes; returns the files written."""
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
        finite = data[data == data]
        span = float(abs(finite).max()) if finite.size else 1.0
        diverging = finite.size and finite.min() < 0 < finite.max()
        image = ax.imshow(
            data,
            aspect="auto",
            cmap="RdBu" if diverging else "viridis",
            vmin=-span if diverging else None,
            vmax=span if diverging else None,
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
        plt.close(fig)
        written.append(path)
    return written
