"""The terminal summary of a run: next tokens per invoke, metric values, tables for sweeps."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from .results import Results

__all__ = ["render_summary", "print_summary"]

_MAX_TABLE_CELLS = 1200


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "nan"
    return f"{value:+.3f}" if abs(value) < 100 else f"{value:+.1f}"


def _shorten(text: str, limit: int = 70) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _labels(meta: dict[str, Any], axis: str) -> list[str]:
    labels = meta.get("axis_labels", {}).get(axis)
    if labels:
        return [str(label) for label in labels]
    return [str(v) for v in meta.get("axis_values", {}).get(axis, [])]


def _cell_style(value: float, lo: float, hi: float) -> str:
    if value != value or hi <= lo:
        return ""
    # Diverging colours around zero when the data straddles it, else a single ramp.
    if lo < 0 < hi:
        scale = value / (hi if value > 0 else -lo)
        return "green" if scale > 0.5 else ("red" if scale < -0.5 else "")
    frac = (value - lo) / (hi - lo)
    return "bold green" if frac > 0.75 else ("dim" if frac < 0.25 else "")


def _grid_table(name: str, tensor: Any, meta: dict[str, Any]) -> Table:
    axes = meta.get("axes", [])
    rows_label, cols_label = _labels(meta, axes[0]), _labels(meta, axes[1])
    data = tensor.float()
    lo, hi = float(data.nan_to_num(0).min()), float(data.nan_to_num(0).max())
    table = Table(title=f"{name}  [{axes[0]} x {axes[1]}]", title_justify="left", pad_edge=False, box=None)
    table.add_column(f"{axes[0]}\\{axes[1]}", justify="right", style="bold")
    for label in cols_label:
        table.add_column(_shorten(label, 10), justify="right")
    for i, row_label in enumerate(rows_label):
        cells = [Text(_fmt(float(v)), style=_cell_style(float(v), lo, hi)) for v in data[i]]
        table.add_row(row_label, *cells)
    return table


def _strongest(name: str, tensor: Any, meta: dict[str, Any], n: int = 5) -> list[str]:
    axes = meta.get("axes", [])
    flat = tensor.float().flatten().nan_to_num(float("-inf"))
    count = min(n, flat.numel())
    top = flat.topk(count).indices.tolist()
    lines = []
    for index in top:
        coords = []
        rest = index
        for axis, size in reversed(list(zip(axes, tensor.shape))):
            coords.append((axis, rest % size))
            rest //= size
        where = ", ".join(f"{axis}={_labels(meta, axis)[i] if _labels(meta, axis) else i}" for axis, i in reversed(coords))
        lines.append(f"  {_fmt(float(flat[index]))}  at {where}")
    return [f"{name}: strongest cells"] + lines


def print_summary(results: Results, console: Console) -> None:
    manifest = results.manifest
    model = manifest.get("model", {})
    timings = manifest.get("timings", {})
    title = manifest.get("spec", {}).get("name") or "spec"
    console.print(
        f"[bold]{title}[/bold] on {model.get('id')} ({model.get('dtype')}, {model.get('device')}), "
        f"{manifest.get('plan', {}).get('forwards', '?')} forward(s) in {timings.get('execute_s', 0):.2f} s"
    )
    for invoke, per_prompt in results.next_tokens.items():
        prompts = results.prompts.get(invoke, [])
        for i, tokens in enumerate(per_prompt):
            prompt = prompts[i] if i < len(prompts) else ""
            shown = "  ".join(f"{tok!r} {prob:.3f}" for tok, prob in tokens)
            label = invoke if len(per_prompt) == 1 else f"{invoke}[{i}]"
            console.print(f"  [cyan]{label}[/cyan] {_shorten(prompt)!r} -> {shown}")
    tensors_meta = manifest.get("tensors", {})
    for name, tensor in results.metrics.items():
        meta = tensors_meta.get(name, {})
        if name.endswith("/ids"):
            continue
        if meta.get("metric_kind") == "top_k":
            decoded = meta.get("decoded")
            if decoded:
                for label, items in decoded.items():
                    shown = "  ".join(f"{tok!r} {prob:.3f}" for tok, prob in items)
                    console.print(f"  [magenta]{name}{label}[/magenta] {shown}")
            continue
        axes = meta.get("axes", [])
        if tensor.ndim == 0:
            console.print(f"  [magenta]{name}[/magenta] = {_fmt(float(tensor))}")
        elif len(axes) == 2 and tensor.ndim == 2 and tensor.numel() <= _MAX_TABLE_CELLS:
            console.print(_grid_table(name, tensor, meta))
            for line in _strongest(name, tensor, meta):
                console.print(line)
        elif tensor.numel() <= 16:
            labels = []
            if axes:
                labels = _labels(meta, axes[0])
            values = tensor.flatten().tolist()
            if meta.get("token_strs") and not axes:
                labels = [repr(t) for t in meta["token_strs"]]
            shown = ", ".join(f"{labels[i] if i < len(labels) else i}: {_fmt(v)}" for i, v in enumerate(values))
            console.print(f"  [magenta]{name}[/magenta] [{', '.join(axes) or 'token'}] {shown}")
        else:
            console.print(f"  [magenta]{name}[/magenta] shape {list(tensor.shape)} axes {axes}")
            if axes:
                for line in _strongest(name, tensor, meta):
                    console.print(line)
    if results.saves:
        console.print("saved: " + ", ".join(f"{n} {list(t.shape)}" for n, t in results.saves.items()))


def render_summary(results: Results, *, width: int = 120) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, no_color=True, highlight=False, force_terminal=False)
    print_summary(results, console)
    return buffer.getvalue()
