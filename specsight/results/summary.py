"""The terminal summary of a run: next tokens per invoke, metric values, tables for sweeps."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..errors import printable
from .circuit_views import CIRCUIT_VIEWS
from .expect import Outcome
from .labels import axis_labels, cell_label, coords, metric_label
from .strongest import fmt_value, spread_text, strongest_cells

__all__ = ["RunView", "render_summary", "print_summary"]


class RunView(Protocol):
    """What the summary reads of a run (a :class:`~specsight.results.Results`)."""

    metrics: dict[str, Any]
    saves: dict[str, Any]
    manifest: dict[str, Any]
    next_tokens: dict[str, list[list[tuple[str, float]]]]
    prompts: dict[str, list[str]]
    expectations: list[Outcome]


_MAX_GRID_COLUMNS = 64
_MAX_LIST = 64
_MAX_PROMPTS = 4  # next tokens shown per invoke (a dataset's invokes have many items)


def _prob(value: float) -> str:
    """A probability: 3 decimals, or scientific notation below 0.001 (so it is not 0.000)."""
    return f"{value:.3f}" if value >= 0.0005 or value == 0 else f"{value:.1e}"


def _shorten(text: str, limit: int = 70) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tokens(items: list[Any]) -> str:
    return "  ".join(f"{tok!r} {_prob(prob)}" for tok, prob in items)


def _style(value: float, lo: float, hi: float) -> str:
    if value != value or hi <= lo:
        return ""
    if lo < 0 < hi:  # diverging around zero
        scale = value / (hi if value > 0 else -lo)
        return (
            "bold green"
            if scale > 0.5
            else ("bold red" if scale < -0.5 else ("green" if scale > 0.2 else ""))
        )
    frac = (value - lo) / (hi - lo)
    return "bold green" if frac > 0.75 else ("dim" if frac < 0.25 else "")


def _grids(name: str, tensor: Any, meta: dict[str, Any], width: int) -> list[Table]:
    """A 2-D metric as tables ``width`` columns wide: first axis down, second across (position
    labels as headers), its columns split over as many tables as it takes."""
    axes = meta.get("axes", [])
    rows_label, cols_label = axis_labels(meta, axes[0]), axis_labels(meta, axes[1])
    data = tensor.float()
    finite = data.nan_to_num(0)
    lo, hi = float(finite.min()), float(finite.max())
    top = max(abs(lo), abs(hi))
    digits = 3 if top < 1 else 2
    # near-zero cells of a grid read as 0.000; only a grid that is all near zero goes scientific
    cells = [[fmt_value(float(v), digits, tiny=top < 5e-4) for v in row] for row in data]
    rows = [rows_label[i] if i < len(rows_label) else str(i) for i in range(data.shape[0])]
    headers = []
    for label in cols_label or [str(i) for i in range(data.shape[1])]:
        index, sep, token = label.partition(":")
        headers.append(f"{index}\n{_shorten(token, 8)}" if sep and index.isdigit() else label)
    first = max(len(axes[0]), *(len(r) for r in rows)) + 2
    widest = max(
        max((len(c) for row in cells for c in row), default=1),
        *(max(len(part) for part in h.split("\n")) for h in headers),
    )
    per_table = max(1, (width - first) // (widest + 2))
    tables = []
    for start in range(0, data.shape[1], per_table):
        stop = min(data.shape[1], start + per_table)
        title = f"{name} [{axes[0]} x {axes[1]}]"
        if start:  # Text: no markup in names or axes
            title = f"{name} ({axes[1]} {start}-{stop - 1})"
        table = Table(title=Text(title), title_justify="left", box=None, padding=(0, 1))
        table.add_column(axes[0], justify="right", style="bold")
        for header in headers[start:stop]:
            table.add_column(Text(header), justify="right")
        for i, label in enumerate(rows):
            styled = [
                Text(cells[i][j], style=_style(float(data[i, j]), lo, hi))
                for j in range(start, stop)
            ]
            table.add_row(Text(label), *styled)
        tables.append(table)
    return tables


def _over(meta: dict[str, Any]) -> str:
    """`` (mean over 64 items)`` for a reduced metric."""
    reduce = meta.get("reduce")
    if not reduce:
        return ""
    what = "recovery of means" if reduce.get("of") == "means" else reduce["stat"]
    return f" ({what} over {reduce['size']} {reduce['over']}s)"


def _print_metric(
    console: Console,
    name: str,
    tensor: Any,
    meta: dict[str, Any],
    extra: dict[str, Any],
    manifest: dict[str, Any],
) -> None:
    axes = meta.get("axes", [])
    view = meta.get("view")
    decoded = meta.get("decoded")
    if view == "tokens" and decoded is not None:
        cell_axes = axes[:-1]
        for i, items in enumerate(decoded):
            where = cell_label(meta, cell_axes, coords(i, tuple(tensor.shape[:-1])))
            label = f"{name}[{where}]" if where else name
            console.print(f"  [magenta]{escape(label)}[/magenta]  {escape(_tokens(items))}")
        return
    if view == "lens" and decoded is not None and tensor.ndim == 1:
        sites = axis_labels(meta, "site")
        token = meta.get("token_strs") or []
        table = Table(
            title=Text(f"{name} (logit lens)"), title_justify="left", box=None, padding=(0, 1)
        )
        table.add_column("site", style="bold")
        table.add_column(Text(f"p({token[0]!r})" if token else "top-1 p"), justify="right")
        table.add_column("top tokens")
        for i, items in enumerate(decoded):
            table.add_row(
                Text(sites[i] if i < len(sites) else str(i)),
                _prob(float(tensor[i])),
                Text(_tokens(items)),
            )
        console.print(table)
        return
    if view == "features" and "ids" in extra:
        cell_axes = axes[:-1]
        ids, values = (
            extra["ids"].reshape(-1, tensor.shape[-1]),
            tensor.reshape(-1, tensor.shape[-1]),
        )
        for i in range(min(len(values), _MAX_LIST)):
            where = cell_label(meta, cell_axes, coords(i, tuple(tensor.shape[:-1])))
            label = f"{name}[{where}]" if where else name
            shown = "  ".join(f"#{int(f)} {fmt_value(float(v))}" for f, v in zip(ids[i], values[i]))
            console.print(f"  [magenta]{escape(label)}[/magenta]  {escape(shown)}")
        return
    if view == "parts" and tensor.ndim == 1:
        _print_parts(console, name, tensor, meta, extra)
        return
    if view == "probe" and tensor.ndim == 1:
        _print_probe(console, name, tensor, meta, extra)
        return
    if view in CIRCUIT_VIEWS:
        CIRCUIT_VIEWS[view](console, name, tensor, meta, extra)
        return
    if tensor.ndim == 0:
        label = metric_label(meta, manifest)
        what = f" ({label})" if label else ""
        value = fmt_value(float(tensor)) + spread_text(extra, ())
        console.print(f"  [magenta]{escape(name)}[/magenta]{escape(what + _over(meta))} = {value}")
    elif tensor.ndim == 2 and tensor.shape[1] <= _MAX_GRID_COLUMNS and tensor.shape[0] <= 200:
        for table in _grids(name + _over(meta), tensor, meta, console.width):
            console.print(table)
        for line in strongest_cells(name, tensor, meta, extra):
            console.print(line, markup=False)
    elif tensor.ndim == 1 and tensor.numel() <= _MAX_LIST:
        axis = axes[0] if axes else "index"
        labels = axis_labels(meta, axis)
        values = tensor.tolist()
        shown = "  ".join(
            f"{labels[i] if i < len(labels) else i}: {fmt_value(v)}{spread_text(extra, (i,))}"
            for i, v in enumerate(values)
        )
        console.print(
            f"  [magenta]{escape(name)}[/magenta]{escape(_over(meta))} by {axis}: {escape(shown)}"
        )
    else:
        console.print(
            f"  [magenta]{escape(name)}[/magenta]{escape(_over(meta))} shape "
            f"{list(tensor.shape)} ({' x '.join(axes)})"
        )
        for line in strongest_cells(name, tensor, meta, extra):
            console.print(line, markup=False)


def _print_parts(
    console: Console, name: str, tensor: Any, meta: dict[str, Any], extra: dict[str, Any]
) -> None:
    """A decomposition (dla): what it adds up to, then its largest parts by size."""
    labels = axis_labels(meta, meta.get("axes", ["component"])[-1])
    total = f"{fmt_value(float(extra['total']))}" if "total" in extra else "?"
    residual = f"{float(extra['residual']):.2g}" if "residual" in extra else "?"
    console.print(
        f"  [magenta]{escape(name)}[/magenta]{escape(_over(meta))}: {len(labels)} parts sum to "
        f"{total} (the model's own; residual {residual}); largest:"
    )
    order = tensor.float().abs().nan_to_num(float("-inf")).topk(min(8, tensor.numel())).indices
    shown = [
        f"{labels[i] if i < len(labels) else i}: {fmt_value(float(tensor[i]))}{spread_text(extra, (i,))}"
        for i in order.tolist()
    ]
    console.print("    " + escape("  ".join(shown)))


def _print_probe(
    console: Console, name: str, tensor: Any, meta: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Probes: each site's held-out accuracy, with the AUROC (two classes) and the training
    accuracy beside it."""
    split, classes = meta.get("split", {}), meta.get("classes", [])
    console.print(
        f"  [magenta]{escape(name)}[/magenta]: probes of {escape(', '.join(classes))} "
        f"({split.get('train', '?')} train / {split.get('test', '?')} held-out items); "
        "held-out accuracy [AUROC, train accuracy] by site:"
    )
    sites = axis_labels(meta, "site")
    cells = []
    for i, value in enumerate(tensor.tolist()):
        more = [f"{float(extra[k][i]):.3f}" for k in ("auroc", "train_accuracy") if k in extra]
        more = [m for m in more if m != "nan"]
        label = sites[i] if i < len(sites) else str(i)
        cells.append(f"{label}: {value:.3f}" + (f" [{', '.join(more)}]" if more else ""))
    console.print("    " + escape("  ".join(cells)))


@dataclass(frozen=True)
class _PrintableView:
    """A run's view with every string from the spec or the model (its name, invoke and metric
    names, prompts, tokens, labels) made :func:`~specsight.errors.printable`."""

    metrics: dict[str, Any]
    saves: dict[str, Any]
    manifest: dict[str, Any]
    next_tokens: dict[str, list[list[tuple[str, float]]]]
    prompts: dict[str, list[str]]
    expectations: list[Outcome]


def _printable_data(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {_printable_data(k): _printable_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_printable_data(v) for v in value)
    return value


def _printable_view(results: RunView) -> _PrintableView:
    return _PrintableView(
        metrics={printable(k): v for k, v in results.metrics.items()},
        saves={printable(k): v for k, v in results.saves.items()},
        manifest=_printable_data(results.manifest),
        next_tokens=_printable_data(results.next_tokens),
        prompts=_printable_data(results.prompts),
        expectations=results.expectations,
    )


def print_summary(results: RunView, console: Console) -> None:
    """Print the summary of ``results`` on ``console`` (control characters escaped)."""
    results = _printable_view(results)
    manifest = results.manifest
    model = manifest.get("model", {})
    timings = manifest.get("timings", {})
    plan = manifest.get("plan", {})
    title = manifest.get("spec", {}).get("name") or "spec"
    console.print(
        f"[bold]{escape(str(title))}[/bold] on {escape(str(model.get('id')))} ({model.get('dtype')}, {model.get('device')}): "
        f"{plan.get('rows', '?')} row(s) in {plan.get('forwards', '?')} forward(s), "
        f"{timings.get('execute_s', 0):.2f} s"
    )
    if results.next_tokens:
        text = manifest.get("model", {}).get("inputs", "text") == "text"
        console.print("[bold]next tokens[/bold]" if text else "[bold]top outputs[/bold]")
    for invoke, per_prompt in results.next_tokens.items():
        prompts = results.prompts.get(invoke, [])
        for i, tokens in enumerate(per_prompt):
            if i == _MAX_PROMPTS and len(per_prompt) > _MAX_PROMPTS + 1:
                console.print(f"  [cyan]{escape(invoke)}[/cyan] ... {len(per_prompt) - i} more")
                break
            label = invoke if len(per_prompt) == 1 else f"{invoke}[{i}]"
            prompt = prompts[i] if i < len(prompts) else ""
            console.print(f"  [cyan]{escape(label)}[/cyan] {escape(repr(_shorten(prompt)))}")
            console.print(f"      -> {escape(_tokens(tokens))}")
    if manifest.get("generated"):
        console.print("[bold]generated[/bold]")
    for invoke, per_prompt in manifest.get("generated", {}).items():
        prompts = results.prompts.get(invoke, [])
        for i, entry in enumerate(per_prompt):
            if i == 2 * _MAX_PROMPTS and len(per_prompt) > 2 * _MAX_PROMPTS + 1:
                console.print(f"  [cyan]{escape(invoke)}[/cyan] ... {len(per_prompt) - i} more")
                break
            p = entry.get("prompt", i)
            where = [f"{k}={v}" for k, v in entry.get("cell", {}).items()]
            where += [str(p)] if len(prompts) > 1 else []
            label = f"{invoke}[{', '.join(where)}]" if where else invoke
            prompt = prompts[p] if p < len(prompts) else ""
            console.print(f"  [cyan]{escape(label)}[/cyan] {escape(repr(_shorten(prompt)))}")
            console.print(f"      -> {escape(repr(entry['text']))}")
    tensors_meta = manifest.get("tensors", {})
    shown = [
        (n, t)
        for n, t in results.metrics.items()
        if not tensors_meta.get(n, {}).get("companion_of")
    ]
    if shown:
        console.print("[bold]metrics[/bold]")
    for name, tensor in shown:
        extra = {
            key.rpartition("/")[2]: value
            for key, value in results.metrics.items()
            if tensors_meta.get(key, {}).get("companion_of") == name
        }
        _print_metric(console, name, tensor, tensors_meta.get(name, {}), extra, manifest)
    if results.expectations:
        console.print("[bold]expectations[/bold]")
        for outcome in results.expectations:
            text = Text(printable(outcome.format()))
            console.print(text, style="green" if outcome.ok else "bold red")
    if results.saves:
        console.print(
            "[bold]saved[/bold] "
            + escape(", ".join(f"{n} {list(t.shape)}" for n, t in results.saves.items()))
        )


def render_summary(results: RunView, *, width: int = 120) -> str:
    """The summary as plain text, ``width`` columns wide."""
    buffer = io.StringIO()
    console = Console(
        file=buffer, width=width, no_color=True, highlight=False, force_terminal=False
    )
    print_summary(results, console)
    return buffer.getvalue()
