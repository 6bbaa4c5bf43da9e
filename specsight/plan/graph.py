"""The component graph circuits are made of (torch-free): its nodes, its edges, their names,
and the modules of the model each node reads or writes.

Upstream nodes write into the residual stream: ``embed`` (what enters the first layer: token
and, where the model has them, position embeddings), ``head.L.H`` (one attention head's term of
the attention output: its z through its columns of the output projection, without the bias)
and ``mlp.L`` (the MLP's output). Downstream nodes read from it, each through its own norm:
``head.L.H.q`` (a query head's input), ``head.L.G.k`` and ``head.L.G.v`` (a key/value head's;
G counts key/value heads, fewer than query heads under grouped-query attention), ``mlp.L``
(the MLP's input) and ``logits`` (the final norm's input). An edge ``U->D`` exists when U
writes before D reads: from any earlier layer, and from a layer's heads to the same layer's
MLP (the models here add attention before the MLP reads).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

__all__ = ["CircuitGraph", "GraphModules"]


@dataclass(frozen=True, kw_only=True)
class GraphModules:
    """Where each node lives in the model: per layer, the layer (its input is the residual
    stream the heads read), the norm before attention, the q/k/v projections as (module,
    first column), the output projection (its input is the heads' z), the norm before the
    MLP (its input is the residual stream the MLP reads) and the MLP; the final norm."""

    layers: tuple[str, ...]
    ln1: tuple[str, ...]
    q: tuple[tuple[str, int], ...]
    k: tuple[tuple[str, int], ...]
    v: tuple[tuple[str, int], ...]
    o_proj: tuple[str, ...]
    ln2: tuple[str, ...]
    mlp: tuple[str, ...]
    final_norm: str


@dataclass(frozen=True, kw_only=True)
class CircuitGraph:
    """Per-head, per-MLP component graph of a model with ``n_layers`` layers of ``n_heads``
    query heads and ``n_kv`` key/value heads of width ``d_head``."""

    n_layers: int
    n_heads: int
    n_kv: int
    d_head: int
    modules: GraphModules

    # --- upstream nodes: embed, then per layer its heads and its MLP
    @property
    def n_up(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    def up_index(self, layer: int, head: int | None = None) -> int:
        """A head's upstream index (``head=None``: the layer's MLP)."""
        return 1 + layer * (self.n_heads + 1) + (self.n_heads if head is None else head)

    def up_layer(self, index: int) -> tuple[int, bool]:
        """(layer, is a head) of an upstream node; the embedding is layer -1."""
        if index == 0:
            return -1, False
        layer, within = divmod(index - 1, self.n_heads + 1)
        return layer, within < self.n_heads

    def up_names(self) -> list[str]:
        return list(self._up_index)

    @cached_property
    def _up_index(self) -> dict[str, int]:
        names = ["embed"]
        for layer in range(self.n_layers):
            names += [f"head.{layer}.{h}" for h in range(self.n_heads)] + [f"mlp.{layer}"]
        return {name: i for i, name in enumerate(names)}

    # --- downstream nodes: per layer q heads, k heads, v heads, the MLP; then the logits
    @property
    def per_layer_down(self) -> int:
        return self.n_heads + 2 * self.n_kv + 1

    @property
    def n_down(self) -> int:
        return self.n_layers * self.per_layer_down + 1

    def down_range(self, layer: int, group: str) -> range:
        """The downstream indices of a layer's ``q``, ``k``, ``v`` heads or its ``mlp``."""
        base = layer * self.per_layer_down
        start, size = {
            "q": (0, self.n_heads),
            "k": (self.n_heads, self.n_kv),
            "v": (self.n_heads + self.n_kv, self.n_kv),
            "mlp": (self.n_heads + 2 * self.n_kv, 1),
        }[group]
        return range(base + start, base + start + size)

    def down_layer(self, index: int) -> tuple[int, bool]:
        """(layer, is the MLP) of a downstream node; the logits are layer ``n_layers``."""
        layer, within = divmod(index, self.per_layer_down)
        return layer, within == self.per_layer_down - 1

    def down_names(self) -> list[str]:
        return list(self._down_index)

    @cached_property
    def _down_index(self) -> dict[str, int]:
        names = []
        for layer in range(self.n_layers):
            names += [f"head.{layer}.{h}.q" for h in range(self.n_heads)]
            names += [f"head.{layer}.{g}.k" for g in range(self.n_kv)]
            names += [f"head.{layer}.{g}.v" for g in range(self.n_kv)]
            names.append(f"mlp.{layer}")
        return {name: i for i, name in enumerate([*names, "logits"])}

    # --- edges
    def is_edge(self, up: int, down: int) -> bool:
        up_layer, is_head = self.up_layer(up)
        down_layer, is_mlp = self.down_layer(down)
        return up_layer < down_layer or (up_layer == down_layer and is_head and is_mlp)

    def edges(self) -> Iterator[tuple[int, int]]:
        """Every (upstream, downstream) pair that is an edge."""
        for up in range(self.n_up):
            for down in range(self.n_down):
                if self.is_edge(up, down):
                    yield up, down

    @cached_property
    def n_edges(self) -> int:
        return sum(1 for _ in self.edges())

    def edge_name(self, up: int, down: int) -> str:
        return f"{self.up_names()[up]}->{self.down_names()[down]}"

    def parse_edge(self, name: str) -> tuple[int, int] | str:
        """(upstream, downstream) of ``'head.3.1->mlp.5'``, or why it is not an edge."""
        if name.count("->") != 1:
            return "an edge is written 'UPSTREAM->DOWNSTREAM', e.g. 'head.3.1->mlp.5'"
        up_name, down_name = (part.strip() for part in name.split("->"))
        up, down = self._up_index.get(up_name), self._down_index.get(down_name)
        if up is None:
            return f"'{up_name}' is not an upstream node (embed, head.L.H, mlp.L)"
        if down is None:
            return f"'{down_name}' is not a downstream node (head.L.H.q|k|v, mlp.L, logits)"
        if not self.is_edge(up, down):
            return f"'{up_name}' writes after '{down_name}' reads, so no edge joins them"
        return up, down
