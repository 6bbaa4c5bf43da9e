"""The compiler: a validated :class:`~specsight.spec.Spec` and a model's
:class:`~specsight.models.ModelInfo` and tokenizer into a :class:`~specsight.plan.Plan` (no torch).

:func:`compile_plan` runs the passes over a shared :class:`Context`: inputs (prompts, images,
tensors), stages (what reads from what), cells (sweeps into rows), ops, metrics, generation and
gradient checks, expectations, then packing rows into forwards under a memory budget.
:mod:`.blocks` splits a large dataset run into blocks of items.
"""

from .blocks import (
    BLOCK_ROWS,
    Blocks,
    describe_blocks,
    fold_saves,
    item_blocks,
    plan_blocks,
    rows_per_item,
    why_one_plan,
    widen,
)
from .compiler import DEFAULT_MAX_BATCH, Budget, compile_plan
from .context import Abort, Context, Items, SpecPath
from .dataset import dataset_rows, read_items
from .memory import activation_budget, batch_cap, estimate_memory, row_bytes
from .positions import PositionError, resolve_position, resolve_positions
from .references import check_references
from .sizes import SpecSizes, spec_sizes
from .sweep import MAX_CELLS, Grid, GridError, expand_grid

__all__ = [
    "BLOCK_ROWS",
    "Blocks",
    "Budget",
    "plan_blocks",
    "DEFAULT_MAX_BATCH",
    "Items",
    "describe_blocks",
    "fold_saves",
    "rows_per_item",
    "item_blocks",
    "read_items",
    "why_one_plan",
    "widen",
    "MAX_CELLS",
    "Abort",
    "Context",
    "Grid",
    "GridError",
    "PositionError",
    "SpecPath",
    "activation_budget",
    "check_references",
    "batch_cap",
    "compile_plan",
    "dataset_rows",
    "estimate_memory",
    "expand_grid",
    "resolve_position",
    "resolve_positions",
    "row_bytes",
    "spec_sizes",
    "SpecSizes",
]
