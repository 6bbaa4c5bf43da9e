"""A run as static HTML for a notebook cell (``Results._repr_html_``): the verdicts on the
spec's claims, then each metric (a value with its stderr, a strip along one axis, a coloured
grid over two), then what was saved; the run's facts folded below.

No script and no external resource: Jupyter shows it as is, trusted or not, and it survives
a notebook exported to HTML. Colours follow :mod:`specsight.results.colours`, as the page
and the PNGs do.
"""

from __future__ import annotations

import html
import math
from typing import Any

from .colours import DIVERGING, SEQUENTIAL, colour_scale, css_colour
from .frames import companions, named_axes, primary_metrics
from .labels import axis_labels, metric_label
from .summary import RunView, _over

__all__ = ["render_inline"]

#: cells of a grid shown inline (the rest: to_pandas / to_xarray / the report)
MAX_ROWS, MAX_COLUMNS = 40, 40

_STYLE = (
    "<style>.ss-run{font-family:system-ui,sans-serif;font-size:13px}"
    ".ss-run table{border-collapse:collapse;margin:4px 0 10px}"
    ".ss-run td,.ss-run th{padding:2px 6px;text-align:right;font-variant-numeric:tabular-nums}"
    ".ss-run .ss-grid td{min-width:34px;font-size:11px}"
    ".ss-run .ok{color:#1a7f37}.ss-run .fail{color:#cf222e;font-weight:bold}"
    ".ss-run .note{color:#666}</style>"
)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: float) -> str:
    if not math.isfinite(value):
        return "nan"
    size = abs(value)
    if size != 0 and (size < 1e-3 or size >= 1e4):
        return f"{value:.2e}"
    return f"{value:+.3f}" if size < 1 else f"{value:+.2f}"


def _colour(scale: dict[str, Any], lo: float, hi: float) -> Any:
    """A function from a value to its CSS background."""
    centre = scale["center"]
    if centre is not None:
        span = max(abs(hi - centre), abs(lo - centre)) or 1.0
        return lambda v: css_colour(DIVERGING, 0.5 + (v - centre) / (2 * span))
    width = (hi - lo) or 1.0
    return lambda v: css_colour(SEQUENTIAL, (v - lo) / width)


def _grid(results: RunView, name: str, tensor: Any, meta: dict[str, Any], extra: dict) -> str:
    """A metric over one or two axes as a table of coloured cells (a hover shows the value and
    its stderr)."""
    _, axes, _ = named_axes(results, name)  # type: ignore[arg-type]
    grid = (
        tensor.double().reshape(tensor.shape[0], -1) if tensor.ndim == 2 else tensor.double()[None]
    )
    effect = extra.get("effect")
    effect = effect.double().reshape(grid.shape) if effect is not None else None
    scale = colour_scale(meta, grid, effect, results.metrics)
    # the effect colours the cells only where the scale says so (not beside a scalar baseline
    # metric, whose value is then the centre of the values themselves), as on the page
    colour_by = effect if "colour" in scale else grid
    finite = colour_by[colour_by.isfinite()]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    paint = _colour(scale, lo, hi)
    stderr = extra.get("stderr")
    stderr = stderr.double().reshape(grid.shape) if stderr is not None else None
    row_axis, col_axis = (axes[0], axes[1]) if tensor.ndim == 2 else ("", axes[0])
    rows = axis_labels(meta, row_axis) if row_axis else [""]
    cols = axis_labels(meta, col_axis)
    n_rows, n_cols = min(grid.shape[0], MAX_ROWS), min(grid.shape[1], MAX_COLUMNS)
    head = f"<th>{_e(row_axis)} \\ {_e(col_axis)}</th>" if row_axis else f"<th>{_e(col_axis)}</th>"
    head += "".join(f"<th>{_e(cols[c] if c < len(cols) else c)}</th>" for c in range(n_cols))
    body = []
    for r in range(n_rows):
        cells = [f"<th>{_e(rows[r] if r < len(rows) else r)}</th>"]
        for c in range(n_cols):
            value, shade = float(grid[r, c]), float(colour_by[r, c])
            tip = _num(value) + (f" ± {float(stderr[r, c]):.3g}" if stderr is not None else "")
            background = paint(shade) if math.isfinite(shade) else "#bbb"
            dark = scale["center"] is None and (shade - lo) / ((hi - lo) or 1.0) > 0.6
            colour = ";color:#fff" if dark else ""
            cells.append(
                f'<td style="background:{background}{colour}" title="{_e(tip)}">{_num(value)}</td>'
            )
        body.append(f"<tr>{''.join(cells)}</tr>")
    cut = ""
    if grid.shape[0] > n_rows or grid.shape[1] > n_cols:
        cut = (
            f'<div class="note">showing {n_rows} x {n_cols} of {grid.shape[0]} x {grid.shape[1]}'
            " cells: the rest in results.to_pandas() or the report</div>"
        )
    key = ""
    if scale["center"] is not None:
        what = f" ({scale['center_label']})" if scale.get("center_label") else ""
        key = f"white at {_num(scale['center'])}{_e(what)}, red above, blue below"
        if "colour" in scale:
            key = f"coloured by the effect: {key}"
    return f'<table class="ss-grid"><tr>{head}</tr>{"".join(body)}</table>{cut}' + (
        f'<div class="note">{key}</div>' if key else ""
    )


def _metric(results: RunView, name: str) -> str:
    tensor = results.metrics[name]
    meta = results.manifest.get("tensors", {}).get(name, {})
    extra = companions(results, name)  # type: ignore[arg-type]
    title = f"<b>{_e(name)}</b>{_e(_over(meta))}"
    label = metric_label(meta, results.manifest)
    if label:
        title += f' <span class="note">{_e(label)}</span>'
    if tensor.ndim == 0:
        value = _num(float(tensor))
        if "stderr" in extra:
            value += f" ± {float(extra['stderr']):.3g}"
        if "effect" in extra:
            value += f" (effect {_num(float(extra['effect']))} vs {meta.get('baseline_metric')})"
        return f"<div>{title} = <code>{_e(value)}</code></div>"
    if tensor.ndim <= 2 and tensor.is_floating_point():
        return f"<div>{title}</div>" + _grid(results, name, tensor, meta, extra)
    axes = " x ".join(meta.get("axes", []))
    return (
        f'<div>{title} <span class="note">shape {list(tensor.shape)} ({_e(axes)}): '
        f"results.to_xarray()['{_e(name)}']</span></div>"
    )


def _claims(results: RunView) -> str:
    if not results.expectations:
        return ""
    items = []
    for o in results.expectations:
        cls, mark = ("ok", "ok") if o.ok else ("fail", "FAIL")
        message = f" &mdash; {_e(o.message)}" if o.message else ""
        detail = f'<div class="note">{_e(o.detail)}</div>' if o.detail and not o.ok else ""
        items.append(
            f'<li><span class="{cls}">{mark}</span> <code>{_e(o.claim)}</code>{message}'
            f' <span class="note">{_e(o.location)}</span>{detail}</li>'
        )
    return f"<ul>{''.join(items)}</ul>"


def _facts(results: RunView) -> str:
    m = results.manifest
    model, plan, timings = m.get("model", {}), m.get("plan", {}), m.get("timings", {})
    rows = [
        ("model", f"{model.get('id')} ({model.get('dtype')}, {model.get('device')})"),
        ("rows", f"{plan.get('rows', '?')} in {plan.get('forwards', '?')} forwards"),
        ("time", ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in timings.items())),
        ("spec sha256", m.get("spec", {}).get("sha256")),
        ("created", m.get("created")),
    ]
    if results.saves:
        saved = ", ".join(f"{n} {list(t.shape)}" for n, t in results.saves.items())
        rows.append(("saved", saved))
    cells = "".join(
        f"<tr><th>{_e(k)}</th><td style='text-align:left'>{_e(v)}</td></tr>" for k, v in rows
    )
    return f"<details><summary>run</summary><table>{cells}</table></details>"


def render_inline(results: RunView) -> str:
    """The run as one HTML fragment for a notebook."""
    spec = results.manifest.get("spec", {})
    title = spec.get("name") or spec.get("file") or "run"
    model = results.manifest.get("model", {}).get("id")
    verdict = ""
    if results.expectations:
        held = sum(o.ok for o in results.expectations)
        cls = "ok" if held == len(results.expectations) else "fail"
        verdict = f' <span class="{cls}">expect {held}/{len(results.expectations)} held</span>'
    parts = [f"<div><b>{_e(title)}</b> on {_e(model)}{verdict}</div>", _claims(results)]
    parts += [_metric(results, name) for name in primary_metrics(results)]  # type: ignore[arg-type]
    parts.append(_facts(results))
    return f'{_STYLE}<div class="ss-run">{"".join(parts)}</div>'
