"""The execution plan: the compiler's output and the engine's input, plain data (no torch).

:class:`Plan` holds :class:`Row` s, per-row :class:`RowOp` s, batched :class:`Forward` s and
the :class:`PlanMetric` s, :class:`PlanSave` s and :class:`PlanExpectation` s read out of them;
it round-trips through JSON and explains itself (``specsight plan``).
"""

from .parts import Forward, PlanExpectation, PlanMetric, PlanSave, Row, RowOp
from .plan import PLAN_VERSION, Plan, human_bytes

__all__ = [
    "PLAN_VERSION",
    "Plan",
    "Row",
    "RowOp",
    "Forward",
    "PlanMetric",
    "PlanSave",
    "PlanExpectation",
    "human_bytes",
]
