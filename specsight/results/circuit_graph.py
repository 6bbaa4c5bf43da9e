"""The report's graph view of an edge attribution: its strongest edges drawn between the
component graph's nodes as an SVG, one column per layer (the embedding first, the logits
last; in each layer the heads, then the MLP), a line per edge from the writer to the reader,
its width by |score| and its colour by sign (blue positive, red negative). A head's q, k and
v inputs are drawn into the head's node, dashed for k and dotted for v."""

from __future__ import annotations

import html
from typing import Any

from .labels import axis_labels

__all__ = ["edge_graph_svg"]

#: edges drawn
TOP = 40
_COL, _ROW, _PAD = 46, 16, 30
_DASH = {"k": ' stroke-dasharray="5 3"', "v": ' stroke-dasharray="1 3"'}


def _place(node: str, n_heads: int, n_layers: int) -> tuple[int, int]:
    """(column, row) of a node name (an upstream node, or a downstream one's owner)."""
    parts = node.split(".")
    if node == "embed":
        return 0, n_heads // 2
    if node == "logits":
        return n_layers + 1, n_heads // 2
    layer = int(parts[1])
    return layer + 1, (int(parts[2]) if parts[0] == "head" else n_heads)


def edge_graph_svg(tensor: Any, meta: dict[str, Any]) -> str:
    """The SVG of the ``TOP`` strongest edges of ``[upstream, downstream]`` scores (per
    position: summed over positions)."""
    scores = tensor.float().nansum(0) if tensor.dim() == 3 else tensor.float()
    ups, downs = axis_labels(meta, "upstream"), axis_labels(meta, "downstream")
    graph = meta.get("graph", {})
    n_layers, n_heads = int(graph.get("n_layers", 0)), int(graph.get("n_heads", 0))
    flat = scores.flatten()
    real = int((~flat.isnan()).sum())
    if not real or not n_layers:
        return ""
    order = flat.abs().nan_to_num(float("-inf")).topk(min(TOP, real)).indices.tolist()
    largest = float(flat[order[0]].abs()) or 1.0
    width, height = (n_layers + 2) * _COL + 2 * _PAD, (n_heads + 1) * _ROW + 2 * _PAD
    shapes, used = [], set()
    for index in reversed(order):  # the strongest drawn last, on top
        up, down = divmod(index, scores.shape[1])
        score = float(flat[index])
        writer, reader = ups[up], downs[down]
        group = reader.rsplit(".", 1)[1] if reader.count(".") == 3 else ""
        owner = reader.rsplit(".", 1)[0] if group else reader
        (x1, y1), (x2, y2) = (_xy(_place(n, n_heads, n_layers)) for n in (writer, owner))
        used.update({writer, owner})
        colour = "#2166ac" if score > 0 else "#b2182b"
        title = html.escape(f"{writer} -> {reader}: {score:+.4g}")
        shapes.append(
            f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{colour}" '
            f'stroke-width="{0.5 + 4 * abs(score) / largest:.2f}" stroke-opacity="0.7"'
            f"{_DASH.get(group, '')}><title>{title}</title></line>"
        )
    for node in sorted(used):
        x, y = _xy(_place(node, n_heads, n_layers))
        label = html.escape(node)
        shapes.append(f'<circle cx="{x}" cy="{y}" r="4" fill="#444"><title>{label}</title></circle>')  # fmt: skip
    caption = f"the {len(order)} strongest edges (of {real}); width by |score|, blue +, red -"
    return (
        f'<figure class="edge-graph"><svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">{"".join(shapes)}</svg>'
        f"<figcaption>{html.escape(caption)}; k dashed, v dotted</figcaption></figure>"
    )


def _xy(place: tuple[int, int]) -> tuple[int, int]:
    column, row = place
    return _PAD + column * _COL, _PAD + row * _ROW
