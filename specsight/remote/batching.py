"""Running admitted jobs for one model: several jobs' rows share forwards (one merged plan,
each job's names prefixed), and each job gets its own share of the output as Results. Jobs that
generate or run a backward pass have their own forward loops and run alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ..compile import first_layers, pack_rows
from ..engine import EngineOutput, execute
from ..plan import Plan, PlanMetric, PlanSave, Row, RowOp
from ..results import Results, results_from_raw
from ..sites import FAMILIES
from .admission import PreparedJob

if TYPE_CHECKING:
    from ..models.load import LoadedModel

__all__ = ["merge_plans", "run_jobs"]


def _prefixed(plan: Plan, tag: str, row_offset: int) -> Plan:
    """The plan's rows, ops, metrics and saves renamed into the namespace ``tag``."""

    def key(value: str | None) -> str | None:
        return None if value is None else f"{tag}{value}"

    rows = tuple(replace(r, invoke=f"{tag}{r.invoke}") for r in plan.rows)
    ops = tuple(
        replace(
            op,
            row=op.row + row_offset,
            store=key(op.store),
            sources=tuple(f"{tag}{s}" for s in op.sources),
            vector=key(op.vector),
        )
        for op in plan.ops
    )
    metrics = tuple(
        replace(
            m,
            name=f"{tag}{m.name}",
            invoke=f"{tag}{m.invoke}",
            rows=tuple(r + row_offset for r in m.rows),
            store_keys=tuple(f"{tag}{k}" for k in m.store_keys),
            inputs=tuple(f"{tag}{i}" for i in m.inputs),
        )
        for m in plan.metrics
    )
    saves = tuple(
        replace(s, name=f"{tag}{s.name}", keys=tuple(f"{tag}{k}" for k in s.keys))
        for s in plan.saves
    )
    return replace(
        plan,
        rows=rows,
        ops=ops,
        metrics=metrics,
        saves=saves,
        vectors={f"{tag}{k}": v for k, v in plan.vectors.items()},
        invoke_info={f"{tag}{k}": v for k, v in plan.invoke_info.items()},
    )


def merge_plans(plans: list[Plan], n_layers: int, after_layers: set[str]) -> Plan:
    """One plan running every job's rows; each job's names are prefixed ``j<index>:``."""
    parts, offset = [], 0
    for index, plan in enumerate(plans):
        parts.append(_prefixed(plan, f"j{index}:", offset))
        offset += len(plan.rows)
    rows: list[Row] = [r for p in parts for r in p.rows]
    ops: list[RowOp] = [op for p in parts for op in p.ops]
    stage_of_invoke: dict[str, int] = {}
    keep: dict[int, set[int]] | None = {}
    for part, plan, start in zip(parts, plans, _offsets(plans)):
        for forward in plan.forwards:
            for row in forward.rows:
                stage_of_invoke[part.rows[row].invoke] = forward.stage
                if keep is not None and forward.keep_logits is None:
                    keep = None
                elif keep is not None:
                    keep[row + start] = set(forward.keep_logits or ())
    first = first_layers(rows, ops, n_layers, after_layers)
    max_batch = max(p.max_batch for p in plans)
    forwards = pack_rows(rows, stage_of_invoke, first, max_batch, n_layers, keep_logits=keep)
    metrics: list[PlanMetric] = [m for p in parts for m in p.metrics]
    saves: list[PlanSave] = [s for p in parts for s in p.saves]
    vectors = {k: v for p in parts for k, v in p.vectors.items()}
    invoke_info = {k: v for p in parts for k, v in p.invoke_info.items()}
    return replace(
        plans[0],
        spec_name="batch of jobs",
        rows=tuple(rows),
        ops=tuple(ops),
        forwards=tuple(forwards),
        metrics=tuple(metrics),
        saves=tuple(saves),
        vectors=vectors,
        invoke_info=invoke_info,
        max_batch=max_batch,
    )


def _offsets(plans: list[Plan]) -> list[int]:
    out, total = [], 0
    for plan in plans:
        out.append(total)
        total += len(plan.rows)
    return out


def _split(raw: EngineOutput, plans: list[Plan]) -> list[EngineOutput]:
    """Each job's share of a merged engine output, under its own names and row numbers."""
    outs = []
    for index, (plan, start) in enumerate(zip(plans, _offsets(plans))):
        tag = f"j{index}:"
        out = EngineOutput(timings=dict(raw.timings))
        out.metrics = {k[len(tag) :]: v for k, v in raw.metrics.items() if k.startswith(tag)}
        out.saves = {k[len(tag) :]: v for k, v in raw.saves.items() if k.startswith(tag)}
        out.next_tokens = {
            row - start: value
            for row, value in raw.next_tokens.items()
            if start <= row < start + len(plan.rows)
        }
        outs.append(out)
    return outs


def _mergeable(plan: Plan) -> bool:
    """Plans whose rows can share forwards with other jobs' rows."""
    return plan.backward is None and all(f.generate is None for f in plan.forwards)


def run_jobs(
    jobs: list[PreparedJob],
    model: LoadedModel,
    *,
    progress: Callable[[int, int], None] | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> list[Results]:
    """Run jobs for one model; several jobs share forwards (one merged plan). ``progress``
    and ``checkpoint`` are the engine's (see :func:`specsight.engine.execute`)."""
    if not jobs:
        return []
    if len(jobs) > 1 and any(not _mergeable(job.plan) for job in jobs):
        # generation and backward passes have their own forward loops: run such jobs alone
        mergeable = [job for job in jobs if _mergeable(job.plan)]
        alone = [job for job in jobs if not _mergeable(job.plan)]
        watch = {"progress": progress, "checkpoint": checkpoint}
        done = {id(j): r for j, r in zip(mergeable, run_jobs(mergeable, model, **watch))}
        for job in alone:
            done[id(job)] = run_jobs([job], model, **watch)[0]
        return [done[id(job)] for job in jobs]
    started = time.perf_counter()
    plans = [job.plan for job in jobs]
    if len(jobs) == 1:
        merged = plans[0]
    else:
        info = model.info
        after = set()
        if info.family:
            table = FAMILIES[info.family]["sites"]
            after = {table["final_norm"][0], table["logits"][0]}
        merged = merge_plans(plans, info.n_layers, after)
    raw = execute(
        merged,
        model.model,
        pad_id=model.tokenizer.pad_id,
        progress=progress,
        checkpoint=checkpoint,
    )
    shares = [raw] if len(jobs) == 1 else _split(raw, plans)
    results = []
    for job, share in zip(jobs, shares):
        timings = {"load_model_s": 0.0, "compile_s": 0.0, **share.timings}
        timings["total_s"] = time.perf_counter() - started
        timings["batched_jobs"] = float(len(jobs))
        results.append(results_from_raw(job.spec, job.doc, job.plan, model, share, timings))
    return results
