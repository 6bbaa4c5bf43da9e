"""Results as data for analysis: a long-format pandas DataFrame per tensor, xarray objects
with named, labelled dimensions, and per-layer saves stacked along a layer axis.

Labels come from the manifest (axis values, position labels such as ``9: Mary``, token
strings), so nobody rebuilds them from ``manifest["tensors"][name]["axis_values"]``. pandas and
xarray are optional: ``pip install 'specsight[frames]'``.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import torch

from ..errors import RunError, did_you_mean
from .labels import axis_labels

__all__ = ["split_parts", "stack_sites", "to_pandas", "to_xarray"]


class Results(Protocol):
    """What these functions read of a :class:`~specsight.results.Results`."""

    manifest: dict[str, Any]
    saves: dict[str, torch.Tensor]

    @property
    def tensors(self) -> dict[str, torch.Tensor]: ...

    def __getitem__(self, name: str) -> torch.Tensor: ...


def _import(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise RunError(
            f"this needs {module}, which is not installed",
            hint=f"pip install 'specsight[frames]' (or pip install {module})",
        ) from None


def _axes(results: Results, name: str) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """A tensor, one name per dimension (``dim<i>`` where the manifest names none), its meta."""
    tensor = results[name]
    meta = results.manifest.get("tensors", {}).get(name, {})
    axes = list(meta.get("axes") or [])[: tensor.dim()]
    axes += [f"dim{i}" for i in range(len(axes), tensor.dim())]
    return tensor, axes, meta


def _coordinate(meta: dict[str, Any], axis: str, size: int) -> tuple[list[Any], list[str] | None]:
    """An axis's values (its indices where the manifest has none) and labels (None: none
    beyond the values)."""
    values = list(meta.get("axis_values", {}).get(axis) or [])
    if len(values) != size:
        values = list(range(size))
    labels = (
        axis_labels(meta, axis) if axis == "token" or axis in meta.get("axis_labels", {}) else []
    )
    return values, (labels if len(labels) == size else None)


def to_pandas(results: Results, name: str) -> Any:
    """One row per cell: a column per axis (its values), ``<axis>_label`` where the axis has
    labels, and ``value``."""
    pandas = _import("pandas")
    tensor, axes, meta = _axes(results, name)
    if tensor.dim() == 0:
        return pandas.DataFrame({"value": [float(tensor)]})
    grids = torch.meshgrid(*[torch.arange(n) for n in tensor.shape], indexing="ij")
    columns: dict[str, list[Any]] = {}
    for axis, grid, size in zip(axes, grids, tensor.shape):
        index = grid.reshape(-1).tolist()
        values, labels = _coordinate(meta, axis, size)
        columns[axis] = [values[i] for i in index]
        if labels is not None:
            columns[f"{axis}_label"] = [labels[i] for i in index]
    columns["value"] = tensor.detach().float().reshape(-1).tolist()
    return pandas.DataFrame(columns)


def _data_array(results: Results, name: str, rename: dict[str, str] | None = None) -> Any:
    xarray = _import("xarray")
    tensor, axes, meta = _axes(results, name)
    dims = [rename.get(a, a) if rename else a for a in axes]
    coords: dict[str, Any] = {}
    for axis, dim, size in zip(axes, dims, tensor.shape):
        values, labels = _coordinate(meta, axis, size)
        coords[dim] = values
        if labels is not None:
            coords[f"{dim}_label"] = (dim, labels)
    array = tensor.detach().cpu()
    data = array.float().numpy() if array.dtype == torch.bfloat16 else array.numpy()
    return xarray.DataArray(data, dims=dims, coords=coords, name=name)


def to_xarray(results: Results, name: str | None = None) -> Any:
    """One tensor as a DataArray, or every tensor as a Dataset. In a Dataset, an axis whose
    coordinates differ between tensors (``pos`` of two invokes) becomes ``<axis>@<tensor>``."""
    if name is not None:
        return _data_array(results, name)
    xarray = _import("xarray")
    seen: dict[str, list[Any]] = {}
    arrays = {}
    for tensor_name in results.tensors:
        tensor, axes, meta = _axes(results, tensor_name)
        rename = {}
        for axis, size in zip(axes, tensor.shape):
            values = _coordinate(meta, axis, size)[0]
            if seen.setdefault(axis, values) != values:
                rename[axis] = f"{axis}@{tensor_name}"
        arrays[tensor_name] = _data_array(results, tensor_name, rename)
    return xarray.Dataset(arrays)


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
