"""Server-side job execution: validate and compile a submitted spec within limits, then run
one or several jobs, batching the rows of jobs for the same model into shared forwards.

Nothing here reads files or runs user code: a remote spec is data, compiled with file vectors
refused, and the plan holds only token ids, module names, positions and numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .._pack import first_layers, pack_rows
from ..api import results_from_raw
from ..compile import compile_plan
from ..errors import Issue, SpecError, SpecsightError
from ..load import LoadedDoc, from_data
from ..plan import Plan, PlanMetric, PlanSave, Row, RowOp
from ..spec import Spec, validate_spec
from .protocol import Limits

if TYPE_CHECKING:
    from ..models import LoadedModel
    from ..results import Results

__all__ = ["LimitError", "PreparedJob", "prepare_job", "run_jobs", "estimate_result_bytes"]


class LimitError(SpecsightError):
    """A job asks for more than the server allows (HTTP 413)."""

    exit_code = 1

    def __init__(self, what: str, estimate: int, limit: int, hint: str | None = None):
        self.what, self.estimate, self.limit, self.hint = what, estimate, limit, hint
        super().__init__(f"{what}: {estimate} exceeds the server's limit of {limit}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": "limit-exceeded",
            "message": str(self),
            "hint": self.hint,
            "estimate": self.estimate,
            "limit": self.limit,
        }


@dataclass
class PreparedJob:
    """A validated, compiled job, ready to run."""

    spec: Spec
    doc: LoadedDoc
    plan: Plan
    result_bytes: int


def estimate_result_bytes(plan: Plan, info: Any) -> int:
    """Bytes of the tensors a plan returns (metrics and saves), before running it."""
    total = 0
    for metric in plan.metrics:
        cells = 1
        for n in metric.shape:
            cells *= n
        per = {
            "logits": len(metric.tokens),
            "logprob": len(metric.tokens),
            "prob": len(metric.tokens),
        }
        width = per.get(metric.kind, 1)
        if metric.kind == "top_k":
            width = 2 * (metric.k or 10)
        if metric.kind == "logit_lens":
            width = len(metric.sites) * (1 + 2 * (metric.k or 5))
        total += cells * width * 8
    for save in plan.saves:
        width = info.vocab_size if save.site == "logits" else info.d_model
        total += sum(save.n_positions) * width * 4
    return total


def _served_seed(model: LoadedModel) -> int:
    return int(getattr(model, "seed", 0) or 0)


def _check(what: str, estimate: int, limit: int, hint: str) -> None:
    if estimate > limit:
        raise LimitError(what, estimate, limit, hint)


def _local_only(
    doc: LoadedDoc | None, code: str, message: str, path: tuple, hint: str
) -> SpecError:
    """A SpecError located in ``doc`` when there is one."""
    if doc is None:
        return SpecError([Issue(code, message, path, None, None, None, hint)])
    return SpecError(doc.source.issue(code, message, path, hint=hint))


def factory_refusal(doc: LoadedDoc | None) -> SpecError:
    """The error a ``model.factory`` spec gets from a server (and from the client, early)."""
    return _local_only(
        doc,
        "factory-remote",
        "model.factory runs local Python code; a server never imports or runs code named by a spec",
        ("model", "factory"),
        "run this spec locally (without --remote), or name one of the server's models in model.id",
    )


def refuse_local_only(spec: Spec, doc: LoadedDoc | None) -> None:
    """Raise the SpecError a spec that can only run locally gets: a factory model, or image and
    tensor inputs (files, which a server never reads)."""
    if spec.model.factory is not None:
        raise factory_refusal(doc)
    for name, invoke in spec.invokes.items():
        if invoke.input_kind != "prompt":
            raise _local_only(
                doc,
                "file-input-remote",
                f"'{invoke.input_kind}' inputs are files, which run locally only",
                ("invokes", name, invoke.input_kind),
                "run this spec without --remote (servers take text prompts for now)",
            )


def prepare_job(
    spec_data: dict[str, Any], model: LoadedModel, limits: Limits, *, spec_file: str | None = None
) -> PreparedJob:
    """Validate and compile a submitted spec against the server's model, enforcing limits.

    Raises SpecError (422: located issues) or LimitError (413)."""
    doc = from_data(spec_data, file=spec_file)
    spec = validate_spec(doc)
    if spec.model.factory is not None:
        raise factory_refusal(doc)
    if spec.model.id != model.model_id:
        raise SpecError(
            doc.source.issue(
                "unknown-model",
                f"this server runs '{model.model_id}', not '{spec.model.id}'",
                ("model",),
                hint="pick a model from GET /v1/models",
            )
        )
    given = spec.model.model_fields_set
    if "dtype" in given and spec.model.dtype != model.dtype:
        raise SpecError(
            doc.source.issue(
                "model-mismatch",
                f"this server runs '{model.model_id}' in {model.dtype}, not {spec.model.dtype}",
                ("model", "dtype"),
                hint=f"write dtype: {model.dtype}, or run locally",
            )
        )
    if "seed" in given and spec.model.seed != _served_seed(model):
        raise SpecError(
            doc.source.issue(
                "model-mismatch",
                f"this server's '{model.model_id}' was built with seed {_served_seed(model)}, not {spec.model.seed}",
                ("model", "seed"),
                hint="drop model.seed, or run locally",
            )
        )
    for invoke in spec.invokes.values():
        for op in invoke.ops:
            vector = getattr(op, "vector", None) or getattr(op, "value", None)
            if isinstance(vector, list):
                _check(
                    "inline vector values",
                    len(vector),
                    limits.max_vector_values,
                    "send a shorter vector",
                )
    plan = compile_plan(
        spec, model.info, model.tokenizer, doc=doc, allow_files=False, max_cells=limits.max_cells
    )
    cells = sum(int(info.get("cells", 1)) for info in plan.invoke_info.values())
    _check("sweep cells", cells, limits.max_cells, "split the sweep into several jobs")
    _check("batch rows", len(plan.rows), limits.max_rows, "split the spec into several jobs")
    longest = max(len(row.tokens) for row in plan.rows)
    _check("prompt tokens", longest, limits.max_prompt_tokens, "shorten the prompts")
    tokens = sum(len(row.tokens) for row in plan.rows)
    _check("tokens in all rows", tokens, limits.max_total_tokens, "sweep fewer cells per job")
    result_bytes = estimate_result_bytes(plan, model.info)
    _check(
        "estimated result bytes",
        result_bytes,
        limits.max_result_bytes,
        "save fewer sites or positions",
    )
    return PreparedJob(spec, doc, plan, result_bytes)


# --- running, with rows of several jobs sharing forwards ------------------------------------


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


def _split(raw: Any, plans: list[Plan]) -> list[Any]:
    """Each job's share of a merged engine output, under its own names and row numbers."""
    from ..engine import EngineOutput

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
) -> list[Results]:
    """Run jobs for one model; several jobs share forwards (one merged plan)."""
    from ..engine import execute
    from ..sites import FAMILIES

    if not jobs:
        return []
    if len(jobs) > 1 and any(not _mergeable(job.plan) for job in jobs):
        # generation and backward passes have their own forward loops: run such jobs alone
        mergeable = [job for job in jobs if _mergeable(job.plan)]
        alone = [job for job in jobs if not _mergeable(job.plan)]
        done = {id(j): r for j, r in zip(mergeable, run_jobs(mergeable, model, progress=progress))}
        for job in alone:
            done[id(job)] = run_jobs([job], model, progress=progress)[0]
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
    raw = execute(merged, model.model, pad_id=model.tokenizer.pad_id, progress=progress)
    shares = [raw] if len(jobs) == 1 else _split(raw, plans)
    results = []
    for job, share in zip(jobs, shares):
        timings = {"load_model_s": 0.0, "compile_s": 0.0, **share.timings}
        timings["total_s"] = time.perf_counter() - started
        timings["batched_jobs"] = float(len(jobs))
        results.append(results_from_raw(job.spec, job.doc, job.plan, model, share, timings))
    return results
