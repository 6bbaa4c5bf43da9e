"""Runs in blocks of items (torch-free): a dataset run whose rows would not fit one plan
comfortably is compiled and run a block of items at a time, so that what it holds does not grow
with the number of items (a plan keeps a few kB per row: token ids, ops, metric slots).

A block is an ordinary plan over a window of the items (item numbers, labels and seeds stay the
whole dataset's); invokes that do not run over the dataset run again in every block. The
engine's per-item results of the blocks are joined along the ``item`` axis and only then
aggregated, so a mean, a median, a bootstrap interval or a claim sees every item.

A spec runs in one plan when an item's rows read other items' values (``mean_ablate``,
``resample_ablate``, ``noise`` with ``std_of``, saved values), when it sweeps positions of the
items' prompts (``all`` and ``-1`` depend on every item's length), when it generates or runs a
backward pass over the dataset, or when a claim names single items: :func:`why_one_plan`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from .. import spec as S
from ..errors import SpecError
from ..plan import Plan, PlanSave
from .context import Items
from .dataset import column_names, read_items

__all__ = [
    "BLOCK_ROWS",
    "Blocks",
    "plan_blocks",
    "why_one_plan",
    "rows_per_item",
    "item_blocks",
    "describe_blocks",
    "fold_saves",
    "widen",
]

#: rows a block's plan holds at most (unless one item has more): a few tens of MB of plan
BLOCK_ROWS = 32_768

_CROSS_ITEM_OPS = (S.MeanAblateOp, S.ResampleAblateOp)


def _reads_saved(value: Any) -> bool:
    if isinstance(value, dict):
        return bool({"saved", "mean_diff"} & value.keys()) or any(
            _reads_saved(v) for v in value.values()
        )
    if isinstance(value, list):
        return any(_reads_saved(v) for v in value)
    return False


def why_one_plan(spec: S.Spec) -> str | None:
    """Why the spec's items must share one plan (None: they can run in blocks)."""
    if spec.dataset is None:
        return "no dataset"
    if spec.backward is not None:
        return "a backward pass"
    for name, invoke in spec.invokes.items():
        if invoke.generate is not None:
            return f"invoke '{name}' generates"
        if "pos" in (invoke.sweep or {}) and column_names(invoke.prompt):
            # the positions a sweep means (all, -1) depend on every item's length
            return f"invoke '{name}' sweeps positions of the items' prompts"
        for op in invoke.ops or []:
            data = op.model_dump(by_alias=True, exclude_none=True)
            if isinstance(op, _CROSS_ITEM_OPS):
                return f"invoke '{name}' has {op.op} (it reads other items)"
            if isinstance(op, S.NoiseOp) and op.std_of is not None:
                return f"invoke '{name}' scales noise by a std over items"
            if _reads_saved(data):
                return f"invoke '{name}' reads a saved value"
    for name, metric in spec.metrics.items():
        if metric.whole_dataset:
            return f"metric '{name}' trains on every item at once"
    for expectation in spec.expect or []:
        if expectation.saved is not None:
            return "a claim on a saved value"
        if "item" in expectation.where or expectation.equals is not None:
            return "a claim names single items"
        if expectation.approx is not None and not isinstance(expectation.approx, int | float):
            return "a claim names single items"
    return None


def rows_per_item(plan: Plan, n_items: int) -> tuple[int, int]:
    """(rows per item, rows of invokes that run once) of a plan over ``n_items`` items."""
    over = plan.item_invokes
    item_rows = sum(1 for row in plan.rows if row.invoke in over)
    return item_rows // max(1, n_items), len(plan.rows) - item_rows


def item_blocks(
    per_item: int, once: int, n_items: int, block_rows: int = BLOCK_ROWS
) -> list[tuple[int, int]]:
    """Item ranges (the last may be shorter) whose plans hold at most ``block_rows`` rows:
    ``per_item`` rows per item, and ``once`` rows of invokes that run once."""
    if per_item == 0:
        return [(0, n_items)]
    size = max(1, (block_rows - once) // per_item)
    return [(start, min(n_items, start + size)) for start in range(0, n_items, size)]


def describe_blocks(spec: S.Spec, plan: Plan, block_rows: int = BLOCK_ROWS) -> str | None:
    """How ``specsight run`` runs the plan of a whole dataset, when not as one plan of at most
    ``block_rows`` rows (None)."""
    if plan.dataset is None or len(plan.rows) <= block_rows:
        return None
    why = why_one_plan(spec)
    if why is not None:
        return f"runs as one plan of {len(plan.rows):,} rows: {why}"
    n_items = plan.dataset.used
    ranges = item_blocks(*rows_per_item(plan, n_items), n_items, block_rows)
    size = ranges[0][1] - ranges[0][0]
    return (
        f"runs in {len(ranges)} blocks of up to {size:,} items (at most {block_rows:,} rows each)"
    )


def fold_saves(seen: dict[str, PlanSave], plan: Plan) -> None:
    """Fold one block's saves into ``seen``: what every block's rows share along the value
    axes (the positions every row saved), and the position counts of any row."""
    for save in plan.saves:
        old = seen.get(save.name)
        if old is None:
            seen[save.name] = save
            continue
        shared = {
            axis: values
            for axis, values in old.value_axis_values.items()
            if save.value_axis_values.get(axis) == values
        }
        counts = tuple(sorted(set(old.n_positions) | set(save.n_positions)))
        # each block's rows are its items: their positions follow on where items are the only axis
        rows = old.row_positions + save.row_positions if old.axes == ("item",) else ()
        seen[save.name] = replace(
            old, value_axis_values=shared, n_positions=counts, row_positions=rows
        )


def widen(
    first: Plan, n_items: int, tokens: dict[str, list[int]], saves: dict[str, PlanSave]
) -> Plan:
    """The plan of the first block, described as the whole run: every item on the ``item``
    axes of metrics, saves and invokes (``tokens``: each item invoke's prompt lengths;
    ``saves``: the blocks' saves folded by :func:`fold_saves`). Rows, ops and forwards stay
    the first block's; it is what results are labelled from."""
    over = first.item_invokes

    def grown(axes: tuple[str, ...], shape: tuple[int, ...], invoke: str) -> tuple[int, ...]:
        if invoke not in over or "item" not in axes:
            return shape
        sizes = list(shape)
        sizes[axes.index("item")] = n_items
        return tuple(sizes)

    metrics = []
    for metric in first.metrics:
        reduce = metric.reduce
        if reduce and metric.invoke in over and metric.axes[reduce.axis] == "item":
            reduce = replace(reduce, size=n_items)
        shape = grown(metric.axes, metric.shape, metric.invoke)
        metrics.append(replace(metric, shape=shape, reduce=reduce))
    saves = [replace(s, shape=grown(s.axes, s.shape, s.invoke)) for s in saves.values()]
    invokes = dict(first.invokes)
    for name in over:
        info = invokes[name]
        values = dict(info.axis_values)
        if "item" in values:
            values["item"] = tuple(range(n_items))
        invokes[name] = replace(
            info, prompts=n_items, tokens=tuple(tokens[name]), axis_values=values
        )
    return replace(first, metrics=tuple(metrics), saves=tuple(saves), invokes=invokes)


@dataclass
class Blocks:
    """A dataset run in blocks of items: each block's plan is compiled when the run reaches it
    (:meth:`plans`), and :meth:`whole` describes the joined run, from which results are
    labelled. ``compiler(items=...)`` compiles the spec over a window of the items."""

    items: Items
    ranges: list[tuple[int, int]]
    compiler: Callable[..., Plan]
    first: Plan  # the first item's plan: rows per item, the invokes over the dataset
    compile_s: float = 0.0
    _tokens: dict[str, list[int]] = field(default_factory=dict)
    _saves: dict[str, PlanSave] = field(default_factory=dict)
    _head: Plan | None = None
    _whole: Plan | None = None

    @property
    def total_rows(self) -> int:
        """Rows of every block: the items' rows, and the rows that run once in every block."""
        per_item, once = rows_per_item(self.first, 1)
        return per_item * len(self.items.rows) + once * len(self.ranges)

    def plans(self) -> Iterator[Plan]:
        """Each block's plan, compiled in turn."""
        for start, stop in self.ranges:
            began = time.perf_counter()
            plan = self.compiler(items=self.items.window(start, stop))
            self.compile_s += time.perf_counter() - began
            self._head = self._head or plan
            fold_saves(self._saves, plan)
            for name in plan.item_invokes:
                self._tokens.setdefault(name, []).extend(plan.invokes[name].tokens)
            yield plan

    def whole(self) -> Plan:
        """The joined run's plan (after :meth:`plans` ran through every block)."""
        assert self._head is not None, "no block was compiled"
        if self._whole is None:
            self._whole = widen(self._head, len(self.items.rows), self._tokens, self._saves)
        return self._whole


def plan_blocks(spec: S.Spec, compiler: Callable[..., Plan], block_rows: int = BLOCK_ROWS, items: Items | None = None) -> tuple[Items | None, Blocks | None]:  # fmt: skip
    """How a spec runs: (its dataset's items when read, the blocks when it runs in blocks,
    else None: one plan over those items). A spec whose first item does not compile runs as one
    plan, so that its error report is complete. ``items``: the dataset already read."""
    if why_one_plan(spec) is not None:
        return items, None
    if items is None:
        items = read_items(spec, S.document_of(spec))
    if items is None or len(items.rows) < 2:
        return items, None
    try:
        first = compiler(items=items.window(0, 1))
    except SpecError:
        return items, None
    ranges = item_blocks(*rows_per_item(first, 1), len(items.rows), block_rows)
    if len(ranges) < 2:
        return items, None
    return items, Blocks(items, ranges, compiler, first)
