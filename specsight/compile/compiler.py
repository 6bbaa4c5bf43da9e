"""The compiler: Spec + ModelInfo + tokenizer -> Plan. Imports no torch.

It tokenizes every prompt, orders invokes into stages by what they read from each other,
expands sweeps into cells, resolves sites and positions per row, and packs rows into forwards.
Every problem it finds is collected and raised as one :class:`SpecError` with file positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .. import spec as S
from ..errors import SpecError
from ..models import ModelInfo, Tokenizer
from ..plan import Packing, Plan, ResultRef, Row, logit_reads, pack_rows
from ..plan.ops import Capture
from ..sites import family_table
from .cells import compile_invoke_ops, expand_invoke
from .context import Context, Items
from .dataset import check_metric_columns
from .expectations import compile_expectations
from .generation import check_generation, check_generation_length, generate_forwards
from .gradients import check_backward
from .inputs import compile_inputs
from .layout import after_layer_modules, invoke_infos, plan_saves
from .memory import CPU_BATCH_CAP, estimate_memory, rows_for_budget, untouched_run_bytes
from .metrics import compile_metric
from .saes import SaeSource, builtin_saes, compile_saes
from .stages import collect_save_names, order_stages
from .sweep import MAX_CELLS

__all__ = ["Budget", "compile_plan", "DEFAULT_MAX_BATCH"]

DEFAULT_MAX_BATCH = CPU_BATCH_CAP


@dataclass(frozen=True)
class Budget:
    """How many rows a forward holds and what it reuses, and how many sweep cells a spec may
    expand to (``max_cells``). Rows per forward: ``max_batch`` when
    given; else as many as ``memory`` bytes of activations allow (at most ``cap``); else
    ``cap``. ``prefix_reuse`` and ``position_reuse`` skip what identical rows share: the layers
    below their first touched layer, the positions before their first touched position."""

    max_batch: int | None = None
    memory: int | None = None
    cap: int = DEFAULT_MAX_BATCH
    prefix_reuse: bool = True
    position_reuse: bool = True
    #: the most sweep cells a spec may expand to
    max_cells: int = MAX_CELLS

    def __post_init__(self) -> None:
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")


def compile_plan(
    spec: S.Spec,
    info: ModelInfo,
    tokenizer: Tokenizer,
    *,
    doc: S.LoadedDoc | None = None,
    budget: Budget = Budget(),
    allow_files: bool = True,
    items: Items | None = None,
    saes: Mapping[str, SaeSource] | None = None,
) -> Plan:
    """Compile a validated spec for one model. ``doc`` supplies file positions for errors.

    Rows per forward and reuse: see :class:`Budget`. ``items``: the dataset's items already
    read (a window of them, for a run in blocks), instead of reading it. ``saes``: the SAEs
    registered by id (``--sae ID=PATH``) besides the built-in ones.
    """
    doc = doc or S.document_of(spec)
    ctx = Context(
        spec=spec, doc=doc, info=info, tok=tokenizer, allow_files=allow_files, given_items=items
    )
    if spec.saes:
        compile_saes(ctx, {**builtin_saes(), **(saes or {})})
        _check_issues(ctx)
    stages, order = _rows(ctx, budget.max_cells)
    for name in order:
        compile_invoke_ops(ctx, name)
    metrics = [compile_metric(ctx, name, metric) for name, metric in spec.metrics.items()]
    backward = check_backward(ctx)
    _check_issues(ctx)
    ops = list(ctx.captures.values()) + ctx.ops
    ops.sort(key=lambda op: (op.row, isinstance(op, Capture)))
    plan = Plan(
        spec_name=spec.name,
        spec_sha256=doc.sha256,
        model=spec.model.model_dump(),
        model_summary=_model_summary(info),
        rows=tuple(ctx.rows),
        ops=tuple(ops),
        forwards=(),
        metrics=tuple(m for m in metrics if m is not None),
        saves=tuple(plan_saves(ctx)),
        invokes=invoke_infos(ctx, stages, order),
        vectors=ctx.vectors,
        inputs=ctx.inputs,
        saes=ctx.saes,
        packing=Packing(n_layers=info.n_layers),
        deterministic=spec.deterministic,
        seed=spec.seed,
        backward=() if backward is None else (ResultRef(backward),),
        dataset=None if ctx.items is None else ctx.items.describe(tuple(sorted(ctx.item_invokes))),
    )
    plan = _packed(ctx, plan, stages, budget)
    expectations = compile_expectations(ctx, plan.metrics, plan.saves)
    _check_issues(ctx)
    return replace(
        plan, expectations=tuple(expectations), memory_estimate=estimate_memory(plan, info)
    )


def _rows(ctx: Context, max_cells: int) -> tuple[dict[str, int], list[str]]:
    """Inputs, stages and every invoke's rows (after the checks that need them); the stage of
    each invoke and the invokes in stage order."""
    spec = ctx.spec
    compile_inputs(ctx)
    for name, metric in spec.metrics.items():  # with the prompts' columns, in one report
        if getattr(metric, "invoke", None) in spec.invokes:
            check_metric_columns(ctx, name, metric)
    _check_issues(ctx)
    collect_save_names(ctx)
    stages = order_stages(ctx)
    _check_issues(ctx)
    check_generation(ctx)
    check_generation_length(ctx)
    _check_issues(ctx)
    position = {name: i for i, name in enumerate(spec.invokes)}
    order = sorted(spec.invokes, key=lambda name: (stages[name], position[name]))
    for name in order:
        expand_invoke(ctx, name, max_cells)
    _check_issues(ctx)
    return stages, order


def _packed(ctx: Context, plan: Plan, stages: dict[str, int], budget: Budget) -> Plan:
    """The plan with its rows packed into forwards under the budget."""
    info = ctx.info
    after, logits_module = after_layer_modules(info)
    packing = Packing(
        n_layers=info.n_layers,
        prefix_reuse=budget.prefix_reuse,
        position_reuse=budget.position_reuse and info.inputs == "text",
        after_layers=after,
        logits_module=logits_module,
    )
    rows, ops = list(plan.rows), list(plan.ops)
    keep = logit_reads(rows, ops, plan.metrics, plan.invokes, packing)
    max_batch = budget.max_batch or budget.cap
    if budget.max_batch is None and budget.memory is not None:
        seq = max(len(r.tokens) for r in rows)
        kept = None if keep is None else max((len(v) for v in keep.values()), default=1)
        max_batch = rows_for_budget(
            info, seq, ctx.spec.model.dtype, budget.memory, cap=budget.cap, logits_positions=kept
        )
    block = _untouched_runs_per_block(info, rows, ctx.spec.model.dtype, budget.memory, max_batch)
    packing = replace(packing, max_batch=max_batch, untouched_block=block)
    generating = generate_forwards(ctx, stages, max_batch)
    skip = {r for f in generating for r in f.rows}
    forwards = pack_rows(rows, ops, stages, keep, packing, skip=skip)
    if generating:
        forwards = sorted(forwards + generating, key=lambda f: f.stage)
    return replace(plan, forwards=tuple(forwards), packing=packing)


#: memory the engine may hold untouched runs in, when no memory budget is given
_UNTOUCHED_RUNS_BYTES = 1 << 30


def _untouched_runs_per_block(
    info: ModelInfo, rows: list[Row], dtype: str, budget: int | None, max_batch: int
) -> int:
    """How many sequences' untouched runs (keys, values and layer inputs of every position)
    the engine holds at once: what a quarter of the budget allows, at most ``max_batch``."""
    seq = max((len(r.tokens) for r in rows), default=1)
    per_sequence = untouched_run_bytes(info, seq, dtype)
    allowed = (budget // 4 if budget else _UNTOUCHED_RUNS_BYTES) // max(1, per_sequence)
    return max(1, min(max_batch, allowed))


def _layers_path(info: ModelInfo) -> str | None:
    table = family_table(info)
    return table["layers"] if table else None


def _check_issues(ctx: Context) -> None:
    if ctx.issues:
        issues = sorted(ctx.issues.values(), key=lambda i: (i.line or 0, i.col or 0))
        raise SpecError(issues)


def _model_summary(info: ModelInfo) -> dict[str, Any]:
    return {
        "architecture": info.architecture,
        "family": info.family,
        "n_layers": info.n_layers,
        "d_model": info.d_model,
        "n_heads": info.n_heads,
        "vocab_size": info.vocab_size,
        "inputs": info.inputs,
        "layers_path": _layers_path(info),
    }
