"""Running admitted jobs for one model through the engine's :class:`~specsight.engine.Executor`:
jobs share forwards (one merged plan; each job's names and rows kept apart by the merge, so no
job reads another's values), and a job over a large dataset runs alone in blocks of items, as a
local run does. Each job gets its own share of the output as Results.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..compile import BLOCK_ROWS, Budget, compile_plan, plan_blocks
from ..engine import EngineOutput, Executor
from ..results import Results, results_from_raw
from .admission import PreparedJob

if TYPE_CHECKING:
    from ..compile import Blocks
    from ..models.load import LoadedModel

__all__ = ["run_jobs"]


def _blocks(job: PreparedJob, model: LoadedModel, block_rows: int) -> Blocks | None:
    """The blocks a job over a large dataset runs in (None: it runs as one plan)."""
    if len(job.plan.rows) <= block_rows:
        return None
    compiler = functools.partial(
        compile_plan,
        job.spec,
        model.info,
        model.tokenizer,
        doc=job.doc,
        budget=Budget(max_batch=job.plan.max_batch),
        allow_files=False,
    )
    return plan_blocks(job.spec, compiler, block_rows)[1]


def run_jobs(
    jobs: list[PreparedJob],
    model: LoadedModel,
    *,
    progress: Callable[[int, int], None] | None = None,
    checkpoint: Callable[[], None] | None = None,
    block_rows: int = BLOCK_ROWS,
) -> list[Results]:
    """Run jobs for one model (their plans share one seed and determinism setting): the jobs
    that fit one plan share forwards, a job over a large dataset runs in blocks. ``progress``
    and ``checkpoint`` are the executor's."""
    started = time.perf_counter()
    executor = Executor(
        model.model, pad_id=model.tokenizer.pad_id, progress=progress, checkpoint=checkpoint
    )
    raws: dict[int, EngineOutput] = {}
    plans = {index: job.plan for index, job in enumerate(jobs)}
    together = []
    for index, job in enumerate(jobs):
        blocks = _blocks(job, model, block_rows)
        if blocks is None:
            together.append(index)
            continue
        raws[index] = executor.run_blocks(blocks.plans(), blocks.total_rows, blocks.whole)
        plans[index] = blocks.whole()
    if together:
        outs = executor.run_merged([jobs[i].plan for i in together])
        raws.update(zip(together, outs))
    results = []
    for index, job in enumerate(jobs):
        timings = {"load_model_s": 0.0, "compile_s": 0.0, **raws[index].timings}
        timings["total_s"] = time.perf_counter() - started
        timings["batched_jobs"] = float(len(together) if index in together else 1)
        results.append(
            results_from_raw(job.spec, job.doc, plans[index], model, raws[index], timings)
        )
    return results
