"""The engine: runs a :class:`~specsight.plan.Plan` on a torch model (torch).

:func:`execute` returns an :class:`EngineOutput` (raw metric and saved tensors, next tokens,
generated ids, timings). Inside: the :class:`~.runner.Runner` applies ops at hooked sites,
:class:`HookScope` owns every hook handle, :mod:`.forward` runs one batched forward,
:mod:`.readout` reads metrics and saved values, :mod:`.grad` the backward pass and
:mod:`.generate` generation under the KV cache; :class:`BlockJoin` joins a run in blocks of
items; :mod:`.shards` runs one plan's forwards in several processes and merges their outputs
into exactly what :func:`execute` gives.
"""

from .blocks import BlockJoin
from .device import device_free_bytes
from .execute import EngineOutput, execute
from .hooks import HookScope, hidden_of, replace_hidden
from .shards import (
    ShardOutput,
    execute_shard,
    merge_shards,
    shard_forwards,
    shard_from_bytes,
    shard_to_bytes,
    shardable,
)
from .widths import module_widths

__all__ = [
    "BlockJoin",
    "EngineOutput",
    "HookScope",
    "ShardOutput",
    "device_free_bytes",
    "execute",
    "execute_shard",
    "hidden_of",
    "merge_shards",
    "module_widths",
    "replace_hidden",
    "shard_forwards",
    "shard_from_bytes",
    "shard_to_bytes",
    "shardable",
]
