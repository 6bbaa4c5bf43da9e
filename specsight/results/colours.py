"""One colour convention for every view of a run (the HTML page, inline notebook tables and
the PNG heatmaps): a diverging scale, blue below its centre, white at it, red above, centred
on the metric's baseline (or 0 for signed data); a sequential scale for data of one sign."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DIVERGING", "SEQUENTIAL", "colour_scale", "css_colour", "matplotlib_cmap"]

#: blue, white, red (report.js holds the same stops)
DIVERGING = ((33, 102, 172), (247, 247, 247), (178, 24, 43))
#: pale yellow to dark blue
SEQUENTIAL = ((255, 255, 217), (161, 218, 180), (65, 182, 196), (34, 94, 168), (8, 29, 88))


def colour_scale(
    meta: dict[str, Any], data: Any, effect: Any | None, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Where the diverging scale is white (``center``, None: a sequential scale) and what the
    key calls that point (``center_label``): the baseline (0 for a recovery), a scalar
    baseline metric's value, else 0 of the effect (``colour``: colour the cells by it) or of
    signed data. Data of one sign, such as probabilities, gets the sequential scale."""
    if meta.get("baseline") is not None:
        return {"center": float(meta["baseline"]), "center_label": "baseline"}
    name = meta.get("baseline_metric") or ""
    base = metrics.get(name)
    if base is not None and base.numel() == 1 and math.isfinite(float(base)):
        return {"center": float(base), "center_label": name}
    if effect is not None:
        return {"center": 0.0, "colour": effect, "center_label": f"no change from {name}"}
    finite = data[data.isfinite()]
    signed = finite.numel() and float(finite.min()) < 0 < float(finite.max())
    # a kind whose values are signed around 0 gets a diverging scale centred on 0
    return {"center": 0.0 if signed or meta.get("signed") else None, "center_label": None}


def css_colour(stops: tuple[tuple[int, int, int], ...], t: float) -> str:
    """The colour at ``t`` in [0, 1] along ``stops`` as CSS ``rgb(...)``."""
    t = max(0.0, min(1.0, t)) * (len(stops) - 1)
    i = min(len(stops) - 2, int(math.floor(t)))
    f = t - i
    mixed = [round(lo + (hi - lo) * f) for lo, hi in zip(stops[i], stops[i + 1])]
    return f"rgb({mixed[0]},{mixed[1]},{mixed[2]})"


def matplotlib_cmap(diverging: bool) -> Any:
    """The same scale as a matplotlib colormap."""
    from matplotlib.colors import LinearSegmentedColormap

    stops = DIVERGING if diverging else SEQUENTIAL
    colours = [tuple(c / 255 for c in stop) for stop in stops]
    return LinearSegmentedColormap.from_list(
        "specsight-diverging" if diverging else "specsight-sequential", colours
    )
