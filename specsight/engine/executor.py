"""The one way plans run on a model (:class:`Executor`), whoever asks: ``specsight.run``, the
server's worker and a cluster replica.

Every way is a composition of the plan's transforms with one run of forwards
(:func:`~.execute.run_forwards` and :func:`~.execute.build_output`):

* a plan: run, then aggregate;
* blocks of items (:class:`~specsight.compile.Blocks`): each block's plan run without
  aggregating, the per-item results joined along the item axis, then aggregated as one run;
* several jobs' plans: merged into one plan (:func:`~specsight.plan.merge_plans`: rows and
  names relabelled, forwards packed again), run once, the output split back by the parts'
  names and rows, each job's metrics aggregated as its own run's;
* a shard of a plan (:func:`~specsight.plan.shard_forwards`): some forwards run, their rows'
  outputs merged by :func:`~.shards.merge_shards`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..plan import Part, Plan, merge_plans
from .blocks import BlockJoin
from .execute import EngineOutput, build_output, finish_metrics, run_forwards
from .hooks import module_table
from .shards import ShardOutput, execute_shard

__all__ = ["Executor", "execute"]


class Executor:
    """Runs plans on one model. ``progress(rows done, rows)`` is called after each forward;
    ``checkpoint()`` before each forward and each decode step of generation, so that what it
    raises (a cancelled job, a time limit) stops the run there. Hooks never outlive a run."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_id: int = 0,
        progress: Callable[[int, int], None] | None = None,
        checkpoint: Callable[[], None] | None = None,
    ):
        self.model, self.pad_id = model, pad_id
        self.progress, self.checkpoint = progress, checkpoint

    def run(self, plan: Plan, *, reduce: bool = True, progress: Any = None) -> EngineOutput:
        """Run every forward of ``plan``; ``reduce=False`` leaves metrics per item (a block)."""
        started = time.perf_counter()
        ran = run_forwards(
            plan,
            self.model,
            pad_id=self.pad_id,
            progress=progress or self.progress,
            checkpoint=self.checkpoint,
        )
        modules = module_table(self.model)
        out = build_output(
            plan,
            ran,
            modules=modules,
            pad_id=self.pad_id,
            reduce=reduce,
            checkpoint=self.checkpoint,
        )
        out.timings["execute_s"] = time.perf_counter() - started
        return out

    def run_blocks(self, plans: Iterable[Plan], total: int, whole: Callable[[], Plan]) -> EngineOutput:  # fmt: skip
        """Run each block's plan, join their per-item results and aggregate them as one run of
        ``whole()`` (the joined run's plan, known once every block ran); ``total``: the rows
        of every block, for progress."""
        join = BlockJoin()
        for plan in plans:
            done = join.rows

            def shifted(rows: int, _total: int, done: int = done) -> None:
                if self.progress is not None:
                    self.progress(done + rows, total)

            join.add(plan, self.run(plan, reduce=False, progress=shifted))
        return join.finish(whole())

    def run_merged(self, plans: Sequence[Plan]) -> list[EngineOutput]:
        """Run several plans' rows in shared forwards; each plan's output as its own run's."""
        if len(plans) == 1:
            return [self.run(plans[0])]
        merged, parts = merge_plans(plans)
        raw = self.run(merged, reduce=False)
        return [finish(plan, split(raw, part)) for plan, part in zip(plans, parts)]

    def run_shard(self, plan: Plan, forwards: Sequence[int]) -> ShardOutput:
        """Run some forwards of ``plan`` (a shard) as a run of every forward runs them."""
        return execute_shard(
            plan,
            self.model,
            forwards,
            pad_id=self.pad_id,
            checkpoint=self.checkpoint,
            progress=self.progress,
        )


def execute(
    plan: Plan,
    model: torch.nn.Module,
    *,
    pad_id: int = 0,
    progress: Callable[[int, int], None] | None = None,
    checkpoint: Callable[[], None] | None = None,
    reduce: bool = True,
) -> EngineOutput:
    """Run every forward of ``plan`` on ``model`` (:meth:`Executor.run`)."""
    executor = Executor(model, pad_id=pad_id, progress=progress, checkpoint=checkpoint)
    return executor.run(plan, reduce=reduce)


def split(raw: EngineOutput, part: Part) -> EngineOutput:
    """One part's share of a merged run's output, under its own names and row numbers."""
    start = part.rows.start

    def local(table: dict[str, Any]) -> dict[str, Any]:
        return {part.local(k): v for k, v in table.items() if part.own(k)}

    def rows(table: dict[int, Any]) -> dict[int, Any]:
        return {row - start: value for row, value in table.items() if row in part.rows}

    return EngineOutput(
        metrics=local(raw.metrics),
        saves=local(raw.saves),
        next_tokens=rows(raw.next_tokens),
        generated=rows(raw.generated),
        timings=dict(raw.timings),
        spreads=local(raw.spreads),
    )


def finish(plan: Plan, out: EngineOutput) -> EngineOutput:
    """A run's per-item metrics aggregated as ``plan``'s."""
    out.metrics = finish_metrics(plan, out.metrics)
    return out
