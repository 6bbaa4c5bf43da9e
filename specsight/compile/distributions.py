"""Metrics of whole next-token distributions (torch-free): ``kl`` reads a reference invoke's
distribution (one prompt, or the same items; it runs in an earlier stage), ``loss`` reads
every position of its prompts. Here: their checks, and the rows and positions they read."""

from __future__ import annotations

from typing import Any

from ..errors import did_you_mean
from .aggregate import one_per_input
from .context import Context, SpecContext, SpecPath

__all__ = ["check_reference", "kl_reference", "kl_dependencies"]


def check_reference(ctx: SpecContext, name: str, metric: Any) -> bool:
    """A kl metric's reference is another invoke giving one prompt or one per item of the
    measured invoke (located issues when not; needs no model)."""
    path: SpecPath = ("metrics", name, "reference")
    invokes = ctx.spec.invokes
    ref = metric.reference
    if ref not in invokes:
        hint = did_you_mean(ref, invokes) or "invokes: " + ", ".join(invokes)
        ctx.fail("unknown-invoke", f"no invoke named '{ref}'", path, hint)
        return False
    if ref == metric.invoke:
        ctx.fail(
            "bad-reference",
            "the reference is the measured invoke itself: the KL is zero",
            path,
            "name the unmodified run, e.g. the clean invoke",
        )
        return False
    if metric.invoke in invokes and not one_per_input(ctx, ref, metric.invoke):
        ctx.fail(
            "bad-reference",
            f"the reference '{ref}' must give one distribution, or one per item of "
            f"'{metric.invoke}': it has a sweep, or other prompts",
            path,
            "use an invoke without a sweep, over the same items (or one prompt)",
        )
        return False
    if invokes[ref].generate is not None:
        ctx.fail("bad-reference", f"'{ref}' generates: use an invoke that does not", path)
        return False
    return True


def kl_dependencies(ctx: SpecContext) -> dict[str, dict[str, SpecPath]]:
    """invoke -> {reference invoke: where}: a kl metric's invoke runs after its reference."""
    deps: dict[str, dict[str, SpecPath]] = {}
    invokes = ctx.spec.invokes
    for name, metric in ctx.spec.metrics.items():
        reference = getattr(metric, "reference", None)  # a kl metric's reference invoke
        if reference in invokes and metric.invoke in invokes and reference != metric.invoke:
            where = ("metrics", name, "reference")
            deps.setdefault(metric.invoke, {}).setdefault(reference, where)
    return deps


def kl_reference(
    ctx: Context, metric: Any, prompt_positions: list[int], cells: int, position_of: Any
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The reference row and position of every row a kl metric reads (result order): the
    reference's item (or its one prompt), at the metric's position selector there."""
    ref = metric.reference
    n_ref = len(ctx.tokens[ref])
    per_prompt = []
    for prompt_index in range(len(prompt_positions)):
        source = prompt_index if n_ref > 1 else 0
        per_prompt.append((ctx.row_index[(ref, 0, source)], position_of(ref, source)))
    rows = tuple(per_prompt[i][0] for _ in range(cells) for i in range(len(prompt_positions)))
    positions = tuple(per_prompt[i][1] for _ in range(cells) for i in range(len(prompt_positions)))
    return rows, positions
