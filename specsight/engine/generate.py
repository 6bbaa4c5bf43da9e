"""Generation: runs one generating forward of a plan through Hugging Face ``model.generate``
with the plan's hooks active (every hook, the step counter's too, belongs to the run's
:class:`~.hooks.HookScope`).

Prompts are padded on the left (with an attention mask), so every row's new tokens line up;
op positions, which index each prompt's real tokens, are shifted by the row's padding. A
pre-hook on the model counts its forward calls: call 0 is the prompt pass (step 0), call s the
decode step that feeds new token s-1 under the KV cache. Before each call it installs the
action tables of the ops active in that step: in step 0 at their prompt positions, in later
steps at the only position there is, the new token. Saves are stored per step
(``<store>@<step>``) and stacked by the plan's ``PlanSave``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..errors import RunError
from ..plan import Forward, Op, StoreKey
from ..plan.ops import Save
from .hooks import HookScope
from .runner import ActionTables, Runner

__all__ = ["run_generation", "eos_ids"]


def eos_ids(model: torch.nn.Module) -> set[int]:
    """The end-of-sequence token ids of a model's generation config."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


def _step_ops(
    runner: Runner, forward: Forward, offsets: dict[int, int], step: int
) -> dict[int, list[Op]]:
    """Per row, the ops active in ``step`` with their positions in this step's input (values
    they keep go under a key of their own per step)."""
    out: dict[int, list[Op]] = {}
    for row in forward.rows:
        active = []
        for op in runner.ops_by_row.get(row, ()):
            if op.steps is None or step not in op.steps:
                continue
            positions = tuple(p + offsets[row] for p in op.positions) if step == 0 else (0,)
            key = op.stores()
            per_step = {} if key is None else {"store": StoreKey(f"{key}@{step}")}
            active.append(replace(op, positions=positions, **per_step))
        if active:
            out[row] = active
    return out


def _left_padded(runner: Runner, forward: Forward) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:  # fmt: skip
    """The prompts padded on the left: ids, attention mask, and each row's padding."""
    width = forward.seq_len
    ids = torch.full((len(forward.rows), width), runner.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    offsets: dict[int, int] = {}
    for i, row in enumerate(forward.rows):
        tokens = runner.plan.rows[row].tokens
        offsets[row] = width - len(tokens)
        ids[i, offsets[row] :] = torch.tensor(tokens)
        mask[i, offsets[row] :] = 1
    return ids, mask, offsets


class _Steps:
    """Before each of the model's calls during generation: the action tables of that step
    (decode steps whose active ops keep nothing per step share theirs)."""

    def __init__(self, runner: Runner, forward: Forward, offsets: dict[int, int], checkpoint: Callable[[], None] | None):  # fmt: skip
        self.runner, self.forward, self.offsets, self.checkpoint = (
            runner,
            forward,
            offsets,
            checkpoint,
        )
        self.step = 0
        self.cache: dict[tuple[Any, ...], ActionTables] = {}

    def __call__(self, args: tuple, kwargs: dict) -> None:
        if self.checkpoint is not None:  # every decode step: a cancel need not wait
            self.checkpoint()
        step, runner = self.step, self.runner
        self.step += 1
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(inputs, torch.Tensor):
            inputs = kwargs["inputs_embeds"]
        seq = inputs.shape[1]
        key = None
        if step > 0:
            active = [
                (row, i)
                for row in self.forward.rows
                for i, op in enumerate(runner.ops_by_row.get(row, ()))
                if op.steps is not None and step in op.steps
            ]
            if not any(runner.ops_by_row[row][i].stores() for row, i in active):
                key = (tuple(active), seq)
                if key in self.cache:
                    runner.activate(self.cache[key])
                    return
        tables = runner.prepare(
            replace(self.forward, seq_len=seq), _step_ops(runner, self.forward, self.offsets, step)
        )
        if key is not None:
            self.cache[key] = tables


def run_generation(
    runner: Runner,
    forward: Forward,
    checkpoint: Callable[[], None] | None,
    generated: dict[int, list[int]],
) -> dict[int, torch.Tensor]:
    """Generate for the rows of ``forward``; returns each row's new token ids (as generated,
    padding after an early end included) and fills ``generated`` with its new tokens cut
    after the first end-of-sequence token. ``checkpoint`` runs before every decode step."""
    model, config = runner.model, forward.generate
    assert config is not None
    ids, mask, offsets = _left_padded(runner, forward)
    kwargs: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "do_sample": config.do_sample,
        "pad_token_id": runner.pad_id,
    }
    if config.do_sample:
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=0)
        torch.manual_seed(config.seed)
    with HookScope(model) as scope:  # the step counter ends with this generation
        scope.on_call(model, _Steps(runner, forward, offsets, checkpoint))
        try:
            sequences = model.generate(
                input_ids=ids.to(runner.device), attention_mask=mask.to(runner.device), **kwargs
            )
        except torch.OutOfMemoryError:
            raise RunError(
                f"out of memory generating for {len(forward.rows)} prompts",
                hint="generate fewer prompts",
            ) from None
    _fill_missing_steps(runner, forward)
    new = sequences[:, forward.seq_len :].cpu()
    stops = eos_ids(model)
    for i, row in enumerate(forward.rows):
        tokens = new[i].tolist()
        for j, token in enumerate(tokens):
            if token in stops:
                tokens = tokens[: j + 1]
                break
        generated[row] = tokens
    return {row: new[i] for i, row in enumerate(forward.rows)}


def _fill_missing_steps(runner: Runner, forward: Forward) -> None:
    """Steps that never ran (every row ended early) keep NaN values in per-step saves."""
    for row in forward.rows:
        for op in runner.ops_by_row.get(row, ()):
            if not isinstance(op, Save) or op.steps is None:
                continue
            done = [
                runner.store[f"{op.store}@{s}"]
                for s in op.steps
                if f"{op.store}@{s}" in runner.store
            ]
            for step in op.steps:
                key = f"{op.store}@{step}"
                if key not in runner.store:
                    like = done[-1][-1:] if done else torch.zeros(1)
                    runner.store[key] = torch.full_like(like, float("nan"))
