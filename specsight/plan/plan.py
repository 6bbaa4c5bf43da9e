"""The execution plan: what the engine runs, fully resolved, holding no torch objects.

Every prompt is token ids, every op names a module, an input or output, one batch row and
concrete positions (:mod:`.ops`); every metric says which rows it reads and how
(:mod:`.metrics`). A plan is JSON-serialisable (:mod:`.codec`), so it can travel between
processes, and :meth:`Plan.explain` describes it without loading a model (``specsight plan``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..sites import SAE_PARTS
from .codec import from_data, to_data
from .packing import Packing
from .records import (
    DatasetInfo,
    Forward,
    InputTensor,
    InvokeInfo,
    Metric,
    Op,
    PlanExpectation,
    PlanSave,
    Row,
    SaeInfo,
)
from .refs import InputKey, InvokeRef, ResultRef, SaeRef, VectorKey

__all__ = ["PLAN_VERSION", "Plan"]

PLAN_VERSION = 2


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything needed to run a spec on a model."""

    spec_name: str | None
    spec_sha256: str
    model: dict[str, Any]
    model_summary: dict[str, Any]
    rows: tuple[Row, ...]
    ops: tuple[Op, ...]
    forwards: tuple[Forward, ...]
    metrics: tuple[Metric, ...]
    saves: tuple[PlanSave, ...]
    invokes: dict[InvokeRef, InvokeInfo] = field(default_factory=dict)
    vectors: dict[VectorKey, tuple[float, ...]] = field(default_factory=dict)
    #: image and tensor inputs of rows
    inputs: dict[InputKey, InputTensor] = field(default_factory=dict)
    #: sparse autoencoders the ops' SAE sites read through
    saes: dict[SaeRef, SaeInfo] = field(default_factory=dict)
    packing: Packing
    memory_estimate: dict[str, int] = field(default_factory=dict)
    expectations: tuple[PlanExpectation, ...] = ()
    deterministic: bool = False
    seed: int = 0
    #: the metrics a backward pass starts from, each summed over its rows (empty: no backward
    #: pass; a batch of jobs may have one per job)
    backward: tuple[ResultRef, ...] = ()
    #: the dataset the rows came from
    dataset: DatasetInfo | None = None
    version: int = PLAN_VERSION

    # --- queries ---------------------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        """Rows a forward holds at most (counting rows x positions run when it starts late)."""
        return self.packing.max_batch

    @property
    def item_invokes(self) -> frozenset[str]:
        """The invokes that run once per dataset item (none without a dataset)."""
        return frozenset(self.dataset.invokes if self.dataset is not None else ())

    def hooks(self) -> list[tuple[str, str, SaeRef | None, str | None]]:
        """Distinct sites the plan touches (module, io, and the SAE part read there), in the
        order their hooks run: modules in first-use order; at one module's io its own ops
        first, then the SAEs reading it by name, each one's features before recon and error
        (an order fixed by the plan's sites alone, so that merged jobs run theirs alike)."""
        seen: dict[tuple[str, str, SaeRef | None, str | None], None] = {}
        first: dict[tuple[str, str], int] = {}
        for op in self.ops:
            seen.setdefault(op.hook_site, None)
            first.setdefault((op.module, op.io), len(first))

        def order(site: tuple[str, str, SaeRef | None, str | None]) -> tuple[Any, ...]:
            sae, part = site[2], site[3]
            rank = (0, "", 0) if sae is None else (1, str(sae), SAE_PARTS.index(part or "features"))
            return (first[(site[0], site[1])], *rank)

        return sorted(seen, key=order)

    def generating(self) -> Iterator[Forward]:
        """The forwards that generate."""
        return (f for f in self.forwards if f.generate is not None)

    # --- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return to_data(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {data.get('version')!r} is not {PLAN_VERSION}")
        return from_data(cls, data)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    # --- explanation -----------------------------------------------------------------------

    def explain(self) -> str:
        """A readable description: invokes, forwards, hooks, metrics, memory estimate."""
        from .explain import explain

        return explain(self)
