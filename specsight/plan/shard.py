"""Cutting one plan into shards: processes that each run some of its forwards, whose outputs
merge into exactly what one run of the plan gives (the engine's ``shards`` run and merge them).

A shard runs every forward of the earlier stages (their rows are what the last stage reads:
patch sources, captures, kl references) and a contiguous chunk of the last stage's forwards
(:func:`shard_forwards`). A forward's numbers then depend only on its own rows and ops, on what
the earlier stages left, and on the untouched runs it reads. :func:`shardable` refuses the
plans where anything else ties the last stage's forwards together.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

from .plan import Plan

__all__ = ["shardable", "shard_forwards", "checked_shard", "last_stage"]


def last_stage(plan: Plan) -> tuple[int, dict[int, int]]:
    """The last stage, and the stage of each row."""
    stage_of = {row: f.stage for f in plan.forwards for row in f.rows}
    return max((f.stage for f in plan.forwards), default=0), stage_of


def shardable(plan: Plan) -> str | None:
    """None when shards of ``plan`` merge into exactly what one run gives, else why not."""
    if any(True for _ in plan.generating()):
        return "it generates (decoding runs its own loop and may sample)"
    if plan.backward:
        return "it runs a backward pass"
    for metric in plan.metrics:
        if getattr(metric, "own_forwards", False):
            return f"metric '{metric.name}' ({metric.kind}) runs forwards of its own"
        if metric.stored_reads():
            return f"metric '{metric.name}' ({metric.kind}) reads stored values after the run"
    stages = [f.stage for f in plan.forwards]
    if stages != sorted(stages):
        return "its forwards are not in stage order"
    last, stage_of = last_stage(plan)
    if stages.count(last) < 2:
        return f"its last stage has {stages.count(last)} forward(s): nothing to split"
    writers: dict[str, set[int]] = {}
    for op in plan.ops:
        key = op.stores()
        if key is not None:
            writers.setdefault(key, set()).add(op.row)
    for save in plan.saves:
        for key in save.keys:
            if len(writers.get(key, ())) != 1:
                return f"saved value '{key}' does not come from exactly one row"
    for op in plan.ops:
        if stage_of.get(op.row) != last:
            continue
        for key in op.reads():  # written in an earlier stage, or by the row itself
            if key not in writers:
                return f"{op.origin or op.kind} reads '{key}', which no row writes"
            if any(r != op.row and stage_of.get(r, last) >= last for r in writers[key]):
                return f"{op.origin or op.kind} reads '{key}', which the last stage writes"
    for metric in plan.metrics:
        if any(stage_of.get(row, last) >= last for row, _ in metric.reference_reads()):
            return f"{metric.kind} metric '{metric.name}' compares rows of the last stage with each other"
    return None


def _refuse(plan: Plan) -> None:
    reason = shardable(plan)
    if reason is not None:
        raise ValueError(f"this plan cannot run in shards: {reason}")


def shard_forwards(plan: Plan, n: int) -> list[tuple[int, ...]]:
    """Forward indices of at most ``n`` shards: each holds every forward of the earlier stages
    and one contiguous chunk of the last stage's, the chunks balanced by rows."""
    _refuse(plan)
    if n < 1:
        raise ValueError(f"a plan runs in at least one shard, not {n}")
    last, _ = last_stage(plan)
    earlier = tuple(i for i, f in enumerate(plan.forwards) if f.stage < last)
    tail = [i for i, f in enumerate(plan.forwards) if f.stage == last]
    k = min(n, len(tail))
    rows = list(accumulate(len(plan.forwards[i].rows) for i in tail))
    cuts = [0]
    for j in range(1, k):  # the cut nearest j/k of the rows, leaving every chunk a forward
        target = rows[-1] * j / k
        choices = range(cuts[-1] + 1, len(tail) - (k - j) + 1)
        cuts.append(min(choices, key=lambda c: (abs(rows[c - 1] - target), c)))
    cuts.append(len(tail))
    return [earlier + tuple(tail[a:b]) for a, b in zip(cuts, cuts[1:])]


def checked_shard(plan: Plan, forwards: Sequence[int]) -> tuple[int, ...]:
    """A shard's forward indices, sorted, after checking that ``plan`` can run in shards and
    that they include every forward of the earlier stages."""
    _refuse(plan)
    indices = tuple(sorted(set(forwards)))
    if any(not 0 <= i < len(plan.forwards) for i in indices):
        raise ValueError(f"the plan has forwards 0 to {len(plan.forwards) - 1}")
    last, _ = last_stage(plan)
    given = set(indices)
    missing = [i for i, f in enumerate(plan.forwards) if f.stage < last and i not in given]
    if missing:
        raise ValueError(f"a shard runs every forward of the earlier stages; {missing} missing")
    return indices
