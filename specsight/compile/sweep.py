"""Sweep grids: expand an invoke's ``sweep:`` into cells and substitute ``{var}`` placeholders.

``layer``, ``pos`` and ``head`` are special: ``all`` and ranges mean every layer of the model,
every position of the prompt, every attention head. Any other variable takes a list of numbers
(or an integer range). Cells are the product of the axes in declaration order (the first axis
varies slowest), or with ``sweep_mode: zip`` the variables' values taken side by side.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Grid",
    "GridError",
    "count_cells",
    "count_values",
    "expand_grid",
    "substitute",
    "placeholders",
]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class GridError(ValueError):
    """A sweep axis that cannot be expanded; ``axis`` names it."""

    def __init__(self, axis: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.axis = axis
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class Grid:
    """Sweep variables and their values; cells are their product, or their zip."""

    variables: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]
    zipped: bool = False

    @property
    def axes(self) -> tuple[str, ...]:
        """Result axes: one per variable, or a single joined axis for a zip."""
        if self.zipped and self.variables:
            return ("+".join(self.variables),)
        return self.variables

    @property
    def shape(self) -> tuple[int, ...]:
        if self.zipped and self.variables:
            return (len(self.values[0]),)
        return tuple(len(v) for v in self.values)

    def cells(self) -> list[dict[str, Any]]:
        combos = zip(*self.values) if self.zipped else itertools.product(*self.values)
        return [dict(zip(self.variables, combo)) for combo in combos]

    def axis_values(self) -> dict[str, list[Any]]:
        if self.zipped and self.variables:
            return {
                self.axes[0]: [", ".join(f"{k}={v}" for k, v in c.items()) for c in self.cells()]
            }
        return {axis: list(v) for axis, v in zip(self.variables, self.values)}


_RANGE = re.compile(r"^(-?\d+)?:(-?\d+)?(?::(-?\d+))?$")

#: cells a sweep may have before it is expanded (a typo such as "0:10000000000" fails fast)
MAX_CELLS = 1_000_000


def _range_values(axis: str, text: str, size: int | None) -> range | list[int]:
    match = _RANGE.match(text.strip())
    if not match:
        raise GridError(
            axis, f"'{text}' is not a range", "write start:stop or start:stop:step, e.g. 0:12"
        )
    start, stop, step = (int(g) if g is not None else None for g in match.groups())
    if step == 0:
        raise GridError(axis, f"range '{text}' has step 0")
    if size is None:
        if start is None or stop is None:
            raise GridError(axis, f"range '{text}' needs a start and a stop for variable '{axis}'")
        values = range(start, stop, step or 1)
        if len(values) > MAX_CELLS:
            raise GridError(
                axis,
                f"range '{text}' has {len(values)} values",
                f"a sweep has at most {MAX_CELLS} cells",
            )
        return values
    picked = list(range(size))[slice(start, stop, step)]
    if not picked:
        what = "layers" if axis == "layer" else "positions"
        raise GridError(
            axis,
            f"range '{text}' selects none of the {size} {what}",
            f"use a range inside 0:{size}",
        )
    return picked


def _axis_values(
    axis: str, spec_values: Any, sizes: dict[str, int | None], head_label: str = "heads"
) -> list[Any]:
    size = sizes.get(axis)
    if spec_values == "all":
        if axis not in sizes:
            raise GridError(
                axis,
                f"'all' only applies to layer, pos and head, not to '{axis}'",
                f"list the values, e.g. {axis}: [0.5, 1.0, 2.0]",
            )
        if size is None and axis == "layer":
            raise GridError(
                axis,
                "layer: all needs a known layer stack; this model (built by a factory) has none",
                "list the layers, e.g. layer: [0, 1, 2]",
            )
        if size is None:
            raise GridError(
                axis,
                "pos: all needs every prompt of the invoke to have the same number of tokens",
                "list the positions, or split the prompts into separate invokes",
            )
        if size == 0:
            raise GridError(axis, f"{axis}: all selects nothing: the model has no attention heads")
        return list(range(size))
    if isinstance(spec_values, str):
        return _range_values(axis, spec_values, size)
    values = list(spec_values)
    if axis in sizes:
        bound = size
        for value in values:
            if not isinstance(value, int) or isinstance(value, bool):
                raise GridError(axis, f"{axis} values must be integers, got {value!r}")
            if bound is not None and not -bound <= value < bound:
                what = {"layer": "layers", "pos": "tokens", "head": head_label}[axis]
                owner = "the prompt" if axis == "pos" else "the model"
                raise GridError(
                    axis,
                    f"{axis} {value} is out of range: {owner} has {bound} {what}",
                    f"use 0..{bound - 1}, or -1..-{bound} from the end",
                )
        if bound is not None:
            values = [v % bound for v in values]
    return values


def count_values(axis: str, values: Any, sizes: dict[str, int | None]) -> int | None:
    """How many values a sweep axis takes, without listing them (None: expanding the axis
    says what is wrong with it)."""
    if isinstance(values, list):
        return len(values)
    if not isinstance(values, str):
        return None
    if values == "all":
        return sizes.get(axis)
    if not _RANGE.match(values.strip()):
        return None
    start, stop, *rest = (int(p) if p.strip() else None for p in values.split(":"))
    step = rest[0] if rest else None
    if step == 0 or len(rest) > 1:
        return None
    size = sizes.get(axis)
    if size is not None:
        return len(range(size)[slice(start, stop, step)])
    if start is None or stop is None:
        return None
    try:
        return len(range(start, stop, step or 1))
    except OverflowError:  # more than sys.maxsize values
        return 2**63


def count_cells(sweep: dict[str, Any] | None, sizes: dict[str, int | None], zipped: bool) -> int:
    """The cells of a sweep, counted without listing them (an axis that cannot be counted
    counts as one value: expanding it reports its problem)."""
    if not sweep:
        return 1
    lengths = [count_values(axis, values, sizes) or 1 for axis, values in sweep.items()]
    return max(lengths) if zipped else math.prod(lengths)


def expand_grid(
    sweep: dict[str, Any] | None,
    n_layers: int | None,
    seq_len: int | None,
    *,
    n_heads: int | None = None,
    zipped: bool = False,
    head_label: str = "heads",
    max_cells: int = MAX_CELLS,
) -> Grid:
    """The grid of a sweep. ``seq_len`` is None when the prompts differ in length; ``head_label``
    names what ``n_heads`` counts in errors (e.g. key/value heads)."""
    if not sweep:
        return Grid((), ())
    sizes: dict[str, int | None] = {"layer": n_layers, "pos": seq_len, "head": n_heads}
    axes = tuple(sweep)
    values = tuple(tuple(_axis_values(axis, sweep[axis], sizes, head_label)) for axis in axes)
    cells = len(values[0]) if zipped else math.prod(len(v) for v in values)
    if cells > max_cells:
        raise GridError(
            axes[0],
            f"the sweep has {cells} cells, more than the {max_cells} allowed",
            "sweep fewer values, or split the sweep into several specs",
        )
    if zipped and len({len(v) for v in values}) > 1:
        lengths = ", ".join(f"{a}: {len(v)}" for a, v in zip(axes, values))
        raise GridError(
            axes[-1],
            f"a zipped sweep needs the same number of values for every variable ({lengths})",
            "give every variable as many values, or use sweep_mode: product",
        )
    return Grid(axes, values, zipped)


def placeholders(obj: Any) -> set[str]:
    """Names of every ``{var}`` placeholder inside nested data."""
    if isinstance(obj, str):
        return set(_PLACEHOLDER.findall(obj))
    if isinstance(obj, dict):
        return set().union(*(placeholders(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list | tuple):
        return set().union(*(placeholders(v) for v in obj)) if obj else set()
    return set()


def substitute(obj: Any, variables: dict[str, Any]) -> Any:
    """Replace placeholders: a string that is exactly ``{var}`` becomes the value itself."""
    if isinstance(obj, str):
        whole = _PLACEHOLDER.fullmatch(obj.removeprefix("-"))
        if whole and whole.group(1) in variables:
            value = variables[whole.group(1)]
            return -value if obj.startswith("-") and isinstance(value, int | float) else value
        return _PLACEHOLDER.sub(
            lambda m: str(variables[m.group(1)]) if m.group(1) in variables else m.group(0), obj
        )
    if isinstance(obj, dict):
        return {k: substitute(v, variables) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, variables) for v in obj]
    return obj
