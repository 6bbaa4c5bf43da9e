"""Running one plan in shards: processes that each run some of its forwards, and a merge of
their outputs into the :class:`~.execute.EngineOutput` that :func:`~.execute.execute` gives
for the whole plan in one process, bit for bit.

A shard runs every forward of the earlier stages (their rows are what the last stage reads:
patch sources, captures, kl references) and a contiguous chunk of the last stage's forwards
(:func:`shard_forwards`). A forward's numbers then depend only on its own rows and ops, on what
the earlier stages left, and on the untouched runs it reads; those are replayed so that each
comes from the batch of sequences one run computes it in (:meth:`~.reuse.UntouchedRuns.replay`).
:func:`shardable` refuses the plans where anything else ties the last stage's forwards together.
A shard's output (:class:`ShardOutput`: per-slot metric values, saved values and next tokens of
its rows) travels as safetensors bytes with JSON metadata (:func:`shard_to_bytes`), and
:func:`merge_shards` joins the outputs, checking that shards agree wherever they overlap.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..errors import RunError
from ..plan import Plan
from .execute import EngineOutput, build_output, run_forwards
from .readout import to_host

__all__ = [
    "ShardOutput",
    "execute_shard",
    "merge_shards",
    "shard_forwards",
    "shard_from_bytes",
    "shard_to_bytes",
    "shardable",
]

FORMAT = 1
_META = "specsight_shard"
#: ops whose ``sources`` are store keys (project_out's name plan vectors)
_READS = ("patch", "mean", "noise", "add", "set")
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


def _stages(plan: Plan) -> tuple[int, dict[int, int]]:
    """The last stage, and the stage of each row."""
    stage_of = {row: f.stage for f in plan.forwards for row in f.rows}
    return max((f.stage for f in plan.forwards), default=0), stage_of


def shardable(plan: Plan) -> str | None:
    """None when shards of ``plan`` merge into exactly what one run gives, else why not."""
    if any(f.generate is not None for f in plan.forwards):
        return "it generates (decoding runs its own loop and may sample)"
    if plan.backward is not None:
        return "it runs a backward pass"
    for metric in plan.metrics:
        if metric.kind in ("logit_lens", "attribution"):
            return f"metric '{metric.name}' ({metric.kind}) reads stored values after the run"
    stages = [f.stage for f in plan.forwards]
    if stages != sorted(stages):
        return "its forwards are not in stage order"
    last, stage_of = _stages(plan)
    if stages.count(last) < 2:
        return f"its last stage has {stages.count(last)} forward(s): nothing to split"
    writers: dict[str, set[int]] = {}
    for op in plan.ops:
        if op.store is not None:
            writers.setdefault(op.store, set()).add(op.row)
    for save_ in plan.saves:
        for key in save_.keys:
            if len(writers.get(key, ())) != 1:
                return f"saved value '{key}' does not come from exactly one row"
    for op in plan.ops:
        if op.kind not in _READS or stage_of.get(op.row) != last:
            continue
        for key in op.sources:  # written in an earlier stage, or by the row itself
            if key not in writers:
                return f"{op.origin or op.kind} reads '{key}', which no row writes"
            if any(r != op.row and stage_of.get(r, last) >= last for r in writers[key]):
                return f"{op.origin or op.kind} reads '{key}', which the last stage writes"
    for metric in plan.metrics:
        for row, ref in zip(metric.rows, metric.reference_rows):
            if stage_of.get(row) == last and stage_of.get(ref, last) >= last:
                return f"kl metric '{metric.name}' compares rows of the last stage with each other"
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
    last, _ = _stages(plan)
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


def _checked(plan: Plan, forwards: Sequence[int]) -> tuple[int, ...]:
    indices = tuple(sorted(set(forwards)))
    if any(not 0 <= i < len(plan.forwards) for i in indices):
        raise ValueError(f"the plan has forwards 0 to {len(plan.forwards) - 1}")
    last, _ = _stages(plan)
    given = set(indices)
    missing = [i for i, f in enumerate(plan.forwards) if f.stage < last and i not in given]
    if missing:
        raise ValueError(f"a shard runs every forward of the earlier stages; {missing} missing")
    return indices


def execute_shard(
    plan: Plan,
    model: torch.nn.Module,
    forwards: Sequence[int],
    *,
    pad_id: int,
    checkpoint: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ShardOutput:
    """Run the forwards ``forwards`` (indices, e.g. one entry of :func:`shard_forwards`) as
    :func:`~.execute.execute` runs them, and read out what their rows give."""
    _refuse(plan)
    indices = _checked(plan, forwards)
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
        if metric.kind == "recovery":  # derived when merging
            continue
        picked = [slot for slot, row in enumerate(metric.rows) if row in rows]
        if not picked:
            continue
        index = torch.tensor(picked, dtype=torch.long)
        out.slots[metric.name] = index
        for name in (metric.name, f"{metric.name}/ids"):
            if name in ran.buffers:
                out.values[name] = ran.buffers[name][index]
    owner = {op.store: op.row for op in plan.ops if op.store is not None}
    keys = [key for save_ in plan.saves for key in save_.keys if owner[key] in rows]
    out.saves = to_host({key: ran.runner.store[key] for key in keys})
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
    """The output one :func:`~.execute.execute` of ``plan`` gives, from the outputs of shards
    that together ran every forward. ``reduce=False`` leaves metrics per item."""
    _refuse(plan)
    digest = _digest(plan)
    if not outputs or any(o.plan_digest != digest for o in outputs):
        raise ValueError("every shard output must come from this plan (and there must be one)")
    if missing := set(range(len(plan.forwards))).difference(*(o.forwards for o in outputs)):
        raise ValueError(f"no shard ran forwards {sorted(missing)[:8]}")
    buffers: dict[str, torch.Tensor] = {}
    for metric in plan.metrics:
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
    build_output(plan, out, buffers, store, modules=None, new_ids={}, pad_id=0, reduce=reduce)
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
