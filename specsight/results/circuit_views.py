"""How the summary shows circuit metrics: an edge attribution's strongest edges, and a
faithfulness per circuit size beside the full model's and the empty circuit's metric."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .labels import axis_labels

__all__ = ["CIRCUIT_VIEWS", "print_edges", "print_faithfulness"]

#: edges the summary lists
TOP_EDGES = 15


def _fmt(value: float) -> str:
    return f"{value:+.4g}"


def print_edges(console: Console, name: str, tensor: Any, meta: dict[str, Any]) -> None:
    """The ``TOP_EDGES`` edges of largest absolute score."""
    ups, downs = axis_labels(meta, "upstream"), axis_labels(meta, "downstream")
    flat = tensor.float().flatten()
    real = int((~flat.isnan()).sum())
    order = flat.abs().nan_to_num(float("-inf")).topk(min(TOP_EDGES, real)).indices.tolist()
    console.print(
        f"  [magenta]{escape(name)}[/magenta] ({real} edges, mean over items); strongest by "
        "|score|:"
    )
    n_up, n_down = tensor.shape[-2:]
    for index in order:
        pos, rest = divmod(index, n_up * n_down)
        up, down = divmod(rest, n_down)
        at = f" @ pos {pos}" if tensor.dim() == 3 else ""
        line = f"    {_fmt(float(flat[index])):>10}  {ups[up]} -> {downs[down]}{at}"
        console.print(line, markup=False)


def print_faithfulness(
    console: Console, name: str, tensor: Any, meta: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Per circuit size: faithfulness with its interval, normalised, the circuit's metric."""
    sizes = axis_labels(meta, "edges")
    table = Table(title=Text(f"{name} (faithfulness)"), title_justify="left", box=None, padding=(0, 1))  # fmt: skip
    for column in ("edges", "faithfulness", "interval", "normalized", "metric"):
        table.add_column(column, justify="right")
    for i, value in enumerate(tensor.tolist()):
        interval = (
            f"[{_fmt(float(extra['ci_low'][i]))}, {_fmt(float(extra['ci_high'][i]))}]"
            if "ci_low" in extra
            else ""
        )
        normalized = _fmt(float(extra["normalized"][i])) if "normalized" in extra else ""
        metric = _fmt(float(extra["circuit"][i])) if "circuit" in extra else ""
        label = str(sizes[i]) if i < len(sizes) else str(i)
        table.add_row(label, f"{value:.3f}", interval, normalized, metric)
    console.print(table)
    if "full" in extra and "ablated" in extra:
        console.print(
            f"    the full model's metric {_fmt(float(extra['full']))}; the empty circuit's "
            f"(every edge ablated) {_fmt(float(extra['ablated']))}",
            markup=False,
        )


#: the summary's views of circuit metrics, by the kinds' ``view``
CIRCUIT_VIEWS = {
    "edges": lambda console, name, tensor, meta, _extra: print_edges(console, name, tensor, meta),
    "faithfulness": print_faithfulness,
}
