"""Packing rows into forwards: stage order, sorting for prefix and position reuse, chunk sizes
(torch-free). The compiler packs a spec's rows; a batch of jobs packs every job's rows again
(:mod:`.merge`), from the plan alone.

With position reuse, rows of sequences that gain from it read their sequence's untouched run
(:mod:`.base_packing`: later layers and positions only, rows of many sequences per forward).
The other rows are grouped by their tokens: in a chunk whose rows share their tokens, nothing
differs below the lowest touched layer, so those layers run once on one row
(``Forward.shared_prefix``); rows of a large group are ordered by that layer and cut where it
costs least; small groups share chunks, as rows of different tokens do.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from .base_packing import FORWARD_OVERHEAD_ROWS, base_chunks, sequences_in_blocks, worth_a_base
from .records import Forward, InvokeInfo, Metric, Op, Row
from .refs import Rows

__all__ = ["Packing", "pack_rows", "first_layers", "first_positions", "logit_reads"]


@dataclass(frozen=True, kw_only=True)
class Packing:
    """How rows are packed into forwards, and what of the model packing needs to know."""

    max_batch: int = 64
    n_layers: int
    #: identical rows run their untouched first layers once
    prefix_reuse: bool = True
    #: rows read their sequence's untouched run (text models, with prefix reuse)
    position_reuse: bool = True
    #: sequences whose untouched runs the engine holds at once
    untouched_block: int = 64
    #: modules after the layer stack (final norm, unembedding): they pin no layer
    after_layers: tuple[str, ...] = ()
    #: the unembedding: an op on it needs every position's logits
    logits_module: str | None = None


def first_layers(rows: list[Row], ops: Iterable[Op], packing: Packing) -> list[int]:
    """Per row, the first layer whose computation differs from an untouched row.

    An op inside layer L pins it to L; an op on a module after the layer stack (final norm,
    unembedding) pins nothing; any other module outside the stack (embeddings) pins 0.
    """
    first = [packing.n_layers] * len(rows)
    for op in ops:
        if op.layer is not None:
            layer = op.layer
        elif op.module in packing.after_layers:
            continue
        else:
            layer = 0
        first[op.row] = min(first[op.row], layer)
    return first


def first_positions(
    rows: list[Row], ops: Iterable[Op], keep_logits: dict[int, set[int]] | None
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


def logit_reads(
    rows: list[Row],
    ops: Iterable[Op],
    metrics: Iterable[Metric],
    invokes: dict[str, InvokeInfo],
    packing: Packing,
) -> dict[int, set[int]] | None:
    """Per row, the positions whose logits anything reads; None when all must be computed
    (an op acts on the unembedding)."""
    if packing.logits_module is None or any(op.module == packing.logits_module for op in ops):
        return None
    keep: dict[int, set[int]] = {}
    for metric in metrics:
        for row, pos in metric.logit_reads():
            keep.setdefault(row, set()).add(pos)
    for index, row in enumerate(rows):
        if not invokes[row.invoke].axes:  # the summary shows next tokens of unswept rows
            keep.setdefault(index, set()).add(len(row.tokens) - 1)
    return keep


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


@dataclass(frozen=True)
class _Rows:
    """What packing knows of every row: the rows, their stage, first touched layer and first
    touched position (None: no position reuse), and the positions whose logits are read."""

    rows: list[Row]
    stage: list[int]
    first: list[int]
    starts: list[int] | None
    keep: dict[int, set[int]] | None


def pack_rows(
    rows: list[Row],
    ops: list[Op],
    stages: dict[str, int],
    keep_logits: dict[int, set[int]] | None,
    packing: Packing,
    skip: set[int] = frozenset(),  # type: ignore[assignment]
) -> list[Forward]:
    """Forwards for every row but ``skip`` (rows that generate have forwards of their own), in
    stage order; within a stage, rows ordered so chunks share deep prefixes and late start
    positions. With position reuse, rows of sequences that gain from it read their untouched
    run (:mod:`.base_packing`), ``packing.untouched_block`` sequences at a time."""
    reuse = packing.position_reuse and packing.prefix_reuse
    info = _Rows(
        rows,
        [stages[row.invoke] for row in rows],
        first_layers(rows, ops, packing),
        first_positions(rows, ops, keep_logits) if reuse else None,
        keep_logits,
    )
    by_stage: dict[int, list[int]] = defaultdict(list)
    for index in range(len(rows)):
        if index not in skip:
            by_stage[info.stage[index]].append(index)
    forwards: list[Forward] = []
    for stage in sorted(by_stage):
        members = by_stage[stage]
        if info.starts is not None:
            based, members = _from_base(info, members, stage, packing)
            forwards += based
        forwards += _prefix_chunks(info, members, stage, packing)
    return forwards


def _prefix_chunks(info: _Rows, members: list[int], stage: int, packing: Packing) -> list[Forward]:
    """Forwards of rows packed by their tokens, sharing the layers below their first touched
    one where a chunk's rows are identical."""
    rows, first, n_layers = info.rows, info.first, packing.n_layers
    groups: dict[tuple, list[int]] = defaultdict(list)
    for r in sorted(members, key=lambda r: (rows[r].tokens, rows[r].input or "")):
        groups[rows[r].identity].append(r)
    pool: list[int] = []  # rows of small groups, packed together as they come
    chunks: list[list[int]] = []
    memo: dict[tuple, list[list[int]]] = {}  # groups of one shape (items) chunk alike
    for group in groups.values():
        if len(group) < _MIN_GROUP or not packing.prefix_reuse:
            pool.extend(sorted(group, key=lambda r: (first[r], r)))
            continue
        shape = tuple(first[r] for r in group)
        if shape not in memo:
            memo[shape] = _layer_chunks(
                list(range(len(group))), list(shape), packing.max_batch, n_layers
            )
        chunks += [[group[i] for i in chunk] for chunk in memo[shape]]
    size = packing.max_batch
    chunks += [pool[i : i + size] for i in range(0, len(pool), size)]
    forwards = []
    for chunk in chunks:
        seq = max(len(rows[r].tokens) for r in chunk)
        shared = 0
        if packing.prefix_reuse and len(chunk) > 1 and len({rows[r].identity for r in chunk}) == 1:
            # rows without ops report n_layers: the copy must still happen at a layer's input
            shared = min(min(first[r] for r in chunk), n_layers - 1)
        keep = _kept(chunk, info.keep, seq)
        forwards.append(
            Forward(
                stage=stage,
                rows=Rows(sorted(chunk)),
                seq_len=seq,
                shared_prefix=shared,
                keep_logits=keep,
            )
        )
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
    info: _Rows, members: list[int], stage: int, packing: Packing
) -> tuple[list[Forward], list[int]]:
    """The forwards of rows that read their sequence's untouched run, and the other rows."""
    rows, n_layers = info.rows, packing.n_layers
    # a row without ops still runs the last layer: a forward of it starts there at the latest
    first = [min(f, n_layers - 1) for f in info.first]
    start = info.starts
    assert start is not None
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
        for part in sequences_in_blocks(rows, group, packing.untouched_block):
            for chunk in base_chunks(part, first, start, packing.max_batch, n, n_layers):
                shared = min(first[r] for r in chunk)
                begin = min(start[r] for r in chunk)
                forwards.append(
                    Forward(
                        stage=stage,
                        rows=Rows(sorted(chunk)),
                        seq_len=n,
                        shared_prefix=shared,
                        keep_logits=_kept(chunk, info.keep, n),
                        position_start=begin,
                        from_base=bool(shared or begin),  # else nothing to read: a plain forward
                    )
                )
    return forwards, rest
