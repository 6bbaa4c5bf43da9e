"""Results as pandas data: one tidy frame of every metric (value, stderr, interval and effect
side by side, a column per sweep axis, the dataset's columns joined on ``item``), or one
tensor in long format; per-layer saves stacked along a layer axis; a dla split by component.

Labels come from the manifest (axis values, position labels such as ``9: Mary``, token
strings), so nobody rebuilds them from ``manifest["tensors"][name]["axis_values"]``. pandas and
xarray are optional: ``pip install 'specsight[frames]'``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Protocol

import torch

from ..errors import RunError, did_you_mean
from .labels import axis_labels

__all__ = [
    "COMPANION_COLUMNS",
    "companions",
    "coordinate",
    "dataset_items",
    "import_optional",
    "named_axes",
    "primary_metrics",
    "row_positions",
    "split_parts",
    "stack_sites",
    "to_pandas",
]

#: companions that sit beside a metric's value as columns, in this order (others follow)
COMPANION_COLUMNS = ("stderr", "ci_low", "ci_high", "effect")


class Results(Protocol):
    """What these functions read of a :class:`~specsight.results.Results`."""

    manifest: dict[str, Any]
    metrics: dict[str, torch.Tensor]
    saves: dict[str, torch.Tensor]

    @property
    def tensors(self) -> dict[str, torch.Tensor]: ...

    def __getitem__(self, name: str) -> torch.Tensor: ...


def import_optional(module: str) -> Any:
    """``module`` imported, or a RunError that says how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise RunError(
            f"this needs {module}, which is not installed",
            hint=f"pip install 'specsight[frames]' (or pip install {module})",
        ) from None


def named_axes(results: Results, name: str) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """A tensor, one name per dimension (``dim<i>`` where the manifest names none), its meta."""
    tensor = results[name]
    meta = results.manifest.get("tensors", {}).get(name, {})
    axes = list(meta.get("axes") or [])[: tensor.dim()]
    axes += [f"dim{i}" for i in range(len(axes), tensor.dim())]
    return tensor, axes, meta


def coordinate(meta: dict[str, Any], axis: str, size: int) -> tuple[list[Any], list[str] | None]:
    """An axis's values (its indices where the manifest has none) and labels (None: none
    beyond the values)."""
    values = list(meta.get("axis_values", {}).get(axis) or [])
    if len(values) != size:
        values = list(range(size))
    labels = (
        axis_labels(meta, axis) if axis == "token" or axis in meta.get("axis_labels", {}) else []
    )
    return values, (labels if len(labels) == size else None)


def primary_metrics(results: Results) -> list[str]:
    """The metrics a spec named (not the companions stored beside them), in result order."""
    tensors = results.manifest.get("tensors", {})
    return [n for n in results.metrics if not tensors.get(n, {}).get("companion_of")]


def companions(results: Results, name: str) -> dict[str, torch.Tensor]:
    """The companions of metric ``name`` by their short name (``stderr``, ``items``, ...);
    a companion's own companions (``total/items``) are left out."""
    tensors = results.manifest.get("tensors", {})
    prefix = name + "/"
    return {
        key.removeprefix(prefix): value
        for key, value in results.metrics.items()
        if tensors.get(key, {}).get("companion_of") == name
        and key.startswith(prefix)
        and "/" not in key.removeprefix(prefix)
    }


def dataset_items(results: Results) -> list[dict[str, Any]] | None:
    """The dataset rows the run used, item by item (None: no dataset, or a manifest written
    before the rows were recorded)."""
    items = (results.manifest.get("dataset") or {}).get("items")
    return items if isinstance(items, list) else None


def _cells(tensor: torch.Tensor, axes: list[str], meta: dict[str, Any]) -> dict[str, list[Any]]:
    """A column per axis (its values) and ``<axis>_label`` where labelled, one entry per cell
    in row-major order."""
    if tensor.dim() == 0:
        return {}
    grids = torch.meshgrid(*[torch.arange(n) for n in tensor.shape], indexing="ij")
    columns: dict[str, list[Any]] = {}
    for axis, grid, size in zip(axes, grids, tensor.shape):
        index = grid.reshape(-1).tolist()
        values, labels = coordinate(meta, axis, size)
        columns[axis] = [values[i] for i in index]
        if labels is not None:
            columns[f"{axis}_label"] = [labels[i] for i in index]
    real = row_positions(tensor, axes, meta)
    if real is not None:  # the positions each row selected, not their slots
        axis, per_cell = real
        columns[axis] = per_cell.reshape(-1).tolist()
    return columns


def row_positions(
    tensor: torch.Tensor, axes: list[str], meta: dict[str, Any]
) -> tuple[str, torch.Tensor] | None:
    """For a save whose rows selected different positions (a per-item token): its position
    axis and, per cell, the real position in the prompt (-1 in a row's padding)."""
    rows = meta.get("row_positions")
    axis = next((a for a in ("pos", "query") if a in axes), None)
    if not rows or axis is None:
        return None
    lead = axes.index(axis)
    if len(rows) != math.prod(tensor.shape[:lead]):
        return None
    width = tensor.shape[lead]
    table = torch.tensor([list(r)[:width] + [-1] * (width - len(r)) for r in rows])
    table = table.reshape(*tensor.shape[:lead], width)
    index = table.reshape(*table.shape, *([1] * (tensor.dim() - lead - 1)))
    return axis, index.expand(tensor.shape)


def _flat(tensor: torch.Tensor) -> list[Any]:
    if tensor.dtype.is_floating_point:
        return tensor.detach().double().reshape(-1).tolist()
    return tensor.detach().reshape(-1).tolist()


def _join_items(frame: Any, items: list[dict[str, Any]] | None) -> Any:
    """The dataset's columns joined on ``item`` (a column that would shadow one of the frame's
    is named ``item.<column>``)."""
    if items is None or "item" not in frame.columns:
        return frame
    pandas = import_optional("pandas")
    table = pandas.DataFrame(items)
    table.columns = [f"item.{c}" if c in frame.columns else c for c in table.columns]
    table.insert(0, "item", range(len(items)))
    return frame.merge(table, on="item", how="left")


def _tensor_frame(results: Results, name: str) -> Any:
    pandas = import_optional("pandas")
    tensor, axes, meta = named_axes(results, name)
    columns = _cells(tensor, axes, meta)
    columns["value"] = _flat(tensor)
    return _join_items(pandas.DataFrame(columns), dataset_items(results))


def _metric_frame(results: Results, name: str, items: bool) -> tuple[Any, list[str]]:
    """One metric's rows (its cells with the value and the companions of the same shape) and
    the names of its axis columns."""
    pandas = import_optional("pandas")
    extra = companions(results, name)
    use_items = items and "items" in extra
    tensor, axes, meta = named_axes(results, f"{name}/items" if use_items else name)
    cells = _cells(tensor, axes, meta)
    columns: dict[str, list[Any]] = {"metric": [name] * max(1, tensor.numel()), **cells}
    columns["value"] = _flat(tensor)
    if not use_items:
        order = [c for c in COMPANION_COLUMNS if c in extra]
        order += sorted(c for c in extra if c not in COMPANION_COLUMNS and c != "items")
        for companion in order:
            if tuple(extra[companion].shape) == tuple(tensor.shape):
                columns[companion] = _flat(extra[companion])
    return pandas.DataFrame(columns), list(cells)


def to_pandas(results: Results, name: str | None = None, *, items: bool = False) -> Any:
    """With ``name``: that tensor in long format (a column per axis, ``value``). Without: one
    tidy frame of every metric, a row per cell: ``metric``, a column per axis (with
    ``<axis>_label``), ``value``, then ``stderr``, ``ci_low``, ``ci_high`` and ``effect`` where
    the metric has them; ``items=True`` gives the per-item values of reduced metrics instead.
    Where there is an ``item`` axis, the dataset's columns are joined on it."""
    if name is not None:
        return _tensor_frame(results, name)
    pandas = import_optional("pandas")
    built = [_metric_frame(results, metric, items) for metric in primary_metrics(results)]
    if not built:
        return pandas.DataFrame({"metric": [], "value": []})
    frame = pandas.concat([f for f, _ in built], ignore_index=True, sort=False)
    seen = list(dict.fromkeys(c for _, cells in built for c in cells))
    axes = sorted(seen, key=lambda c: (c.endswith("_label"), seen.index(c)))
    left = [c for c in frame.columns if c not in axes and c != "metric"]
    rank = {c: i for i, c in enumerate(("value", *COMPANION_COLUMNS))}
    rest = sorted(left, key=lambda c: (rank.get(c, len(rank)), left.index(c)))
    frame = frame[["metric", *axes, *rest]]
    frame[axes] = frame[axes].convert_dtypes()  # layer 3, not 3.0, where a metric has no layer
    return _join_items(frame, dataset_items(results))


def stack_sites(results: Results, site: str, invoke: str | None = None) -> torch.Tensor:
    """The saves of ``site`` at every layer (``resid_post.0``, ``resid_post.1``, ...) stacked
    in layer order: ``[layer, ...]``. ``invoke`` picks one when several invokes saved it."""
    pattern = re.compile(rf"^(?:(?P<owner>.+)/)?{re.escape(site)}\.(?P<layer>\d+)$")
    found: dict[str | None, dict[int, str]] = {}
    for name in results.saves:
        match = pattern.match(name)
        if match:
            found.setdefault(match["owner"], {})[int(match["layer"])] = name
    if invoke is not None:
        found = {k: v for k, v in found.items() if k == invoke}
    if not found:
        sites = sorted({n.split("/")[-1].rsplit(".", 1)[0] for n in results.saves})
        raise RunError(
            f"no saves of '{site}.<layer>'" + (f" by '{invoke}'" if invoke else ""),
            hint=did_you_mean(site, sites) or "saved sites: " + ", ".join(sites or ["none"]),
        )
    if len(found) > 1:
        raise RunError(
            f"several saves of '{site}.<layer>': {', '.join(str(k) for k in sorted(found, key=str))}",
            hint="name one: results.stack(site, invoke=...)",
        )
    names = next(iter(found.values()))
    tensors = [results.saves[names[layer]] for layer in sorted(names)]
    if len({tuple(t.shape) for t in tensors}) != 1:
        raise RunError(f"the saves of '{site}.<layer>' differ in shape: they do not stack")
    return torch.stack(tensors)


_HEAD = re.compile(r"L(\d+)H(\d+)")
_LAYER = re.compile(r"(attn_out|mlp_out)\.(\d+)")


def split_parts(results: Results, name: str) -> dict[str, torch.Tensor]:
    """A direct logit attribution (``name``: the metric, or its ``/items``, ``/stderr``...)
    split along its component axis: ``embed`` and ``bias`` [...], ``heads`` [..., layer,
    head], ``attn`` and ``mlps`` [..., layer]."""
    tensor = results[name]
    base = name.split("/")[0]
    labels = list(results.manifest.get("tensors", {}).get(base, {}).get("axis_values", {}).get("component") or [])  # fmt: skip
    if not labels or tensor.shape[-1] != len(labels):
        raise RunError(f"'{name}' has no component axis", hint="use a dla metric's result")
    out: dict[str, torch.Tensor] = {}
    heads = [(i, _HEAD.fullmatch(label)) for i, label in enumerate(labels)]
    heads = [(i, int(m[1]), int(m[2])) for i, m in heads if m]
    if heads:
        n_layers, n_heads = max(h[1] for h in heads) + 1, max(h[2] for h in heads) + 1
        index = torch.tensor([i for i, _, _ in heads])
        out["heads"] = tensor[..., index].reshape(*tensor.shape[:-1], n_layers, n_heads)
    for part, site in (("attn", "attn_out"), ("mlps", "mlp_out")):
        found = [i for i, label in enumerate(labels) if (m := _LAYER.fullmatch(label)) and m[1] == site]  # fmt: skip
        if found:
            out[part] = tensor[..., torch.tensor(found)]
    for single in ("embed", "bias"):
        if single in labels:
            out[single] = tensor[..., labels.index(single)]
    return out
