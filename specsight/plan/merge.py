"""Several plans as one: the rows of queued jobs share forwards (cross-job batching).

Each plan is relabelled whole (:func:`~.refs.relabel`): its rows move past the earlier plans'
and every name it holds (invokes, results, stored values, vectors, inputs) gets the job's tag,
so no reference of any kind can reach another job's rows or values. The merged rows are then
packed into forwards as the compiler packs one plan's, from the plan alone; generating forwards
stay as they are. :class:`Part` says where each plan's rows and names went, for splitting the
run's output back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .packing import logit_reads, pack_rows
from .plan import Plan
from .refs import Name, Relabel, relabel

__all__ = ["Part", "merge_plans"]


@dataclass(frozen=True)
class Part:
    """One plan inside a merged plan: its names carry ``tag``; its rows are ``rows``."""

    tag: str
    rows: range

    def own(self, name: str) -> bool:
        """Whether a result name of the merged run is this part's."""
        return name.startswith(self.tag)

    def local(self, name: str) -> str:
        """A result name of the merged run as the part's own plan names it."""
        return name[len(self.tag) :]


def _tagged(plan: Plan, tag: str, offset: int) -> Plan:
    def name(value: Name) -> str:
        return tag + value

    return relabel(plan, Relabel(row=lambda r: r + offset, name=name))


def merge_plans(plans: Sequence[Plan]) -> tuple[Plan, tuple[Part, ...]]:
    """One plan running every plan's rows (their seed and determinism must agree), and where
    each plan went in it."""
    if not plans:
        raise ValueError("nothing to merge")
    if len({(p.seed, p.deterministic) for p in plans}) > 1:
        raise ValueError("merged plans share one seed and one determinism setting")
    parts, tagged, offset = [], [], 0
    for index, plan in enumerate(plans):
        tag = f"j{index}:"
        tagged.append(_tagged(plan, tag, offset))
        parts.append(Part(tag, range(offset, offset + len(plan.rows))))
        offset += len(plan.rows)
    rows = [row for p in tagged for row in p.rows]
    ops = [op for p in tagged for op in p.ops]
    metrics = tuple(m for p in tagged for m in p.metrics)
    invokes = {k: v for p in tagged for k, v in p.invokes.items()}
    packing = replace(plans[0].packing, max_batch=max(p.max_batch for p in plans))
    generating = [f for p in tagged for f in p.generating()]
    keep = logit_reads(rows, ops, metrics, invokes, packing)
    stages = {name: info.stage for name, info in invokes.items()}
    skip = {r for f in generating for r in f.rows}
    forwards = pack_rows(rows, ops, stages, keep, packing, skip=skip)
    forwards = sorted(forwards + generating, key=lambda f: f.stage)
    merged = Plan(
        spec_name="batch of jobs",
        spec_sha256=plans[0].spec_sha256,
        model=plans[0].model,
        model_summary=plans[0].model_summary,
        rows=tuple(rows),
        ops=tuple(ops),
        forwards=tuple(forwards),
        metrics=metrics,
        saves=tuple(s for p in tagged for s in p.saves),
        invokes=invokes,
        vectors={k: v for p in tagged for k, v in p.vectors.items()},
        inputs={k: v for p in tagged for k, v in p.inputs.items()},
        saes={k: v for p in tagged for k, v in p.saes.items()},
        packing=packing,
        expectations=(),
        deterministic=plans[0].deterministic,
        seed=plans[0].seed,
        backward=tuple(b for p in tagged for b in p.backward),
    )
    return merged, tuple(parts)
