"""Packing rows into forwards (torch-free): stage order, sorting for prefix and position
reuse, chunk sizes.

Rows of one stage are grouped by their tokens. In a chunk whose rows share their tokens,
nothing differs below the lowest touched layer, so those layers can run once on one row
(``Forward.shared_prefix``); and, under causal attention, nothing differs before the first
touched position in any layer, so the chunk can start there, reading the earlier positions'
keys and values from the untouched run's cache (``Forward.position_start``). Rows of a large
group are ordered to make both as deep as they can be (the cheapest of a few tile orders by
layer and position); small groups share chunks, as rows of different tokens do.

``rows_for_budget`` turns a memory budget into a chunk size using the plan's own estimate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from ..models import ModelInfo
from ..plan import Forward, Row, RowOp
from .memory import row_bytes

__all__ = ["pack_rows", "rows_for_budget", "first_layers", "first_positions"]


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


def first_positions(
    rows: list[Row], ops: Iterable[RowOp], keep_logits: dict[int, set[int]] | None
) -> list[int]:
    """Per row, the first position whose computation differs from the untouched run, or whose
    logits something reads (0 where nothing is known: every position is computed)."""
    if keep_logits is None:
        return [0] * len(rows)
    first = [min(keep_logits.get(i, {len(row.tokens) - 1})) for i, row in enumerate(rows)]
    for op in ops:
        if op.io == "pattern" or not op.positions:  # attention patterns read every query
            first[op.row] = 0
        else:
            first[op.row] = min(first[op.row], min(op.positions))
    return first


#: what one more forward costs, in rows of full work (launches, Python, weights read again)
_FORWARD_OVERHEAD_ROWS = 4
#: groups of identical rows smaller than this share chunks with other rows
_MIN_GROUP = 8


def _best_cuts(
    order: list[int], first: list[int], start: list[int], max_batch: int, n: int, n_layers: int
) -> tuple[int, list[list[int]]]:
    """The cheapest cut of ``order`` into consecutive chunks of at most ``max_batch`` rows
    (dynamic programming over the cut points)."""
    m = len(order)
    best = [0] + [-1] * m
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        low_layer, low_start = n_layers, n
        for i in range(j - 1, -1, -1):
            r = order[i]
            low_layer, low_start = min(low_layer, first[r]), min(low_start, start[r])
            tail, size = n - low_start, j - i
            if size > max_batch:
                break
            shared = min(low_layer, n_layers - 1)
            cost = best[i] + tail * (shared + size * (n_layers - shared))
            cost += _FORWARD_OVERHEAD_ROWS * n * n_layers
            if best[j] < 0 or cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], m
    while j > 0:
        chunks.append(order[cut[j] : j])
        j = cut[j]
    return best[m], chunks[::-1]


def _tile_chunks(
    group: list[int], first: list[int], start: list[int], max_batch: int, n: int, n_layers: int
) -> list[list[int]]:
    """The cheapest chunking of one group of identical rows: a few orders (by layer then
    position, by position then layer, tiles of a few layers or positions at a time), each cut
    at its cheapest points."""
    keys = [lambda r: (first[r], start[r], r), lambda r: (start[r], first[r], r)]
    for t in (2, 4, 8, 16):
        keys.append(lambda r, t=t: (first[r] // t, start[r], first[r], r))
        keys.append(lambda r, t=t: (start[r] // t, first[r], start[r], r))
    results = [_best_cuts(sorted(group, key=k), first, start, max_batch, n, n_layers) for k in keys]
    return min(results, key=lambda result: result[0])[1]


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
    starts: list[int] | None = None,
) -> list[Forward]:
    """Forwards in stage order; within a stage, rows ordered so chunks share deep prefixes and
    late start positions (``starts``: each row's first touched position; None: no position
    reuse)."""
    by_stage: dict[int, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        if not skip or index not in skip:  # rows that generate have forwards of their own
            by_stage[stages[row.invoke]].append(index)
    forwards: list[Forward] = []
    start = starts if starts is not None else [0] * len(rows)
    for stage in sorted(by_stage):
        groups: dict[tuple, list[int]] = defaultdict(list)
        for r in sorted(by_stage[stage], key=lambda r: (rows[r].tokens, rows[r].input or "")):
            groups[rows[r].identity].append(r)
        pool: list[int] = []  # rows of small groups, packed together as they come
        chunks: list[list[int]] = []
        memo: dict[tuple, list[list[int]]] = {}  # groups of one shape (items) chunk alike
        for group in groups.values():
            if len(group) < _MIN_GROUP or not prefix_reuse:
                pool.extend(sorted(group, key=lambda r: (first[r], r)))
                continue
            shape = tuple((first[r], start[r]) for r in group)
            if shape not in memo:
                n = len(rows[group[0]].tokens)
                local = list(range(len(group)))
                f, s = [first[r] for r in group], [start[r] for r in group]
                memo[shape] = _tile_chunks(local, f, s, max_batch, n, n_layers)
            chunks += [[group[i] for i in chunk] for chunk in memo[shape]]
        chunks += [pool[i : i + max_batch] for i in range(0, len(pool), max_batch)]
        for chunk in chunks:
            seq = max(len(rows[r].tokens) for r in chunk)
            shared = begin = 0
            if prefix_reuse and len(chunk) > 1 and len({rows[r].identity for r in chunk}) == 1:
                # rows without ops report n_layers: the copy must still happen at a layer's input
                shared = min(min(first[r] for r in chunk), n_layers - 1)
                begin = min(start[r] for r in chunk)  # one row alone: the untouched run costs more
            keep = None
            if keep_logits is not None:
                keep = tuple(sorted(set().union(*(keep_logits.get(r, set()) for r in chunk))))
                keep = keep or (seq - 1,)  # nothing reads these rows' logits: the fewest there are
            forwards.append(Forward(stage, tuple(sorted(chunk)), seq, shared, keep, None, begin))
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
