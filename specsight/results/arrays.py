"""Results as xarray objects: one tensor as a DataArray, or the whole run as a Dataset whose
variables share their dimensions (``layer``, ``pos``, ``head``, ``item``), so a metric and its
stderr, interval, effect and per-item values line up cell by cell.

Variable names carry no ``/``: ``patched_ld/stderr`` is ``patched_ld_stderr`` and
``clean/resid_post.5`` is ``clean_resid_post.5``. Positions are ``pos`` on every tensor, but for
a save whose rows selected different positions (a per-item token): its dim is ``<var>_slot``
and the coordinate ``<var>_positions`` gives each row's real positions.
Tensors whose coordinates along a dimension differ (two invokes' positions) are aligned on the
union of the values, the cells one does not have being NaN. Labels (``pos_label``) and the
dataset's columns (on ``item``) are coordinates.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import RunError
from .frames import (
    Results,
    coordinate,
    dataset_items,
    import_optional,
    named_axes,
    row_positions,
)

__all__ = ["to_xarray", "variable_name"]


def variable_name(name: str) -> str:
    """A tensor's name as a Dataset variable: ``/`` becomes ``_``."""
    return name.replace("/", "_")


def _numpy(tensor: torch.Tensor) -> Any:
    array = tensor.detach().cpu()
    return array.float().numpy() if array.dtype == torch.bfloat16 else array.numpy()


def _data_array(results: Results, name: str, dims: list[str] | None = None) -> Any:
    """One tensor with its axes as dims, their values as coordinates (and labels beside)."""
    xarray = import_optional("xarray")
    tensor, axes, meta = named_axes(results, name)
    dims = dims or axes
    coords: dict[str, Any] = {}
    for axis, dim, size in zip(axes, dims, tensor.shape):
        values, labels = coordinate(meta, axis, size)
        coords[dim] = values
        if labels is not None:
            coords[f"{dim}_label"] = (dim, labels)
    real = row_positions(tensor, axes, meta)
    if real is not None:  # each row's own positions in its prompt (-1: padding)
        lead = axes.index(real[0]) + 1
        index = real[1][(...,) + (0,) * (tensor.dim() - lead)] if tensor.dim() > lead else real[1]
        coords[f"{variable_name(name)}_positions"] = (dims[:lead], index.numpy())
    return xarray.DataArray(_numpy(tensor), dims=dims, coords=coords, name=name)


def _labels(results: Results) -> dict[str, dict[Any, str] | None]:
    """Per dim, its label of each value when every tensor agrees (None where two disagree)."""
    out: dict[str, dict[Any, str] | None] = {}
    for name in results.tensors:
        tensor, axes, meta = named_axes(results, name)
        for axis, size in zip(axes, tensor.shape):
            values, labels = coordinate(meta, axis, size)
            if labels is None or out.get(axis, {}) is None:
                continue
            known = out.setdefault(axis, {})
            for value, label in zip(values, labels):
                if known.setdefault(value, label) != label:  # type: ignore[union-attr]
                    out[axis] = None
                    break
    return out


def _dataset(results: Results) -> Any:
    xarray = import_optional("xarray")
    names = {variable_name(n): n for n in results.tensors}
    if len(names) != len(results.tensors):
        clash = sorted(n for n in results.tensors if n != variable_name(n))
        raise RunError(f"results {', '.join(clash)} collide once '/' becomes '_'")
    arrays = []
    for var, name in names.items():
        tensor, axes, meta = named_axes(results, name)
        real = row_positions(tensor, axes, meta)
        own = {f"dim{i}" for i in range(tensor.dim())} | ({real[0]} if real else set())
        # a save whose rows chose other positions has slots, not positions, along that dim
        dims = [
            a if a not in own else f"{var}_{'slot' if real and a == real[0] else a}" for a in axes
        ]
        array = _data_array(results, name, dims).rename(var)
        arrays.append(array.drop_vars([c for c in array.coords if c.endswith("_label")]))
    dataset = xarray.merge(arrays, join="outer", compat="no_conflicts", combine_attrs="drop")
    for dim, labels in _labels(results).items():
        if labels and dim in dataset.dims:
            values = dataset.coords[dim].values.tolist()
            dataset = dataset.assign_coords(
                {f"{dim}_label": (dim, [labels.get(v, str(v)) for v in values])}
            )
    items = dataset_items(results)
    if items and "item" in dataset.dims and dataset.sizes["item"] == len(items):
        columns = dict.fromkeys(key for row in items for key in row)
        taken = set(dataset.variables)
        dataset = dataset.assign_coords(
            {
                (c if c not in taken else f"item.{c}"): ("item", [row.get(c) for row in items])
                for c in columns
            }
        )
    return dataset


def to_xarray(results: Results, name: str | None = None) -> Any:
    """One tensor as a DataArray (named, labelled dims), or every tensor as a Dataset whose
    variables share dims: a metric's stderr, interval and effect lie on the metric's own."""
    if name is not None:
        return _data_array(results, name)
    return _dataset(results)
