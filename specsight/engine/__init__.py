"""The engine: runs a :class:`~specsight.plan.Plan` on a torch model (torch).

The :class:`Executor` is the one way plans run (a plan, blocks of items, several jobs merged,
a shard), and returns :class:`EngineOutput` s (raw metric and saved tensors, next tokens,
generated ids, timings). Inside: the :class:`~.runner.Runner` applies each op kind at hooked
sites, :class:`HookScope` owns every hook, :mod:`.forward` runs one batched forward,
:mod:`.readout` reads metrics (each kind computes its own) and saved values, :mod:`.grad` the
backward pass, :mod:`.generate` generation under the KV cache and :mod:`.reuse` the reuse of
untouched runs; :class:`BlockJoin` joins a run in blocks of items; :mod:`.shards` runs some of
a plan's forwards in a process and merges shards' outputs into exactly what one run gives.
"""

from .blocks import BlockJoin
from .device import device_free_bytes
from .execute import EngineOutput
from .executor import Executor, execute
from .hooks import HookScope, hidden_of, replace_hidden
from .python_calls import given_functions
from .shards import (
    ShardOutput,
    execute_shard,
    merge_shards,
    shard_from_bytes,
    shard_to_bytes,
)
from .widths import module_widths

__all__ = [
    "BlockJoin",
    "EngineOutput",
    "Executor",
    "HookScope",
    "ShardOutput",
    "device_free_bytes",
    "execute",
    "execute_shard",
    "given_functions",
    "hidden_of",
    "merge_shards",
    "module_widths",
    "replace_hidden",
    "shard_from_bytes",
    "shard_to_bytes",
]
