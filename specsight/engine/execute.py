"""The engine's entry point: :func:`execute` runs every forward of a Plan on a torch model and
returns the raw result tensors (:class:`EngineOutput`).

One :class:`~.hooks.HookScope` owns every hook handle and removes them all when the run ends, on
success or failure. Each forward pads its rows on the right (real tokens keep their positions
and never see padding), runs with the :class:`~.runner.Runner`'s action tables active, and has
its metrics read from the logits (:mod:`.readout`); generating forwards go through
:mod:`.generate`, backward passes through :mod:`.grad`. The run is seeded (and, on request,
deterministic) without disturbing the caller's random state. Its two halves,
:func:`run_forwards` (the forward loop, over all forwards or some) and :func:`build_output`
(result tensors from the metric buffers and stored values), also serve runs in shards
(:mod:`.shards`).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..errors import RunError
from ..plan import Plan
from .aggregate import aggregate
from .device import model_device, model_dtype
from .forward import RowInputs, run_forward
from .generate import run_generation
from .grad import attribution, backward_from, grad_scope
from .hooks import HookScope, module_table
from .readout import assemble, logit_lens, read_metric, to_host
from .reuse import UntouchedRuns
from .runner import Runner

__all__ = [
    "EngineOutput",
    "ForwardPass",
    "build_output",
    "execute",
    "finish_metrics",
    "run_forwards",
]

NEXT_TOKEN_K = 5
#: prompts per unswept invoke whose next tokens are recorded (a dataset may have 100k)
NEXT_TOKEN_PROMPTS = 16


@dataclass
class EngineOutput:
    """Raw tensors of a run, before they become :class:`~specsight.results.Results`."""

    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    saves: dict[str, torch.Tensor] = field(default_factory=dict)
    next_tokens: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)
    #: generating rows: the new token ids, up to and including the first end-of-sequence token
    generated: dict[int, list[int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: a run in blocks: its rows, forwards and blocks over all blocks (empty: one plan)
    counts: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for this run without disturbing the caller's random state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """torch's deterministic algorithms for the run (``deterministic: true``), then restored."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _generated_ids(
    plan: Plan, new_ids: dict[int, torch.Tensor], pad_id: int
) -> dict[str, torch.Tensor]:
    """``<invoke>/generated_ids`` per generating invoke: [sweep axes..., prompts, new tokens],
    padded with ``pad_id`` where forwards stopped at different lengths."""
    out: dict[str, torch.Tensor] = {}
    by_invoke: dict[str, list[int]] = {}
    for row in sorted(new_ids):
        by_invoke.setdefault(plan.rows[row].invoke, []).append(row)
    for invoke, rows in by_invoke.items():
        longest = max(len(new_ids[r]) for r in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(new_ids[row])] = new_ids[row]
        info = plan.invoke_info[invoke]
        grid = tuple(len(plan.axis_values[invoke][axis]) for axis in info["axes"])
        out[f"{invoke}/generated_ids"] = ids.reshape(*grid, info["prompts"], longest)
    return out


def _layer_modules(
    model: torch.nn.Module, layers_path: str | None, plan: Plan
) -> list[torch.nn.Module] | None:
    """The decoder layers, in order (None: the plan names no layer stack)."""
    modules = module_table(model)
    n_layers = int(plan.model_summary.get("n_layers", 0))
    names = [f"{layers_path}.{i}" for i in range(n_layers)]
    if layers_path is None or not all(name in modules for name in names):
        return None
    return [modules[name] for name in names]


def finish_metrics(plan: Plan, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-item metrics aggregated (effects, reductions), in the order the spec lists them."""
    aggregate(plan, metrics)
    order = {m.name: i for i, m in enumerate(plan.metrics)}
    return dict(sorted(metrics.items(), key=lambda kv: (order.get(kv[0].split("/")[0], 0), kv[0])))


@dataclass
class ForwardPass:
    """What running forwards of a plan leaves: each metric's buffer (a slot per row of the
    metric, filled for the rows that ran), the runner (its store), the new token ids of
    generating rows, and an output holding next tokens and generated ids so far."""

    runner: Runner
    buffers: dict[str, torch.Tensor]
    new_ids: dict[int, torch.Tensor]
    out: EngineOutput


def run_forwards(
    plan: Plan,
    model: torch.nn.Module,
    *,
    pad_id: int,
    progress: Callable[[int, int], None] | None,
    checkpoint: Callable[[], None] | None,
    only: Sequence[int] | None = None,
) -> ForwardPass:
    """Run the plan's forwards (``only``: those indices, in plan order, reading untouched runs
    computed as a run of every forward computes them); hooks never outlive this call."""
    device = model_device(model)
    dtype = model_dtype(model)
    runner = Runner(plan, model, device, pad_id, checkpoint=checkpoint)
    out = EngineOutput()
    metric_slots = {m.name: {row: i for i, row in enumerate(m.rows)} for m in plan.metrics}
    buffers: dict[str, torch.Tensor] = {}
    summary_rows = {
        i
        for i, row in enumerate(plan.rows)
        if not plan.invoke_info.get(row.invoke, {}).get("axes")
        and row.prompt_index < NEXT_TOKEN_PROMPTS
    }
    metrics_by_name = {m.name: m for m in plan.metrics}
    wanted: dict[int, set[int]] = {}  # reference rows of kl metrics -> positions
    for metric in plan.metrics:
        for row, pos in zip(metric.reference_rows, metric.reference_positions):
            wanted.setdefault(row, set()).add(pos)
    references: dict[tuple[int, int], torch.Tensor] = {}
    new_ids: dict[int, torch.Tensor] = {}  # generating rows: their new token ids
    grad_rows = set(metrics_by_name[plan.backward].rows) if plan.backward else set()
    forwards = plan.forwards if only is None else tuple(plan.forwards[i] for i in only)
    total = len(plan.rows) if only is None else sum(len(f.rows) for f in forwards)
    done = 0
    layers_path = plan.model_summary.get("layers_path")
    keep_supported = "logits_to_keep" in inspect.signature(model.forward).parameters
    inputs = RowInputs(plan, dtype)
    reuse = UntouchedRuns(model, plan, _layer_modules(model, layers_path, plan))
    if only is not None:
        reuse.replay(forwards)
    with (
        HookScope(model) as scope,
        torch.no_grad() if plan.backward else torch.inference_mode(),
        _seeded(plan.seed, device),
        _deterministic(plan.deterministic),
    ):
        for layer in sorted({f.shared_prefix for f in plan.forwards if f.shared_prefix}):
            if layers_path is None:
                raise RunError("the plan reuses layer prefixes but names no layer stack")
            scope.add_expander(f"{layers_path}.{layer}", runner.expander(layer))
        for site in plan.hooks():
            scope.add(site[0], site[1], runner.hook(site))
        for forward in forwards:
            if checkpoint is not None:
                checkpoint()
            if forward.generate is not None:
                new_ids.update(run_generation(runner, forward, dtype, out.generated))
                done += len(forward.rows)
                if progress is not None:
                    progress(done, total)
                continue
            backward = plan.backward is not None and any(r in grad_rows for r in forward.rows)
            if backward:  # every row runs in full: gradients need each row's own graph
                forward = replace(forward, shared_prefix=0)
            how = None if backward else reuse.prepare(forward, device, runner)
            if forward.from_base and how is None:  # a plain forward after all
                forward = replace(forward, shared_prefix=0, position_start=0, from_base=False)
            start = how.start if how is not None else 0
            if how is not None:
                forward = replace(forward, shared_prefix=how.skip, position_start=start)
                runner.base_input = how.hidden
            runner.prepare(replace(forward, seq_len=forward.seq_len - start), dtype, offset=start)
            with grad_scope(model, backward), reuse.skipping(how.skip if how else 0):
                logits, column = run_forward(
                    plan,
                    model,
                    forward,
                    device,
                    pad_id,
                    keep_supported,
                    inputs,
                    how.kwargs if how is not None else None,
                    start,
                )
                if backward:
                    backward_from(
                        metrics_by_name[plan.backward],
                        metric_slots[plan.backward],
                        forward,
                        logits,
                        column,
                    )
            runner.base_input = None
            logits = logits.detach()
            for i, row in enumerate(forward.rows):  # what kl metrics of later stages compare to
                for pos in wanted.get(row, ()):
                    references[(row, pos)] = torch.log_softmax(logits[i, column(pos)].float(), -1)
            for metric in plan.metrics:
                if metric.kind not in ("logit_lens", "attribution"):
                    slots = metric_slots[metric.name]
                    read_metric(
                        metric, slots, forward, logits, column, buffers, plan.rows, references
                    )
            for i, row in enumerate(forward.rows):
                if row in summary_rows:
                    last = column(len(plan.rows[row].tokens) - 1)
                    probs = torch.softmax(logits[i, last].float(), -1)
                    probs, top = probs.topk(min(NEXT_TOKEN_K, probs.shape[-1]))
                    out.next_tokens[row] = (top.tolist(), probs.tolist())
            done += len(forward.rows)
            if progress is not None:
                progress(done, total)
    return ForwardPass(runner, buffers, new_ids, out)


def build_output(
    plan: Plan,
    out: EngineOutput,
    buffers: dict[str, torch.Tensor],
    store: dict[str, torch.Tensor],
    *,
    modules: dict[str, torch.nn.Module] | None,
    new_ids: dict[int, torch.Tensor],
    pad_id: int,
    reduce: bool,
) -> EngineOutput:
    """``out`` completed from every row's metric buffers and stored values: metrics in their
    result shapes, recoveries, aggregates (``reduce``), generated ids and saves. ``modules``
    (the model's) decode logit-lens metrics; None: the plan has none."""
    for metric in plan.metrics:
        if metric.kind == "logit_lens":
            if modules is None:
                raise ValueError(f"logit-lens metric '{metric.name}' needs the model's modules")
            out.metrics.update(logit_lens(metric, store, modules))
            continue
        if metric.kind == "attribution":
            out.metrics[metric.name] = attribution(metric, store)
            continue
        if metric.kind == "recovery":
            continue
        values = buffers[metric.name]
        suffix = tuple(values.shape[1:])
        if metric.squeeze_token and suffix:
            suffix = ()
            values = values[..., 0]
        out.metrics[metric.name] = values.reshape(tuple(metric.shape) + suffix)
        if f"{metric.name}/ids" in buffers:
            out.metrics[f"{metric.name}/ids"] = buffers[f"{metric.name}/ids"].reshape(
                tuple(metric.shape) + suffix
            )
    for metric in plan.metrics:
        if metric.kind == "recovery":
            patched, clean, corrupt = (out.metrics[name] for name in metric.inputs)
            out.metrics[metric.name] = (patched - corrupt) / (clean - corrupt)
    if reduce:
        out.metrics = finish_metrics(plan, out.metrics)
    out.saves.update(_generated_ids(plan, new_ids, pad_id))
    host = to_host({k: store[k] for save in plan.saves for k in save.keys})
    for save in plan.saves:
        out.saves[save.name] = assemble(save.keys, save.shape, host)
    return out


def execute(
    plan: Plan,
    model: torch.nn.Module,
    *,
    pad_id: int = 0,
    progress: Callable[[int, int], None] | None = None,
    checkpoint: Callable[[], None] | None = None,
    reduce: bool = True,
) -> EngineOutput:
    """Run every forward of ``plan`` on ``model``; hooks never outlive this call.

    ``progress(rows done, rows)`` is called after each forward; ``checkpoint()`` before each
    forward and each decode step of generation, so that what it raises (a cancelled job, a
    time limit) stops the run there. ``reduce=False`` leaves metrics per item (a block of a
    run in blocks: :func:`finish_metrics` aggregates the joined blocks)."""
    started = time.perf_counter()
    ran = run_forwards(plan, model, pad_id=pad_id, progress=progress, checkpoint=checkpoint)
    out = build_output(
        plan,
        ran.out,
        ran.buffers,
        ran.runner.store,
        modules=module_table(model),
        new_ids=ran.new_ids,
        pad_id=pad_id,
        reduce=reduce,
    )
    out.timings["execute_s"] = time.perf_counter() - started
    return out
