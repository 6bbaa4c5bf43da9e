"""The engine: runs a :class:`~specsight.plan.Plan` on a torch model (torch).

:func:`execute` returns an :class:`EngineOutput` (raw metric and saved tensors, next tokens,
generated ids, timings). Inside: the :class:`~.runner.Runner` applies ops at hooked sites,
:class:`HookScope` owns every hook handle, :mod:`.forward` runs one batched forward,
:mod:`.readout` reads metrics and saved values, :mod:`.grad` the backward pass and
:mod:`.generate` generation under the KV cache; :class:`BlockJoin` joins a run in blocks of
items.
"""

from .blocks import BlockJoin
from .device import device_free_bytes
from .execute import EngineOutput, execute
from .hooks import HookScope, hidden_of, replace_hidden
from .widths import module_widths

__all__ = [
    "BlockJoin",
    "EngineOutput",
    "HookScope",
    "device_free_bytes",
    "execute",
    "hidden_of",
    "module_widths",
    "replace_hidden",
]
