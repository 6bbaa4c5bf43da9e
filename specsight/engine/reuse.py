"""Reuse of untouched runs: forwards planned ``from_base`` compute layers >= S at positions
>= p for every row, for rows of any number of token sequences of one length.

Each sequence runs once untouched (no op; a few at a time in one batch, kept while forwards
need them): its keys and values per layer, and its hidden state at the input of every layer a
forward starts at. A ``from_base`` forward then gets a cache whose layers hold the untouched
keys and values of positions < p (per row, by index; never written to, so nothing is copied
per row); the layers below S do not run (the forward calls a stand-in of the model whose
layers below S answer with their input, :mod:`.skipping`), and layer S's input is replaced by
the untouched hidden states at positions >= p (:meth:`~.runner.Runner.expander`). Nothing of
the model is changed: every hook belongs to a :class:`~.hooks.HookScope`. Where the model keeps
no keys and values (Mamba), such a forward runs every position but still skips the layers
below S.

A run of only some of the forwards (a shard, :meth:`UntouchedRuns.replay`) reads each untouched
run from the same batch of sequences a run of every forward computes it in: which batch that is
follows from the plan alone, and a batch of other sequences may round differently.
"""

from __future__ import annotations

import inspect
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import RunError
from ..plan import Forward, Plan
from .hooks import HookScope
from .skipping import StandIns

__all__ = ["UntouchedRuns", "Reuse"]

_KEEP = 4  # untouched runs kept beyond what the largest forward needs
#: sequences whose untouched runs one model call computes
Batch = tuple[tuple[int, ...], ...]


@dataclass
class _Run:
    """One sequence's untouched run."""

    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [1, heads, n, d_head]
    values: list[torch.Tensor] = field(default_factory=list)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n, d_model]


@dataclass
class Reuse:
    """How one ``from_base`` forward runs: from position ``start``; layers below ``skip`` on
    one row, layer ``skip``'s input ``hidden``."""

    start: int
    skip: int
    kwargs: dict[str, Any]  # the cache and position ids handed to the model
    hidden: torch.Tensor | None  # layer ``skip``'s input, [rows, positions from start, d]


def _read_only_layer() -> type:
    from transformers.cache_utils import DynamicLayer

    class ReadOnlyLayer(DynamicLayer):
        """Keys and values of the positions before the start, one per sequence; ``update``
        returns them (picked per row) with the new ones and stores nothing."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor | None):
            super().__init__()
            self.keys, self.values, self.index = keys, values, index
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            rows = key_states.shape[0]
            if self.index is None:
                keys = self.keys.expand(rows, -1, -1, -1)
                values = self.values.expand(rows, -1, -1, -1)
            else:
                keys, values = self.keys[self.index], self.values[self.index]
            return torch.cat([keys, key_states], -2), torch.cat([values, value_states], -2)

    return ReadOnlyLayer


class UntouchedRuns:
    """The untouched runs of one plan's sequences, and how its ``from_base`` forwards use them."""

    def __init__(self, model: torch.nn.Module, plan: Plan, layers: list[str] | None):
        self.model, self.plan, self.layers = model, plan, layers
        path = plan.model_summary.get("layers_path")
        #: the model without its layers below a forward's first (their output structure is
        #: recorded by the untouched runs)
        self.stand_ins = StandIns(model, path) if layers is not None and path else None
        params = inspect.signature(model.forward).parameters
        self.kwarg = next((k for k in ("cache", "past_key_values") if k in params), None)
        based = [f for f in plan.forwards if f.from_base]
        self.input_layers = sorted({f.shared_prefix for f in based if f.shared_prefix})
        self.keep = _KEEP + max((len(self._sequences(f)[0]) for f in based), default=0)
        self.batch = max(1, plan.max_batch)
        self.runs: OrderedDict[tuple[int, ...], _Run] = OrderedDict()
        self.has_cache = self.kwarg is not None
        self._read_only: type | None = None
        #: a replayed run (:meth:`replay`): forward rows -> the batch each sequence's run is from
        self.schedule: dict[tuple[int, ...], list[Batch]] | None = None
        self.pending: Counter[tuple[tuple[int, ...], Batch]] = Counter()
        self.kept: dict[tuple[tuple[int, ...], Batch], _Run] = {}

    def _sequences(self, forward: Forward) -> tuple[list[tuple[int, ...]], list[int]]:
        """The forward's distinct token sequences, and each row's index among them."""
        seen: dict[tuple[int, ...], int] = {}
        index = [seen.setdefault(self.plan.rows[r].tokens, len(seen)) for r in forward.rows]
        return list(seen), index

    def prepare(self, forward: Forward, device: torch.device, runner: Any) -> Reuse | None:
        """How ``forward`` runs from its untouched runs; None: as a plain forward (every layer
        and position), e.g. when the model's layer stack is not known."""
        skip = forward.shared_prefix
        if not forward.from_base or (skip and self.layers is None):
            return None
        if not skip and not self.has_cache:  # nothing to read: no untouched run is worth it
            return None
        sequences, index = self._sequences(forward)
        if self.schedule is not None:
            runs = self._replayed(forward, sequences, device, runner)
        else:
            runs = self._get(sequences, device, runner)
        start = forward.position_start if self.has_cache else 0
        if not start and not skip:
            return None
        rows = torch.tensor(index, device=device) if len(sequences) > 1 else None
        kwargs: dict[str, Any] = {}
        if start:  # one row of positions: the same for every row (and the one below ``skip``)
            kwargs = {
                self.kwarg: self._cache(runs, start, rows, len(forward.rows), skip),
                "position_ids": torch.arange(start, forward.seq_len, device=device)[None],
                "use_cache": True,
            }
        hidden = None
        if skip:
            table = torch.stack([run.inputs[skip][start:] for run in runs])
            hidden = table[rows] if rows is not None else table.expand(len(forward.rows), -1, -1)
            hidden = hidden.contiguous()  # ops write into it row by row
        return Reuse(start, skip, kwargs, hidden)

    def _cache(
        self, runs: list[_Run], start: int, rows: torch.Tensor | None, n_rows: int, skip: int
    ) -> Any:
        """The untouched keys and values before ``start``: per row from layer ``skip`` on,
        the first row's below it (those layers run on one row)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if self._read_only is None:
            self._read_only = _read_only_layer()
        cache = DynamicCache(config=getattr(self.model, "config", None))
        first = rows[:1] if rows is not None else None
        for layer in range(len(runs[0].keys)):
            keys = torch.cat([run.keys[layer][:, :, :start] for run in runs])
            values = torch.cat([run.values[layer][:, :, :start] for run in runs])
            if layer < skip:
                keys, values = (
                    (keys if first is None else keys[first]),
                    (values if first is None else values[first]),
                )
                rows_here, n_here = None, 1
            else:
                rows_here, n_here = rows, n_rows
            if layer < len(cache.layers) and type(cache.layers[layer]) is not DynamicLayer:
                # sliding windows and the like: their own update, on a copy per row
                keys = keys[rows_here] if rows_here is not None else keys.expand(n_here, -1, -1, -1)
                values = (
                    values[rows_here]
                    if rows_here is not None
                    else values.expand(n_here, -1, -1, -1)
                )
                cache.update(keys.contiguous(), values.contiguous(), layer)
            elif layer < len(cache.layers):
                cache.layers[layer] = self._read_only(keys, values, rows_here)
            else:
                cache.layers.append(self._read_only(keys, values, rows_here))
        return cache

    def _get(
        self, sequences: list[tuple[int, ...]], device: torch.device, runner: Any
    ) -> list[_Run]:
        return self._hold(self.runs, sequences, lambda b: self._untouched(list(b), device, runner))

    def _hold(self, held: OrderedDict, sequences: list[tuple[int, ...]], compute: Any) -> list:
        """What ``held`` holds for ``sequences`` after the missing ones are computed, in
        batches of ``self.batch`` (``compute(batch) -> {sequence: value}``), and the least
        recently read beyond ``self.keep`` dropped. One policy for a run (:meth:`_get`) and
        its replay (:meth:`replay`), so that a shard batches as a whole run does."""
        missing = [s for s in sequences if s not in held]
        for i in range(0, len(missing), self.batch):
            held.update(compute(tuple(missing[i : i + self.batch])))
        for s in sequences:
            held.move_to_end(s)
        while len(held) > self.keep:
            held.popitem(last=False)
        return [held[s] for s in sequences]

    def replay(self, forwards: Sequence[Forward]) -> None:
        """Only ``forwards`` (the plan's, in its order; no backward pass) will run: each of
        their untouched runs comes from the batch :meth:`_get` computes it in when every
        forward runs, found by replaying which sequences it holds (nothing runs here)."""
        held: OrderedDict[tuple[int, ...], Batch] = OrderedDict()
        self.schedule = {}
        for forward in self.plan.forwards:
            skip = forward.shared_prefix
            if forward.generate is not None or not forward.from_base:
                continue
            if (skip and self.layers is None) or (not skip and not self.has_cache):
                continue  # as in prepare: no untouched run is read
            sequences = self._sequences(forward)[0]
            self.schedule[forward.rows] = self._hold(held, sequences, lambda b: dict.fromkeys(b, b))
        self.pending = Counter(
            (s, batch)
            for f in forwards
            for s, batch in zip(self._sequences(f)[0], self.schedule.get(f.rows, ()))
        )

    def _replayed(
        self, forward: Forward, sequences: list[tuple[int, ...]], device: torch.device, runner: Any
    ) -> list[_Run]:
        """The runs of a replayed forward, each from its scheduled batch (kept while a later
        forward of the replay reads it)."""
        assert self.schedule is not None
        runs = []
        cache_before = self.has_cache
        for s, batch in zip(sequences, self.schedule[forward.rows]):
            if (s, batch) not in self.kept:
                fresh = self._untouched(list(batch), device, runner)
                if self.has_cache != cache_before:
                    raise RunError(
                        "the model keeps no keys and values the untouched runs can read, which "
                        "changes which forwards read them: this plan cannot run in shards",
                        hint="run it in one process, or compile it without position reuse",
                    )
                for t, run in fresh.items():
                    if self.pending[(t, batch)]:
                        self.kept[(t, batch)] = run
            runs.append(self.kept[(s, batch)])
            self.pending[(s, batch)] -= 1
            if self.pending[(s, batch)] <= 0:
                del self.kept[(s, batch)]
        return runs

    def _untouched(
        self, sequences: list[tuple[int, ...]], device: torch.device, runner: Any
    ) -> dict[tuple[int, ...], _Run]:
        """The untouched runs of ``sequences``, computed with no op active."""
        active = runner.active
        runner.active = None  # the untouched run: no op, no expansion
        try:
            return self._run(sequences, device)
        finally:
            runner.active = active

    def _run(
        self, sequences: list[tuple[int, ...]], device: torch.device
    ) -> dict[tuple[int, ...], _Run]:
        """The untouched runs of ``sequences`` (one length), in one batch."""
        ids = torch.tensor(sequences, device=device)
        inputs: dict[int, torch.Tensor] = {}

        def keeper(layer: int) -> Any:
            def keep(hidden: torch.Tensor) -> None:
                inputs[layer] = hidden

            return keep

        def templater(layer: int) -> Any:
            def record(output: Any) -> None:
                assert self.stand_ins is not None
                self.stand_ins.templates.setdefault(layer, output)

            return record

        with HookScope(self.model) as scope:
            for layer in self.input_layers:
                scope.add((self.layers or [])[layer], "input", keeper(layer))
            if self.stand_ins is not None:  # the structure a skipped layer answers in
                for layer in range(max(self.input_layers, default=0)):
                    if layer not in self.stand_ins.templates:
                        scope.on_output(scope.module(self.layers[layer]), templater(layer))  # type: ignore[index]
            kwargs = {"use_cache": True} if self.has_cache else {}
            output = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        cache = None
        if self.has_cache and hasattr(output, "get"):
            cache = output.get("cache")  # transformers 5; 4 named it past_key_values
            if cache is None and "past_key_values" in output:
                cache = output["past_key_values"]
        cache_layers = getattr(cache, "layers", None)
        if not cache_layers or not all(getattr(c, "keys", None) is not None for c in cache_layers):
            self.has_cache = False
        runs = {}
        for i, sequence in enumerate(sequences):
            run = _Run()
            if self.has_cache:
                run.keys = [c.keys[i : i + 1].clone() for c in cache_layers]
                run.values = [c.values[i : i + 1].clone() for c in cache_layers]
            run.inputs = {layer: hidden[i].clone() for layer, hidden in inputs.items()}
            runs[sequence] = run
        return runs
