"""The engine: runs a Plan on a torch model and returns raw result tensors.

One :class:`HookScope` owns every hook handle and removes them all when the run ends, on success
or failure. Each forward pads its rows on the right (so real tokens keep their positions and
never see padding), installs per-site action tables, and reads metrics from the logits.

At a site, each row's ops run in the order the spec declares them. Ops of different rows are
independent, so the engine groups them by kind and applies each group as one indexed tensor
operation. Outputs are modified on a copy that replaces the module's return value; inputs are
modified in place, so a residual stream read through a norm's input (``resid_mid``) changes the
residual itself, not only what the norm sees. Per-head sites act on column windows of their
tensor, and token-flattened tensors are viewed per row (``_windows``); metrics and saved values
are read out in ``_readout``.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ._forward import RowInputs, run_forward
from ._grad import attribution, backward_from, grad_scope, keep_grad
from ._readout import assemble, logit_lens, read_metric, to_host
from ._windows import attention_weights, col_index, pos_index, row_major, token_major
from .errors import RunError
from .hooks import HookScope, hidden_of, module_table, replace_hidden
from .plan import Forward, Plan, RowOp

__all__ = ["HookScope", "EngineOutput", "execute", "hidden_of", "replace_hidden"]

NEXT_TOKEN_K = 5


# --- per-forward action tables -------------------------------------------------------------


@dataclass
class _Group:
    kind: str
    ops: list[RowOp]
    rows: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    factors: torch.Tensor | None = None
    vectors: torch.Tensor | None = None
    cols: torch.Tensor | None = None


@dataclass
class EngineOutput:
    """Raw tensors of a run, before they become :class:`~specsight.results.Results`."""

    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    saves: dict[str, torch.Tensor] = field(default_factory=dict)
    next_tokens: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)
    #: generating rows: the new token ids, up to and including the first end-of-sequence token
    generated: dict[int, list[int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class _Runner:
    def __init__(self, plan: Plan, model: torch.nn.Module, device: torch.device, pad_id: int):
        self.plan = plan
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.store: dict[str, torch.Tensor] = {}
        self.vectors: dict[str, torch.Tensor] = {}
        self.tables: dict[tuple[str, str], list[list[_Group]]] = {}
        self.local: dict[int, int] = {}
        self.forward: Forward | None = None
        self.ops_by_row: dict[int, list[RowOp]] = defaultdict(list)
        for op in plan.ops:
            self.ops_by_row[op.row].append(op)

    def _vector(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        if key not in self.vectors:
            self.vectors[key] = torch.tensor(self.plan.vectors[key], dtype=torch.float64)
        return self.vectors[key].to(self.device, dtype)

    def prepare(
        self,
        forward: Forward,
        dtype: torch.dtype,
        ops_by_row: dict[int, list[RowOp]] | None = None,
    ) -> None:
        """Build the action tables of one forward: per site, levels of grouped ops."""
        self.forward = forward
        self.local = {row: i for i, row in enumerate(forward.rows)}
        per_site: dict[tuple[str, str], dict[int, list[RowOp]]] = defaultdict(
            lambda: defaultdict(list)
        )
        by_row = self.ops_by_row if ops_by_row is None else ops_by_row
        for row in forward.rows:
            for op in by_row.get(row, ()):
                per_site[(op.module, op.io)][row].append(op)
        self.tables = {}
        for site, by_row in per_site.items():
            depth = max(len(ops) for ops in by_row.values())
            levels = []
            for level in range(depth):
                # ops of one kind on the same columns apply as one indexed operation
                kinds: dict[tuple[str, Any], list[RowOp]] = defaultdict(list)
                for ops in by_row.values():
                    if level < len(ops):
                        kinds[(ops[level].kind, ops[level].cols)].append(ops[level])
                levels.append([self._group(key[0], ops, dtype) for key, ops in kinds.items()])
            self.tables[site] = levels

    def _group(self, kind: str, ops: list[RowOp], dtype: torch.dtype) -> _Group:
        group = _Group(kind, ops, cols=col_index(ops[0].cols, self.device))
        if kind in ("zero", "scale") or (kind in ("add", "set") and ops[0].vector is not None):
            if kind in ("add", "set") and any(op.vector is None for op in ops):
                return group  # mixed saved/inline sources: apply one by one
            rows, positions, factors, vecs = [], [], [], []
            for op in ops:
                for pos in op.positions:
                    rows.append(self.local[op.row])
                    positions.append(pos)
                    factors.append(op.factor if op.factor is not None else 1.0)
                    if op.vector is not None:
                        vecs.append(op.vector)
            group.rows = torch.tensor(rows, device=self.device, dtype=torch.long)
            group.positions = torch.tensor(positions, device=self.device, dtype=torch.long)
            group.factors = torch.tensor(factors, device=self.device, dtype=dtype).unsqueeze(-1)
            if vecs:
                keys = sorted(set(vecs))
                table = torch.stack([self._vector(k, dtype) for k in keys])
                index = torch.tensor([keys.index(k) for k in vecs], device=self.device)
                group.vectors = table[index]
        return group

    def expander(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
        """Copies the single shared row to every row of the forward at ``layer``'s input."""

        def expand(hidden: torch.Tensor) -> torch.Tensor | None:
            if self.forward is None or self.forward.shared_prefix != layer:
                return None
            return hidden.expand(len(self.forward.rows), *hidden.shape[1:]).contiguous()

        return expand

    def hook(self, site: tuple[str, str]) -> Callable[[torch.Tensor], torch.Tensor | None]:
        io = site[1]

        def apply(hidden: torch.Tensor) -> torch.Tensor | None:
            levels = self.tables.get(site)
            if not levels:
                return None
            writes = any(
                g.kind not in ("save", "capture", "grad") for level in levels for g in level
            )
            if writes and io == "output":
                hidden = hidden.clone()
            if io == "pattern":
                try:
                    hidden = attention_weights(hidden, site[0])
                except RunError as exc:
                    origin = levels[0][0].ops[0].origin
                    raise RunError(f"{origin}: {exc.message}", hint=exc.hint) from None
            work = hidden
            if hidden.dim() == 2 and self.forward is not None:
                work = token_major(hidden, len(self.forward.rows), self.forward.seq_len, site[0])
            elif (
                io != "pattern"
                and self.forward is not None
                and _not_per_position(hidden, self.forward.seq_len)
            ):
                work = row_major(hidden, len(self.forward.rows), self.forward.seq_len, site[0])
            for level in levels:
                for group in level:
                    self._apply(group, work)
            return hidden if writes and io == "output" else None

        return apply

    def _apply(self, group: _Group, hidden: torch.Tensor) -> None:
        kind = group.kind
        width = hidden.shape[-1] if group.cols is None else len(group.cols)
        if group.vectors is not None and group.vectors.shape[-1] != width:
            op = group.ops[0]
            raise RunError(
                f"{op.origin}: the {kind} vector has {group.vectors.shape[-1]} values but site "
                f"'{op.site}' has width {width}",
                hint=f"give {width} values",
            )
        try:
            if group.rows is not None:
                index: tuple[torch.Tensor, ...] = (group.rows, group.positions)
                if group.cols is not None:
                    index = (group.rows[:, None], group.positions[:, None], group.cols[None, :])
                if kind == "zero":
                    hidden[index] = 0
                elif kind == "scale":
                    hidden[index] = hidden[index] * group.factors
                elif kind == "add":
                    hidden[index] = hidden[index] + group.vectors * group.factors
                elif kind == "set":
                    hidden[index] = group.vectors.expand_as(hidden[index])
                return
            for op in group.ops:
                self._apply_one(op, hidden)
        except RunError:
            raise
        except RuntimeError as exc:
            op = group.ops[0]
            raise RunError(
                f"{op.origin}: {kind} at '{op.site}' failed: {exc}".split("\n")[0],
                hint="check the vector width against the site's shape (`specsight sites MODEL`)",
            ) from None

    def _apply_one(self, op: RowOp, hidden: torch.Tensor) -> None:
        row = self.local[op.row]
        positions = pos_index(op.positions, hidden.device)
        cols = col_index(op.cols, hidden.device)
        if op.io == "pattern":  # [batch, query, head, key]: keys past the row's tokens are padding
            value = hidden[row, positions] if cols is None else hidden[row, positions][:, cols]
            n_keys = len(self.plan.rows[op.row].tokens)
            self.store[op.store] = value[..., :n_keys].detach().clone()
            return
        index: tuple[Any, ...] = (row, positions)
        if cols is not None:
            index = (row, positions[:, None], cols[None, :])
        if op.kind == "grad":
            keep_grad(
                hidden, row, positions, cols, self.store, op.store, op.head_dim, op.origin, op.site
            )
        elif op.kind == "save":
            value = hidden[index].detach().clone()
            if op.head_dim:  # [positions, heads, head_dim]
                value = value.reshape(len(op.positions), -1, op.head_dim)
            self.store[op.store] = value
        elif op.kind == "capture":
            self.store[op.store] = hidden[row, : len(op.positions)].detach().clone()
        elif op.kind == "patch":
            stored = self.store[op.sources[0]]
            source = stored[pos_index(tuple(op.source_positions), stored.device)]
            if cols is not None:
                source = source[:, cols.to(source.device)]
            hidden[index] = source.to(hidden.dtype)
        elif op.kind in ("add", "set"):
            if op.vector is not None:
                value = self._vector(op.vector, hidden.dtype)
            else:  # saved values: one vector per position, heads flattened
                pieces = [p.reshape(p.shape[0], -1) for p in (self.store[k] for k in op.sources)]
                value = torch.cat(pieces).mean(0) if op.reduce == "mean" else pieces[0]
                value = value.to(hidden.dtype)
            if op.kind == "add":
                hidden[index] = hidden[index] + value * (
                    op.factor if op.factor is not None else 1.0
                )
            else:
                hidden[index] = value.expand(len(op.positions), -1)
        else:  # pragma: no cover - compile never emits other kinds
            raise RunError(f"unknown op kind '{op.kind}'")


def _not_per_position(hidden: torch.Tensor, seq_len: int) -> bool:
    """Tensors that are not [batch, pos, width]: more than three axes, or three whose second
    is not a position axis (a one-position input such as a feature vector)."""
    return hidden.dim() > 3 or (hidden.dim() == 3 and seq_len == 1 and hidden.shape[1] != 1)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for param in model.parameters():
        return param.dtype
    return torch.float32


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


def execute(
    plan: Plan,
    model: torch.nn.Module,
    *,
    pad_id: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> EngineOutput:
    """Run every forward of ``plan`` on ``model``; hooks never outlive this call."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = _model_dtype(model)
    runner = _Runner(plan, model, device, pad_id)
    out = EngineOutput()
    metric_slots = {m.name: {row: i for i, row in enumerate(m.rows)} for m in plan.metrics}
    buffers: dict[str, torch.Tensor] = {}
    summary_rows = {
        i for i, row in enumerate(plan.rows) if not plan.invoke_info.get(row.invoke, {}).get("axes")
    }
    metrics_by_name = {m.name: m for m in plan.metrics}
    grad_rows = set(metrics_by_name[plan.backward].rows) if plan.backward else set()
    started = time.perf_counter()
    done = 0
    layers_path = plan.model_summary.get("layers_path")
    keep_supported = "logits_to_keep" in inspect.signature(model.forward).parameters
    inputs = RowInputs(plan, dtype)
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
        for forward in plan.forwards:
            if forward.generate is not None:
                from .generate import run_generation

                out.saves.update(run_generation(runner, forward, dtype, out.generated))
                done += len(forward.rows)
                if progress is not None:
                    progress(done, len(plan.rows))
                continue
            backward = plan.backward is not None and any(r in grad_rows for r in forward.rows)
            if backward:  # every row runs in full: gradients need each row's own graph
                forward = replace(forward, shared_prefix=0)
            runner.prepare(forward, dtype)
            with grad_scope(model, backward):
                logits, column = run_forward(
                    plan, model, forward, device, pad_id, keep_supported, inputs
                )
                if backward:
                    backward_from(
                        metrics_by_name[plan.backward],
                        metric_slots[plan.backward],
                        forward,
                        logits,
                        column,
                    )
            logits = logits.detach()
            for metric in plan.metrics:
                if metric.kind not in ("logit_lens", "attribution"):
                    read_metric(metric, metric_slots[metric.name], forward, logits, column, buffers)
            for i, row in enumerate(forward.rows):
                if row in summary_rows:
                    last = column(len(plan.rows[row].tokens) - 1)
                    probs = torch.softmax(logits[i, last].float(), -1)
                    probs, top = probs.topk(min(NEXT_TOKEN_K, probs.shape[-1]))
                    out.next_tokens[row] = (top.tolist(), probs.tolist())
            done += len(forward.rows)
            if progress is not None:
                progress(done, len(plan.rows))
    modules = module_table(model)
    for metric in plan.metrics:
        if metric.kind == "logit_lens":
            out.metrics.update(logit_lens(metric, runner.store, modules))
            continue
        if metric.kind == "attribution":
            out.metrics[metric.name] = attribution(metric, runner.store)
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
    # Metrics come back in the order the spec lists them.
    order = {m.name: i for i, m in enumerate(plan.metrics)}
    out.metrics = dict(
        sorted(out.metrics.items(), key=lambda kv: (order.get(kv[0].split("/")[0], 0), kv[0]))
    )
    host = to_host({k: runner.store[k] for save in plan.saves for k in save.keys})
    for save in plan.saves:
        out.saves[save.name] = assemble(save.keys, save.shape, host)
    out.timings["execute_s"] = time.perf_counter() - started
    return out
