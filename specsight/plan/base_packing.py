"""Packing with reuse of untouched runs (torch-free): rows of one token length, from any
number of token sequences, share forwards that skip what the untouched run already computed.

A row's computation differs from its sequence's untouched run only from its first touched
layer S and its first touched (or read) position p on: under causal attention, nothing before
p changes in any layer, and nothing below S changes at all. Such a row needs only layers >= S at
positions >= p. A forward of these rows (``Forward.from_base``) takes layer S's input at
positions >= p and the keys and values of positions < p from each row's untouched run (one run
per sequence, kept by the engine), so rows of different sequences (dataset items) share it.

Rows are ordered by (p, S) in a few tile orders and cut into forwards by dynamic programming
over runs of equal keys, under a cost model: the row-layer-positions each forward computes,
plus a fixed cost per forward. A forward that starts late computes fewer positions per row,
so it may hold more rows (up to ``_LATE_ROWS`` x ``max_batch``, as long as rows x positions
stay within ``max_batch`` full rows). Sequences are taken in blocks of ``block``, so the
engine holds at most that many untouched runs at once.
"""

from __future__ import annotations

from collections.abc import Callable

from .records import Row

__all__ = ["base_chunks", "sequences_in_blocks", "worth_a_base"]

#: what one more forward costs, in rows of full work (launches, Python, weights read again)
FORWARD_OVERHEAD_ROWS = 4
#: a late forward may hold up to this many times ``max_batch`` rows
_LATE_ROWS = 4


def worth_a_base(
    group: list[int], first: list[int], start: list[int], n: int, n_layers: int
) -> bool:
    """Whether one untouched run of a sequence (one full row of work) costs less than what
    its rows save by reading from it (``first`` at most the last layer)."""
    full = n * n_layers
    saved = sum(full - (n - start[r]) * (n_layers - first[r]) for r in group)
    return saved > full


def _late_cap(max_batch: int, n: int, tail: int) -> int:
    """Rows a forward running ``tail`` of ``n`` positions may hold."""
    return max(1, min(_LATE_ROWS * max_batch, max_batch * n // tail))


def _orders(first: list[int], start: list[int]) -> list[Callable[[int], tuple]]:
    keys: list[Callable[[int], tuple]] = [
        lambda r: (start[r], first[r]),
        lambda r: (first[r], start[r]),
    ]
    for t in (2, 4, 8):
        keys.append(lambda r, t=t: (start[r] // t, first[r], start[r]))
        keys.append(lambda r, t=t: (first[r] // t, start[r], first[r]))
    return keys


def _cut(
    runs: list[list[int]], first: list[int], start: list[int], max_batch: int, n: int, n_layers: int
) -> tuple[float, list[list[int]]]:
    """The cheapest cut of consecutive runs (rows of one key) into forwards: a range of runs
    shares forwards; a range of several runs must fit one forward."""
    overhead = FORWARD_OVERHEAD_ROWS * n * n_layers
    m = len(runs)
    best = [0.0] + [float("inf")] * m
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        rows = 0
        low_layer, low_start = n_layers - 1, n
        for i in range(j - 1, -1, -1):
            run = runs[i]
            rows += len(run)
            low_layer = min(low_layer, first[run[0]])
            low_start = min(low_start, start[run[0]])
            tail = n - low_start
            forwards = -(-rows // _late_cap(max_batch, n, tail))
            if forwards > 1 and i < j - 1:
                break
            cost = best[i] + rows * tail * (n_layers - low_layer) + forwards * overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks: list[list[int]] = []
    j = m
    while j > 0:
        i = cut[j]
        members = [r for run in runs[i:j] for r in run]
        low_start = min(start[r] for r in members)
        pieces = -(-len(members) // _late_cap(max_batch, n, n - low_start))
        size = -(-len(members) // pieces)
        chunks[:0] = [members[k : k + size] for k in range(0, len(members), size)]
        j = i
    return best[m], chunks


def base_chunks(
    group: list[int], first: list[int], start: list[int], max_batch: int, n: int, n_layers: int
) -> list[list[int]]:
    """Forwards for rows of one token length ``n`` (any sequences): the cheapest of a few
    orders by (position, layer), each cut at its cheapest points (``first`` at most the last
    layer)."""
    best: tuple[float, list[list[int]]] | None = None
    for key in _orders(first, start):
        runs: list[list[int]] = []
        last = None
        for r in sorted(group, key=lambda r: (*key(r), r)):
            k = (start[r], first[r])
            if k != last:
                runs.append([])
                last = k
            runs[-1].append(r)
        result = _cut(runs, first, start, max_batch, n, n_layers)
        if best is None or result[0] < best[0]:
            best = result
    return best[1] if best else []


def sequences_in_blocks(rows: list[Row], members: list[int], block: int) -> list[list[int]]:
    """``members`` in blocks of at most ``block`` token sequences, in first-seen order."""
    index: dict[tuple[int, ...], int] = {}
    for r in members:
        index.setdefault(rows[r].tokens, len(index))
    blocks: list[list[int]] = [[] for _ in range(-(-len(index) // block))]
    for r in members:
        blocks[index[rows[r].tokens] // block].append(r)
    return blocks
