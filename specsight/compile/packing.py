"""Packing rows into forwards (torch-free): stage order, sorting for prefix reuse, chunk sizes.

Rows of one stage are sorted by their tokens and by the first layer any op of theirs touches,
then cut into chunks of at most ``max_batch`` rows. In a chunk whose rows share their tokens,
nothing differs below the lowest touched layer, so those layers can run once on one row
(``Forward.shared_prefix``); sorting by first layer makes that prefix as deep as it can be.

``rows_for_budget`` turns a memory budget into a chunk size using the plan's own estimate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from ..models import ModelInfo
from ..plan import Forward, Row, RowOp
from .memory import row_bytes

__all__ = ["pack_rows", "rows_for_budget", "first_layers"]


def first_layers(
    rows: list[Row], ops: Iterable[RowOp], n_layers: int, after_layers: set[str]
) -> list[int]:
    """Per row, the first layer whose computation differs from an untouched row.

    An op inside layer L pins it to L; an op on a module after the layer stack (final norm,
    unembedding) pins nothing; any other module outside the stack (embeddings) pins 0.
    """
    first = [n_layers] * len(rows)
    for op in ops:
        if op.layer is not None:
            layer = op.layer
        elif op.module in after_layers:
            continue
        else:
            layer = 0
        first[op.row] = min(first[op.row], layer)
    return first


def pack_rows(
    rows: list[Row],
    stages: dict[str, int],
    first: list[int],
    max_batch: int,
    n_layers: int,
    *,
    prefix_reuse: bool = True,
    keep_logits: dict[int, set[int]] | None = None,
    skip: set[int] | None = None,
) -> list[Forward]:
    """Forwards in stage order; within a stage, rows sorted so chunks share deep prefixes."""
    by_stage: dict[int, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        if not skip or index not in skip:  # rows that generate have forwards of their own
            by_stage[stages[row.invoke]].append(index)
    forwards: list[Forward] = []
    for stage in sorted(by_stage):
        order = sorted(
            by_stage[stage], key=lambda r: (rows[r].tokens, rows[r].input or "", first[r], r)
        )
        for start in range(0, len(order), max_batch):
            chunk = order[start : start + max_batch]
            seq = max(len(rows[r].tokens) for r in chunk)
            shared = 0
            if prefix_reuse and len(chunk) > 1 and len({rows[r].identity for r in chunk}) == 1:
                # rows without ops report n_layers: the copy must still happen at a layer's input
                shared = min(min(first[r] for r in chunk), n_layers - 1)
            keep = None
            if keep_logits is not None:
                keep = tuple(sorted(set().union(*(keep_logits.get(r, set()) for r in chunk))))
                keep = keep or (seq - 1,)  # nothing reads these rows' logits: the fewest there are
            forwards.append(Forward(stage, tuple(sorted(chunk)), seq, shared, keep))
    return forwards


def rows_for_budget(
    info: ModelInfo,
    seq_len: int,
    dtype: str,
    budget_bytes: int,
    *,
    cap: int,
    logits_positions: int | None = None,
) -> int:
    """How many rows fit the activation budget (at least 1, at most ``cap``)."""
    per_row = max(1, row_bytes(info, seq_len, dtype, logits_positions=logits_positions))
    return max(1, min(cap, budget_bytes // per_row))
