"""Running a plan's forwards on a torch model and reading out the raw result tensors
(:class:`EngineOutput`).

One :class:`~.hooks.HookScope` owns every hook of a run and removes them all when it ends, on
success or failure. Each forward pads its rows on the right (real tokens keep their positions
and never see padding), runs with the :class:`~.runner.Runner`'s action tables active, and has
its metrics read from the logits by their kinds (:mod:`.readout`); generating forwards go
through :mod:`.generate`, backward passes through :mod:`.grad`. The run is seeded (and, on
request, deterministic) without disturbing the caller's random state. Its two halves,
:func:`run_forwards` (the forward loop, over all forwards or some) and :func:`build_output`
(result tensors from the metric buffers and stored values), also serve runs in shards; the
executor (:mod:`.executor`) composes them for every way a plan runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import RunError
from ..plan import Forward, Plan
from ..plan.metrics import RowMetric
from .aggregate import aggregate
from .device import model_device, model_dtype
from .forward import Forwards
from .generate import run_generation
from .grad import backward_from, grad_scope
from .hooks import HookScope, hidden_of, module_table, replace_hidden
from .readout import AfterRun, MetricBatch, assemble, read_metric, to_host
from .reuse import UntouchedRuns
from .runner import Runner

__all__ = ["EngineOutput", "ForwardPass", "build_output", "finish_metrics", "run_forwards"]

NEXT_TOKEN_K = 5
#: prompts per unswept invoke whose next tokens are recorded (a dataset may have 100k)
NEXT_TOKEN_PROMPTS = 16

Progress = Callable[[int, int], None]
Checkpoint = Callable[[], None]


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
    #: the standard deviations noise ``std_of`` measured, by :func:`spread_key`
    spreads: dict[str, float] = field(default_factory=dict)


@dataclass
class ForwardPass:
    """What running forwards of a plan leaves: each metric's buffer (a slot per row of the
    metric, filled for the rows that ran), the stored values, the new token ids of generating
    rows, and an output holding next tokens and generated ids so far."""

    buffers: dict[str, torch.Tensor]
    store: dict[str, torch.Tensor]
    new_ids: dict[int, torch.Tensor]
    out: EngineOutput


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


class _Loop:
    """The forward loop of one run (of every forward of a plan, or some)."""

    def __init__(self, plan: Plan, model: torch.nn.Module, pad_id: int, checkpoint: Checkpoint | None):  # fmt: skip
        self.plan, self.model, self.checkpoint = plan, model, checkpoint
        self.device, dtype = model_device(model), model_dtype(model)
        self.runner = Runner(plan, model, self.device, dtype, pad_id)
        self.forwards = Forwards(plan, model, self.device, dtype, pad_id)
        self.out = EngineOutput()
        self.buffers: dict[str, torch.Tensor] = {}
        self.new_ids: dict[int, torch.Tensor] = {}
        self.readers = [m for m in plan.metrics if isinstance(m, RowMetric)]
        self.slots = {m.name: {row: i for i, row in enumerate(m.rows)} for m in self.readers}
        self.backward = [m for m in self.readers if m.name in plan.backward]
        self.grad_rows = {row for m in self.backward for row in m.rows}
        self.wanted: dict[int, set[int]] = {}  # rows other rows' metrics compare with
        for metric in plan.metrics:
            for row, pos in metric.reference_reads():
                self.wanted.setdefault(row, set()).add(pos)
        self.references: dict[tuple[int, int], torch.Tensor] = {}
        self.summary_rows = {
            i
            for i, row in enumerate(plan.rows)
            if not plan.invokes[row.invoke].axes and row.prompt_index < NEXT_TOKEN_PROMPTS
        }
        layers_path = plan.model_summary.get("layers_path")
        self.layers = _layer_names(model, layers_path, int(plan.model_summary.get("n_layers", 0)))
        self.reuse = UntouchedRuns(model, plan, self.layers)

    def hooks(self, scope: HookScope) -> None:
        """The runner's hooks at every site the plan touches, and its expanders at the layers
        where a forward's rows start to differ."""
        for layer in sorted({f.shared_prefix for f in self.plan.forwards if f.shared_prefix}):
            if self.layers is None:
                raise RunError("the plan reuses layer prefixes but names no layer stack")
            scope.add_expander(self.layers[layer], self.runner.expander(layer))
        for site in self.plan.hooks():
            scope.add(site[0], site[1], self.runner.hook(site))
        self.transcoder_hooks(scope)

    def transcoder_hooks(self, scope: HookScope) -> None:
        """Each transcoder the plan uses keeps its input site's value (after the ops there);
        one without its error term replaces its output site's value, before other hooks."""
        used = {op.sae for op in self.plan.ops if op.sae is not None}
        for ref, info in self.plan.saes.items():
            if not info.transcoder or (ref not in used and info.keep_error):
                continue
            scope.add(info.module, info.io, self.runner.transcoder_keeper(ref))
            if not info.keep_error:
                assert info.out_module is not None
                replace = self.runner.transcoder_output(ref)
                module = scope.module(info.out_module)
                scope.replace_output(
                    module,
                    lambda out, replace=replace: replace_hidden(out, replace(hidden_of(out))),
                )

    def run(self, forwards: Sequence[Forward], progress: Progress | None) -> None:
        total, done = sum(len(f.rows) for f in forwards), 0
        with (
            HookScope(self.model) as scope,
            torch.no_grad() if self.plan.backward else torch.inference_mode(),
            _seeded(self.plan.seed, self.device),
            _deterministic(self.plan.deterministic),
        ):
            self.hooks(scope)
            for forward in forwards:
                if self.checkpoint is not None:
                    self.checkpoint()
                if forward.generate is not None:
                    generated = self.out.generated
                    self.new_ids.update(
                        run_generation(self.runner, forward, self.checkpoint, generated)
                    )
                else:
                    self.one(forward)
                done += len(forward.rows)
                if progress is not None:
                    progress(done, total)

    def one(self, forward: Forward) -> None:
        """Run one forward and read what its rows give."""
        backward = any(r in self.grad_rows for r in forward.rows)
        if backward:  # every row runs in full: gradients need each row's own graph
            forward = replace(forward, shared_prefix=0)
        how = None if backward else self.reuse.prepare(forward, self.device, self.runner)
        if forward.from_base and how is None:  # a plain forward after all
            forward = replace(forward, shared_prefix=0, position_start=0, from_base=False)
        start = how.start if how is not None else 0
        if how is not None:
            forward = replace(forward, shared_prefix=how.skip, position_start=start)
            self.runner.base_input = how.hidden
        self.runner.prepare(replace(forward, seq_len=forward.seq_len - start), offset=start)
        with grad_scope(self.model, backward) as grads:
            self.runner.grad_hooks = grads.hooks.on_grad if grads is not None else None
            late = how.kwargs if how is not None else None
            logits, column = self.forwards.run(forward, late, start, self._model_for(how))
            if grads is not None:
                batches = [(m, self._batch(m, forward, logits, column)) for m in self.backward]
                backward_from(grads, batches)
        self.runner.base_input = self.runner.grad_hooks = None
        self.read(forward, logits.detach(), column)

    def _model_for(self, how: Any) -> torch.nn.Module:
        """What a forward calls: the model, or its stand-in without the layers below the
        forward's first (a forward from untouched runs)."""
        if how is None or not how.skip or self.reuse.stand_ins is None:
            return self.model
        return self.reuse.stand_ins.below(how.skip)

    def _batch(self, metric: RowMetric, forward: Forward, logits: torch.Tensor, column: Callable[[int], int]) -> MetricBatch:  # fmt: skip
        slots = self.slots[metric.name]
        return MetricBatch(slots, forward, logits, column, self.plan.rows, self.references)

    def read(self, forward: Forward, logits: torch.Tensor, column: Callable[[int], int]) -> None:
        """The forward's references for later stages, metric values and next tokens."""
        for i, row in enumerate(forward.rows):
            for pos in self.wanted.get(row, ()):
                self.references[(row, pos)] = torch.log_softmax(logits[i, column(pos)].float(), -1)
        for metric in self.readers:
            if metric.buffered:
                read_metric(metric, self._batch(metric, forward, logits, column), self.buffers)
        for i, row in enumerate(forward.rows):
            if row in self.summary_rows:
                last = column(len(self.plan.rows[row].tokens) - 1)
                probs = torch.softmax(logits[i, last].float(), -1)
                probs, top = probs.topk(min(NEXT_TOKEN_K, probs.shape[-1]))
                self.out.next_tokens[row] = (top.tolist(), probs.tolist())


def _layer_names(
    model: torch.nn.Module, layers_path: str | None, n_layers: int
) -> list[str] | None:
    """The decoder layers' module names, in order (None: the plan names no layer stack)."""
    modules = module_table(model)
    names = [f"{layers_path}.{i}" for i in range(n_layers)]
    if layers_path is None or not all(name in modules for name in names):
        return None
    return names


def run_forwards(
    plan: Plan,
    model: torch.nn.Module,
    *,
    pad_id: int,
    progress: Progress | None,
    checkpoint: Checkpoint | None,
    only: Sequence[int] | None = None,
) -> ForwardPass:
    """Run the plan's forwards (``only``: those indices, in plan order, reading untouched runs
    computed as a run of every forward computes them); hooks never outlive this call."""
    loop = _Loop(plan, model, pad_id, checkpoint)
    forwards = plan.forwards if only is None else tuple(plan.forwards[i] for i in only)
    if only is not None:
        loop.reuse.replay(forwards)
    loop.run(forwards, progress)
    loop.out.spreads.update(loop.runner.spreads())
    return ForwardPass(loop.buffers, loop.runner.store, loop.new_ids, loop.out)


def finish_metrics(plan: Plan, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-item metrics aggregated (effects, reductions), in the order the spec lists them."""
    aggregate(plan, metrics)
    order = {m.name: i for i, m in enumerate(plan.metrics)}
    return dict(sorted(metrics.items(), key=lambda kv: (order.get(kv[0].split("/")[0], 0), kv[0])))


def _generated_ids(plan: Plan, new_ids: dict[int, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:  # fmt: skip
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
        info = plan.invokes[invoke]
        out[f"{invoke}/generated_ids"] = ids.reshape(*info.grid, info.prompts, longest)
    return out


def build_output(
    plan: Plan,
    ran: ForwardPass,
    *,
    modules: dict[str, torch.nn.Module] | None,
    pad_id: int,
    reduce: bool,
    checkpoint: Checkpoint | None = None,
) -> EngineOutput:
    """``ran.out`` completed from every row's metric buffers and stored values: metrics in
    their result shapes, those computed after the run (from stored values or other metrics),
    aggregates (``reduce``), generated ids and saves. ``modules`` (the model's) decode what
    kinds decode after the run (None: the plan has nothing to decode)."""
    out = ran.out
    for metric in plan.metrics:
        if not metric.buffered:
            continue
        for name in (metric.name, f"{metric.name}/ids"):
            if name in ran.buffers:
                values = ran.buffers[name]
                out.metrics[name] = values.reshape(tuple(metric.shape) + tuple(values.shape[1:]))
    after = AfterRun(ran.store, out.metrics, modules)
    after.checkpoint = checkpoint
    for metric in plan.metrics:
        out.metrics.update(metric.finish(after))
    if reduce:
        out.metrics = finish_metrics(plan, out.metrics)
    out.saves.update(_generated_ids(plan, ran.new_ids, pad_id))
    host = to_host({k: ran.store[k] for save in plan.saves for k in save.keys})
    for save in plan.saves:
        out.saves[save.name] = assemble(save.keys, save.shape, host)
    return out
