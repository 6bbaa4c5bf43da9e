"""Compiling generation (torch-free): which steps each op of a generating invoke reaches, the
checks that reject what generation cannot do, and one forward per generating invoke.

Steps count the model's forward calls during generation: step 0 is the prompt pass (prefill);
step s >= 1 feeds new token s-1 (KV cache), so its only position is that token. An op whose
positions are ``all``, ``last`` or ``-1`` reaches every step; any other positions exist only in
the prompt pass.
"""

from __future__ import annotations

from typing import Any

from .. import spec as S
from ..plan import Forward, Generation, Rows
from .context import Context, SpecContext, SpecPath

__all__ = [
    "check_generation",
    "check_generation_length",
    "op_steps",
    "reaches_new_token",
    "step_count",
    "generate_forwards",
    "generation_config",
]

_NEW_TOKEN = ("all", "last", -1, "-1")


def reaches_new_token(positions: Any) -> bool:
    """Whether positions select the new token in every decode step (all, last, -1)."""
    if isinstance(positions, list):
        return len(positions) == 1 and reaches_new_token(positions[0])
    return positions in _NEW_TOKEN


def check_generation(ctx: SpecContext) -> None:
    """Reject what cannot work with generating invokes (located errors)."""
    generating = {n for n, inv in ctx.spec.invokes.items() if inv.generate is not None}
    for name, invoke in ctx.spec.invokes.items():
        for i, op in enumerate(invoke.ops):
            for field_name, source in S.invoke_sources(op):
                if source in generating:
                    ctx.fail(
                        "patch-from-generate",
                        f"cannot read '{source}' in a {op.op}: it generates",
                        ("invokes", name, "ops", i, field_name),
                        f"{op.op} from an invoke without 'generate'",
                    )
        if invoke.generate is None:
            for i, op in enumerate(invoke.ops):
                if op.steps is not None:
                    ctx.fail(
                        "steps-without-generate",
                        "'steps' applies only to an invoke that generates",
                        ("invokes", name, "ops", i, "steps"),
                        "add generate: {max_new_tokens: N} to the invoke, or remove 'steps'",
                    )
            continue
        for i, op in enumerate(invoke.ops):
            if op.site.partition(".")[0] == "attn_pattern":
                ctx.fail(
                    "generate-pattern",
                    "attention patterns cannot be saved while generating",
                    ("invokes", name, "ops", i, "site"),
                    "save them in an invoke without 'generate'",
                )
    for name, invoke in ctx.spec.invokes.items():
        for i, op in enumerate(invoke.ops):
            for attr in ("vector", "value"):
                source = getattr(op, attr, None)
                owner = ctx.save_names.get(getattr(source, "saved", None), (None,))[0]
                if owner in generating:
                    ctx.fail(
                        "saved-from-generate",
                        f"saved value '{source.saved}' is saved while '{owner}' generates; "
                        "it has one value per step",
                        ("invokes", name, "ops", i, attr, "saved"),
                        "save it in an invoke without 'generate'",
                    )
    for name, metric in ctx.spec.metrics.items():
        invoke = getattr(metric, "invoke", None)
        if invoke in generating:
            ctx.fail(
                "generate-metric",
                f"metric '{name}' reads invoke '{invoke}', which generates; metrics read the "
                "logits of one forward",
                ("metrics", name, "invoke"),
                "measure a copy of the invoke without 'generate'; generated tokens are in "
                f"'{invoke}/generated_ids'",
            )


def check_generation_length(ctx: Context) -> None:
    """Prompt plus new tokens must fit the model's context."""
    for name, invoke in ctx.spec.invokes.items():
        if invoke.generate is None:
            continue
        longest = max((len(t) for t in ctx.tokens.get(name, ())), default=0)
        limit = ctx.info.max_positions
        if limit and longest + invoke.generate.max_new_tokens > limit:
            ctx.fail(
                "generate-too-long",
                f"the longest prompt ({longest} tokens) and {invoke.generate.max_new_tokens} new "
                f"tokens exceed the model's context of {limit} positions",
                ("invokes", name, "generate", "max_new_tokens"),
                f"generate at most {max(limit - longest, 0)} tokens, or shorten the prompt",
            )


def _step_list(ctx: Context, selector: Any, n_steps: int, path: SpecPath) -> list[int]:
    if selector is None or selector == "all":
        return list(range(n_steps))
    if selector == "prompt":
        return [0]
    if isinstance(selector, str):
        start, _, stop = selector.partition(":")
        lo = int(start) if start else 0
        hi = int(stop) if stop else n_steps
        if hi > n_steps:
            raise ctx.fail(
                "bad-steps",
                f"range '{selector}' ends past the last step {n_steps - 1} "
                f"(max_new_tokens {n_steps}: steps 0..{n_steps - 1})",
                path,
                f"end the range at {n_steps} or earlier",
            )
        steps = list(range(lo, hi))
        if not steps:
            raise ctx.fail("bad-steps", f"range '{selector}' selects no step", path)
        return steps
    out: list[int] = []
    for i, step in enumerate(selector):
        if step >= n_steps:
            raise ctx.fail(
                "bad-steps",
                f"step {step} is past the last step {n_steps - 1} "
                f"(max_new_tokens {n_steps}: steps 0..{n_steps - 1})",
                path + (i,),
                f"use steps 0..{n_steps - 1}; step 0 is the prompt pass",
            )
        if step not in out:
            out.append(step)
    return sorted(out)


def step_count(selector: Any, n_steps: int) -> int:
    """How many steps a ``steps:`` selector names (out-of-range steps left out)."""
    if selector is None or selector == "all":
        return n_steps
    if selector == "prompt":
        return 1
    if isinstance(selector, str):
        start, _, stop = selector.partition(":")
        return len(range(int(start or 0), min(int(stop or n_steps), n_steps)))
    return len({step for step in selector if 0 <= step < n_steps})


def op_steps(ctx: Context, invoke: S.Invoke, op: Any, path: SpecPath) -> tuple[int, ...] | None:
    """The steps an op of ``invoke`` really acts in (None when the invoke does not generate)."""
    if invoke.generate is None:
        return None
    n_steps = invoke.generate.max_new_tokens
    steps = _step_list(ctx, op.steps, n_steps, path + ("steps",))
    if S.invoke_sources(op) or isinstance(op, S.SkipOp | S.NoiseOp):
        # copies of other prompts' positions, a layer's input, seeded noise: the prompt pass
        if op.steps is not None and steps != [0]:
            raise ctx.fail(
                "patch-steps",
                f"a {op.op} acts on the prompt's positions, so it applies in the prompt pass "
                f"(step 0) only; its steps are {op.steps}",
                path + ("steps",),
                "use steps: prompt, or remove 'steps'",
            )
        return (0,)
    if reaches_new_token(op.positions):
        return tuple(steps)
    if 0 not in steps:
        shown = op.steps if isinstance(op.steps, str) else steps
        raise ctx.fail(
            "unreachable-steps",
            f"positions {op.positions!r} select prompt tokens, which exist only in step 0 "
            f"(the prompt pass), but the op's steps are {shown}: under the KV cache a later step "
            "sees only the new token",
            path + ("steps",),
            "use positions: last (the new token in every step), or steps: prompt",
        )
    return (0,)


def generation_config(invoke: S.Invoke) -> Generation:
    gen = invoke.generate
    assert gen is not None
    if gen.sampling == "greedy":
        return Generation(max_new_tokens=gen.max_new_tokens, do_sample=False)
    return Generation(
        max_new_tokens=gen.max_new_tokens,
        do_sample=True,
        temperature=gen.sampling.temperature,
        top_p=gen.sampling.top_p,
        seed=gen.sampling.seed,
    )


def generate_forwards(ctx: Context, stages: dict[str, int], max_batch: int) -> list[Forward]:
    """Whole generations, prompts (and a sweep's cells) batched as rows with left padding, at
    most ``max_batch`` rows each."""
    out = []
    for name, invoke in ctx.spec.invokes.items():
        if invoke.generate is None:
            continue
        rows = [i for i, row in enumerate(ctx.rows) if row.invoke == name]
        for start in range(0, len(rows), max_batch):
            chunk = Rows(rows[start : start + max_batch])
            seq = max(len(ctx.rows[r].tokens) for r in chunk)
            config = generation_config(invoke)
            out.append(Forward(stage=stages[name], rows=chunk, seq_len=seq, generate=config))
    return out
