"""Running one plan in shards: processes that each run some of its forwards (which, and
whether a plan can: :mod:`specsight.plan.shard`), and a merge of their outputs into the
:class:`~.execute.EngineOutput` one run of the whole plan gives in one process, bit for bit.

A forward's numbers depend only on its own rows and ops, on what the earlier stages left, and
on the untouched runs it reads; those are replayed so that each comes from the batch of
sequences one run computes it in (:meth:`~.reuse.UntouchedRuns.replay`). A shard's output (:class:`ShardOutput`: per-slot metric values, saved values and next tokens of
its rows) travels as safetensors bytes with JSON metadata (:func:`shard_to_bytes`), and
:func:`merge_shards` joins the outputs, checking that shards agree wherever they overlap.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..errors import RunError
from ..plan import Plan, checked_shard, shardable
from .execute import EngineOutput, ForwardPass, build_output, run_forwards
from .readout import to_host

__all__ = ["ShardOutput", "execute_shard", "merge_shards", "shard_from_bytes", "shard_to_bytes"]

FORMAT = 1
_META = "specsight_shard"
_DISAGREE = "shards disagree on {}, which both computed: their hardware or kernels differ"


@dataclass
class ShardOutput:
    """What one shard ran and read out, row by row, for :func:`merge_shards`."""

    plan_digest: str  # sha256 of the plan's JSON
    forwards: tuple[int, ...]
    #: metric -> the slots (indices into ``metric.rows``) of the rows this shard ran
    slots: dict[str, torch.Tensor] = field(default_factory=dict)
    #: metric (and ``<metric>/ids``) -> its values at those slots, in their order
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    #: store key of a save -> the value a row of this shard saved (as the store held it)
    saves: dict[str, torch.Tensor] = field(default_factory=dict)
    next_tokens: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _digest(plan: Plan) -> str:
    return hashlib.sha256(plan.to_json().encode()).hexdigest()


def execute_shard(
    plan: Plan,
    model: torch.nn.Module,
    forwards: Sequence[int],
    *,
    pad_id: int,
    checkpoint: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ShardOutput:
    """Run the forwards ``forwards`` (indices, e.g. one entry of
    :func:`~specsight.plan.shard_forwards`) as a run of the whole plan runs them, and read out
    what their rows give."""
    indices = checked_shard(plan, forwards)
    if any(module.training for module in model.modules()):
        raise RunError(
            "the model is in training mode: dropout would draw from one random stream across "
            "forwards, so shards would not give one run's numbers",
            hint="call model.eval() first",
        )
    started = time.perf_counter()
    ran = run_forwards(
        plan, model, pad_id=pad_id, progress=progress, checkpoint=checkpoint, only=indices
    )
    rows = {row for i in indices for row in plan.forwards[i].rows}
    out = ShardOutput(_digest(plan), indices, next_tokens=ran.out.next_tokens)
    for metric in plan.metrics:
        if not metric.buffered:  # derived when merging
            continue
        picked = [slot for slot, row in enumerate(metric.rows) if row in rows]
        if not picked:
            continue
        index = torch.tensor(picked, dtype=torch.long)
        out.slots[metric.name] = index
        for name in (metric.name, f"{metric.name}/ids"):
            if name in ran.buffers:
                out.values[name] = ran.buffers[name][index]
    owner = {op.stores(): op.row for op in plan.ops if op.stores() is not None}
    keys = [key for save_ in plan.saves for key in save_.keys if owner[key] in rows]
    out.saves = to_host({key: ran.store[key] for key in keys})
    out.timings["execute_s"] = time.perf_counter() - started
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _joined(name: str, size: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One metric buffer of ``size`` slots from the shards' (slots, values)."""
    first = parts[0][1]
    buffer = torch.empty((size, *first.shape[1:]), dtype=first.dtype)
    filled = torch.zeros(size, dtype=torch.bool)
    for index, values in parts:
        again = filled[index]
        if again.any() and not _same(buffer[index[again]], values[again]):
            raise ValueError(_DISAGREE.format(f"metric '{name}'"))
        buffer[index] = values
        filled[index] = True
    if not filled.all():
        raise ValueError(f"no shard computed some rows of metric '{name}'")
    return buffer


def merge_shards(
    plan: Plan, outputs: Sequence[ShardOutput], *, reduce: bool = True
) -> EngineOutput:
    """The output one run of ``plan`` gives, from the outputs of shards that together ran
    every forward. ``reduce=False`` leaves metrics per item."""
    reason = shardable(plan)
    if reason is not None:
        raise ValueError(f"this plan cannot run in shards: {reason}")
    digest = _digest(plan)
    if not outputs or any(o.plan_digest != digest for o in outputs):
        raise ValueError("every shard output must come from this plan (and there must be one)")
    if missing := set(range(len(plan.forwards))).difference(*(o.forwards for o in outputs)):
        raise ValueError(f"no shard ran forwards {sorted(missing)[:8]}")
    buffers: dict[str, torch.Tensor] = {}
    for metric in plan.metrics:
        if not metric.buffered:
            continue
        for name in (metric.name, f"{metric.name}/ids"):
            parts = [(o.slots[metric.name], o.values[name]) for o in outputs if name in o.values]
            if parts:  # recovery has none: it is derived
                buffers[name] = _joined(name, len(metric.rows), parts)
    store: dict[str, torch.Tensor] = {}
    tokens: dict[int, tuple[list[int], list[float]]] = {}
    for o in outputs:
        for key, value in o.saves.items():
            if key in store and not _same(store[key], value):
                raise ValueError(_DISAGREE.format(f"saved value '{key}'"))
            store[key] = value
        for row, top in o.next_tokens.items():
            if row in tokens and str(tokens[row]) != str(top):
                raise ValueError(_DISAGREE.format(f"the next tokens of row {row}"))
            tokens[row] = top
    order = [row for f in plan.forwards for row in f.rows if row in tokens]
    out = EngineOutput(next_tokens={row: tokens[row] for row in order})
    build_output(plan, ForwardPass(buffers, store, {}, out), modules=None, pad_id=0, reduce=reduce)
    times = [o.timings.get("execute_s", 0.0) for o in outputs]
    out.timings.update(execute_s=max(times), shards_execute_s=sum(times), shards=len(times) * 1.0)
    return out


def shard_to_bytes(out: ShardOutput) -> bytes:
    """``out`` as safetensors bytes: tensors ``slots/<metric>``, ``values/<name>`` and
    ``saves/<key>``; the rest as JSON in the metadata."""
    tensors: dict[str, torch.Tensor] = {}
    for kind, table in (("slots", out.slots), ("values", out.values), ("saves", out.saves)):
        for name, tensor in table.items():
            tensors[f"{kind}/{name}"] = tensor.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "plan_digest": out.plan_digest,
        "forwards": list(out.forwards),
        "next_tokens": [[row, ids, probs] for row, (ids, probs) in out.next_tokens.items()],
        "timings": out.timings,
    }
    return save(tensors, metadata={_META: json.dumps(meta)})


def shard_from_bytes(data: bytes) -> ShardOutput:
    """A :class:`ShardOutput` back from :func:`shard_to_bytes` (tensors and JSON: no code runs)."""
    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8 : 8 + size])["__metadata__"][_META])
        tensors = load(data)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, not {FORMAT}")
        out = ShardOutput(
            str(meta["plan_digest"]),
            tuple(int(i) for i in meta["forwards"]),
            next_tokens={
                int(row): ([int(i) for i in ids], [float(p) for p in probs])
                for row, ids, probs in meta["next_tokens"]
            },
            timings={str(k): float(v) for k, v in meta["timings"].items()},
        )
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a shard output: {exc}") from None
    tables = {"slots": out.slots, "values": out.values, "saves": out.saves}
    for key, tensor in tensors.items():
        kind, _, name = key.partition("/")
        if kind not in tables or not name:
            raise ValueError(f"not a shard output: unexpected tensor '{key}'")
        tables[kind][name] = tensor
    return out
