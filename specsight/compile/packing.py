"""Packing rows into forwards (torch-free): stage order, sorting for prefix and position
reuse, chunk sizes.

With position reuse, rows of sequences that gain from it read their sequence's untouched run
(:mod:`.base_packing`: later layers and positions only, rows of many sequences per forward).
The other rows are grouped by their tokens: in a chunk whose rows share their tokens, nothing
differs below the lowest touched layer, so those layers run once on one row
(``Forward.shared_prefix``); rows of a large group are ordered by that layer and cut where it
costs least; small groups share chunks, as rows of different tokens do.

``rows_for_budget`` turns a memory budget into a chunk size using the plan's own estimate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from ..models import ModelInfo
from ..plan import Forward, Row, RowOp
from .base_packing import FORWARD_OVERHEAD_ROWS, base_chunks, sequences_in_blocks, worth_a_base
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


#: groups of identical rows smaller than this share chunks with other rows
_MIN_GROUP = 8


def _layer_chunks(
    group: list[int], first: list[int], max_batch: int, n_layers: int
) -> list[list[int]]:
    """The cheapest cut of one group of identical rows, ordered by first touched layer, into
    chunks of at most ``max_batch`` rows (dynamic programming over the cut points)."""
    order = sorted(group, key=lambda r: (first[r], r))
    overhead = FORWARD_OVERHEAD_ROWS * n_layers
    m = len(order)
    best = [0] + [-1] * m
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        low_layer = n_layers
        for i in range(j - 1, max(-1, j - 1 - max_batch), -1):
            low_layer = min(low_layer, first[order[i]])
            shared = min(low_layer, n_layers - 1)
            cost = best[i] + shared + (j - i) * (n_layers - shared) + overhead
            if best[j] < 0 or cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], m
    while j > 0:
        chunks.append(order[cut[j] : j])
        j = cut[j]
    return chunks[::-1]


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
    block: int = 64,
) -> list[Forward]:
    """Forwards in stage order; within a stage, rows ordered so chunks share deep prefixes and
    late start positions (``starts``: each row's first touched position; None: no position
    reuse). With ``starts``, rows of sequences that gain from it read their untouched run
    (:mod:`.base_packing`), ``block`` sequences at a time."""
    by_stage: dict[int, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        if not skip or index not in skip:  # rows that generate have forwards of their own
            by_stage[stages[row.invoke]].append(index)
    forwards: list[Forward] = []
    # a row without ops still runs the last layer: a forward of it starts there at the latest
    last_layer = [min(f, n_layers - 1) for f in first] if starts is not None else first
    for stage in sorted(by_stage):
        members = by_stage[stage]
        if starts is not None and prefix_reuse:
            based, members = _from_base(
                rows, members, stage, last_layer, starts, max_batch, n_layers, keep_logits, block
            )
            forwards += based
        groups: dict[tuple, list[int]] = defaultdict(list)
        for r in sorted(members, key=lambda r: (rows[r].tokens, rows[r].input or "")):
            groups[rows[r].identity].append(r)
        pool: list[int] = []  # rows of small groups, packed together as they come
        chunks: list[list[int]] = []
        memo: dict[tuple, list[list[int]]] = {}  # groups of one shape (items) chunk alike
        for group in groups.values():
            if len(group) < _MIN_GROUP or not prefix_reuse:
                pool.extend(sorted(group, key=lambda r: (first[r], r)))
                continue
            shape = tuple(first[r] for r in group)
            if shape not in memo:
                memo[shape] = _layer_chunks(
                    list(range(len(group))), list(shape), max_batch, n_layers
                )
            chunks += [[group[i] for i in chunk] for chunk in memo[shape]]
        chunks += [pool[i : i + max_batch] for i in range(0, len(pool), max_batch)]
        for chunk in chunks:
            seq = max(len(rows[r].tokens) for r in chunk)
            shared = 0
            if prefix_reuse and len(chunk) > 1 and len({rows[r].identity for r in chunk}) == 1:
                # rows without ops report n_layers: the copy must still happen at a layer's input
                shared = min(min(first[r] for r in chunk), n_layers - 1)
            keep = _kept(chunk, keep_logits, seq)
            forwards.append(Forward(stage, tuple(sorted(chunk)), seq, shared, keep))
    return forwards


def _kept(
    chunk: list[int], keep_logits: dict[int, set[int]] | None, seq: int
) -> tuple[int, ...] | None:
    """The positions whose logits a forward of ``chunk`` unembeds (None: all)."""
    if keep_logits is None:
        return None
    keep = tuple(sorted(set().union(*(keep_logits.get(r, set()) for r in chunk))))
    return keep or (seq - 1,)  # nothing reads these rows' logits: the fewest there are


def _from_base(
    rows: list[Row],
    members: list[int],
    stage: int,
    first: list[int],
    start: list[int],
    max_batch: int,
    n_layers: int,
    keep_logits: dict[int, set[int]] | None,
    block: int,
) -> tuple[list[Forward], list[int]]:
    """The forwards of rows that read their sequence's untouched run, and the other rows
    (``first`` at most the last layer)."""
    by_sequence: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for r in members:
        by_sequence[rows[r].tokens].append(r)
    rest: list[int] = []
    by_length: dict[int, list[int]] = defaultdict(list)
    for tokens, group in by_sequence.items():
        if worth_a_base(group, first, start, len(tokens), n_layers):
            by_length[len(tokens)].extend(group)
        else:
            rest.extend(group)
    forwards: list[Forward] = []
    for n, group in sorted(by_length.items()):
        for part in sequences_in_blocks(rows, group, block):
            for chunk in base_chunks(part, first, start, max_batch, n, n_layers):
                shared = min(first[r] for r in chunk)
                begin = min(start[r] for r in chunk)
                keep = _kept(chunk, keep_logits, n)
                based = bool(shared or begin)  # else nothing to read: a plain forward
                forwards.append(
                    Forward(stage, tuple(sorted(chunk)), n, shared, keep, None, begin, based)
                )
    return forwards, rest


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
