"""The execution plan: the compiler's output and the engine's input, plain data (no torch).

A :class:`Plan` holds :class:`Row` s, ops (one record class per kind, :mod:`.ops`), batched
:class:`Forward` s, metrics (one record class per kind, :mod:`.metrics`), :class:`PlanSave` s
and :class:`PlanExpectation` s. Every reference in it is typed (:mod:`.refs`), so the
transforms here walk all of them alike: :func:`merge_plans` (jobs sharing forwards),
:func:`shard_forwards` (one plan in several processes), :func:`pack_rows` (rows into
forwards). A plan round-trips through JSON and explains itself (``specsight plan``).
"""

from . import metrics, ops
from .explain import human_bytes
from .merge import Part, merge_plans
from .metrics import metric_kind
from .packing import Packing, first_layers, first_positions, logit_reads, pack_rows
from .plan import PLAN_VERSION, Plan
from .records import (
    DatasetInfo,
    Forward,
    Generation,
    InputTensor,
    InvokeInfo,
    Metric,
    Op,
    PlanExpectation,
    PlanSave,
    Reduce,
    Row,
    SaeInfo,
    site_fields,
)
from .refs import (
    InputKey,
    InvokeRef,
    Name,
    Relabel,
    ResultRef,
    RowRef,
    Rows,
    SaeRef,
    StoreKey,
    VectorKey,
    relabel,
)
from .shard import checked_shard, last_stage, shard_forwards, shardable

__all__ = [
    "PLAN_VERSION",
    "Plan",
    "Row",
    "Forward",
    "Generation",
    "Reduce",
    "InvokeInfo",
    "DatasetInfo",
    "InputTensor",
    "SaeInfo",
    "SaeRef",
    "site_fields",
    "Op",
    "Metric",
    "PlanSave",
    "PlanExpectation",
    "Packing",
    "Part",
    "metrics",
    "ops",
    "metric_kind",
    "human_bytes",
    "merge_plans",
    "pack_rows",
    "first_layers",
    "first_positions",
    "logit_reads",
    "shardable",
    "shard_forwards",
    "checked_shard",
    "last_stage",
    "Name",
    "StoreKey",
    "VectorKey",
    "InputKey",
    "InvokeRef",
    "ResultRef",
    "RowRef",
    "Rows",
    "Relabel",
    "relabel",
]
