"""Forwards on the component graph (:class:`~specsight.plan.graph.CircuitGraph`): every
upstream node's output recorded as the forward makes it, and every downstream node's input
edited on its own, before its norm, as the edges into it say.

A downstream node D reads ``in_D + delta_D``, where ``in_D`` is the residual stream it reads
in this forward and ``delta_D = sum over U of mask[U, D] * (A_U - u_U)``: ``u_U`` is upstream
U's output in this forward, ``A_U`` its replacement along the edge (an edge ablation: another
run's output, or a mean). A head's q, k or v input is edited alone: the hook of its projection
recomputes that head's columns from its own normed input. With ``grad`` the forward edits
nothing: it keeps each receiver's norm output (a head's: its projection's output) and the
norm's input, and :meth:`GraphForward.input_grads` turns the gradients there into
d metric / d in_D, one receiver at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..plan.graph import CircuitGraph
from .hooks import HookScope

__all__ = ["GraphForward", "loaded", "output_weights", "projection_weights"]


@contextlib.contextmanager
def loaded(module: torch.nn.Module) -> Iterator[None]:
    """The module's weights in memory while inside (a layer offloaded by a ``device_map``
    keeps them on the meta device until it runs; read them here, and copy what outlives it)."""
    if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
        from accelerate.utils import align_module_device

        with align_module_device(module):
            yield
    else:
        yield


def projection_weights(module: torch.nn.Module, first: int, n: int, d_head: int) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """A projection's weights for ``n`` heads from column ``first`` of its output, as
    ``[n, d_head, d_in]`` (and the bias ``[n, d_head]``): nn.Linear or GPT-2's Conv1D."""
    with loaded(module):
        return _projection_weights(module, first, n, d_head)


def _projection_weights(module: torch.nn.Module, first: int, n: int, d_head: int) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    cols = slice(first, first + n * d_head)
    weight = module.weight
    # nn.Linear: weight [d_out, d_in]; Conv1D: [d_in, d_out]
    w = weight[cols] if isinstance(module, torch.nn.Linear) else weight[:, cols].T
    bias = getattr(module, "bias", None)
    b = None if bias is None else bias[cols].reshape(n, d_head).clone()
    return w.reshape(n, d_head, -1).clone(), b


def output_weights(module: torch.nn.Module, n_heads: int, d_head: int) -> torch.Tensor:
    """The output projection as ``[n_heads, d_head, d_out]``."""
    with loaded(module):
        weight = module.weight.clone()
    w = weight.T if isinstance(module, torch.nn.Linear) else weight
    return w.reshape(n_heads, d_head, -1)


@dataclass
class _Group:
    """Receivers read through one norm in a gradient forward: the tensor whose gradient is
    taken (the norm's output, or a projection's with the heads' weights, first column and
    count), the norm, and its input."""

    out: torch.Tensor
    norm: torch.nn.Module
    x: torch.Tensor
    weights: tuple[torch.Tensor, int, int] | None


class GraphForward:
    """Hooks that record upstream outputs and edit downstream inputs for one forward at a
    time (:meth:`run`)."""

    def __init__(self, model: torch.nn.Module, graph: CircuitGraph):
        self.model, self.graph = model, graph
        self.ablate: tuple[torch.Tensor, torch.Tensor] | None = None
        self.grad = False
        self.embed_override: torch.Tensor | None = None
        #: upstream outputs so far, written in place: ``[B, P, n_up, d]`` (``_made`` filled)
        self._ups: torch.Tensor | None = None
        self._made = 0
        self._total: torch.Tensor | None = None
        self._x_norm: torch.Tensor | None = None
        #: a gradient forward's receivers, in downstream order: what their input gradients
        #: are computed from (:meth:`input_grads`)
        self._groups: list[_Group] = []
        self._x: torch.Tensor | None = None
        self._hooks = HookScope(model)
        self._install()

    def __enter__(self) -> GraphForward:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.close()

    # --- one forward
    def run(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The logits of one forward under the current settings (``ablate``: the
        replacement values ``[B, P, n_up, d]`` and the edge mask ``[n_up, n_down]``; ``grad``;
        ``embed_override``: the first layer's input)."""
        self._ups, self._made, self._groups, self._x = None, 0, [], None
        self._total = None
        return self.model(input_ids=ids, attention_mask=mask).logits

    def upstream(self) -> torch.Tensor:
        """The upstream nodes' outputs so far in this forward (all of them after it):
        ``[B, P, made, d]``."""
        assert self._ups is not None
        return self._ups[:, :, : self._made]

    def _keep(self, values: torch.Tensor) -> None:
        """Record the next upstream nodes' outputs (``[B, P, n, d]``); while ablating, what
        an ablated edge from each adds instead (``A_U - u_U``) and their running sum; a
        gradient forward records them detached."""
        if self.grad:
            values = values.detach()
        if self._ups is None:
            b, p, _, d = values.shape
            self._ups = values.new_empty((b, p, self.graph.n_up, d))
        n, start = values.shape[2], self._made
        if self.ablate is not None:
            replacement = self.ablate[0][:, :, start : start + n].to(values.dtype)
            values = replacement - values
            added = values.sum(2)
            self._total = added if self._total is None else self._total + added
        self._ups[:, :, start : start + n] = values
        self._made += n

    def input_grads(self, value: torch.Tensor) -> torch.Tensor:
        """d ``value`` / d every receiver's input, ``[B, P, n_down, d]`` (a ``grad`` forward):
        the gradient at each receiver's norm output (a head's: at its columns of the
        projection, through the head's rows of the weights) taken back through the norm by
        a vector-Jacobian product, one batched product per norm and group."""
        found = torch.autograd.grad(value, [group.out for group in self._groups])
        pieces = []
        for group, grad in zip(self._groups, found):
            if group.weights is None:
                cot = grad[:, :, None].float()
            else:
                w, first, n = group.weights
                own = grad[..., first : first + n * self.graph.d_head].float()
                cot = torch.einsum("bpnk,nkd->bpnd", own.reshape(*own.shape[:2], n, -1), w.float())  # fmt: skip
            x = group.x.detach().float().requires_grad_(True)
            with torch.enable_grad(), loaded(group.norm):
                normed = group.norm.forward(x)
            batched = cot.permute(2, 0, 1, 3).to(normed.dtype)
            back = torch.autograd.grad(normed, x, batched, is_grads_batched=True)[0]
            pieces.append(back.permute(1, 2, 0, 3))
        return torch.cat(pieces, 2)

    # --- hooks
    def _install(self) -> None:
        g, names, hooks = self.graph, self.graph.modules, self._hooks
        for layer in range(g.n_layers):
            hooks.add(names.layers[layer], "input", self._layer_input(layer))
            ln1 = hooks.module(names.ln1[layer])
            for group, n in (("q", g.n_heads), ("k", g.n_kv), ("v", g.n_kv)):
                module_name, first = getattr(names, group)[layer]
                module = hooks.module(module_name)
                fn = self._projection(layer, group, ln1, module, first, n)
                hooks.add(module_name, "output", fn)
            hooks.add(names.o_proj[layer], "input", self._heads(hooks.module(names.o_proj[layer])))
            hooks.add(names.ln2[layer], "input", self._norm_input(g.down_range(layer, "mlp")))
            hooks.add(names.ln2[layer], "output", self._norm_output(names.ln2[layer]))
            hooks.add(names.mlp[layer], "output", self._record_whole)
        hooks.add(names.final_norm, "input", self._norm_input(range(g.n_down - 1, g.n_down)))
        hooks.add(names.final_norm, "output", self._norm_output(names.final_norm))

    def _layer_input(self, layer: int) -> Any:
        def hook(x: torch.Tensor) -> torch.Tensor | None:
            new = None
            if layer == 0:
                if self.embed_override is not None:
                    new = x = self.embed_override.to(x.dtype)
                if self.grad:  # gradients flow from here (the weights need none)
                    new = x = x.detach().requires_grad_(True)
                self._keep(x[:, :, None])
            self._x = x
            return new

        return hook

    def _norm_output(self, name: str) -> Any:
        norm = self._hooks.module(name)

        def hook(out: torch.Tensor) -> None:
            if self.grad:
                self._groups.append(_Group(out, norm, self._x_norm, None))

        return hook

    def _heads(self, o_proj: torch.nn.Module) -> Any:
        g = self.graph

        def hook(z: torch.Tensor) -> None:
            w_o = output_weights(o_proj, g.n_heads, g.d_head)  # here: the layer may be offloaded
            b, p, _ = z.shape
            per_head = z.reshape(b, p, g.n_heads, g.d_head)
            self._keep(torch.einsum("bphk,hkd->bphd", per_head.detach() if self.grad else per_head, w_o.to(z.dtype)))  # fmt: skip

        return hook

    def _record_whole(self, out: torch.Tensor) -> None:
        self._keep(out[:, :, None])

    def _delta(self, receivers: Sequence[int]) -> torch.Tensor | None:
        """What to add to the inputs of ``receivers``: ``[B, P, len(receivers), d]``, or None
        when nothing changes them."""
        return self._ablated(receivers) if self.ablate is not None else None

    def _ablated(self, receivers: Sequence[int]) -> torch.Tensor | None:
        """``sum over ablated edges U->D of (A_U - u_U)`` for each receiver D. Every node made
        so far has an edge into D, so it is the sum over all of them (kept running) minus the
        sum over the circuit's edges into D, whichever side has fewer nodes is summed."""
        diff = self.upstream()  # A_U - u_U while ablating
        ablated = self.ablate[1][..., : self._made, list(receivers)].to(diff.device)  # type: ignore[index]
        if not bool(ablated.any()):
            return None
        if ablated.dim() == 3:  # per position: [pos, made, receivers]
            return torch.einsum("bpud,pur->bprd", diff, ablated.to(diff.dtype))
        kept = ~ablated
        by_ablated = ablated.any(1).nonzero()[:, 0]
        by_kept = kept.any(1).nonzero()[:, 0]
        if len(by_ablated) <= len(by_kept):
            part = diff[:, :, by_ablated].transpose(2, 3) @ ablated[by_ablated].to(diff.dtype)
            return part.transpose(2, 3)
        assert self._total is not None
        total = self._total[:, :, None].expand(-1, -1, len(receivers), -1)
        if len(by_kept) == 0:
            return total
        part = diff[:, :, by_kept].transpose(2, 3) @ kept[by_kept].to(diff.dtype)
        return total - part.transpose(2, 3)

    def _projection(self, layer: int, group: str, ln1: Any, module: Any, first: int, n: int) -> Any:  # fmt: skip
        g = self.graph
        receivers = g.down_range(layer, group)

        def hook(out: torch.Tensor) -> torch.Tensor | None:
            assert self._x is not None
            w, b = projection_weights(module, first, n, g.d_head)
            if self.grad:
                self._groups.append(_Group(out, ln1, self._x, (w, first, n)))
                return None
            delta = self._delta(receivers)
            if delta is None:
                return None
            normed = ln1(self._x[:, :, None] + delta.to(self._x.dtype))
            heads = torch.einsum("bpnd,nkd->bpnk", normed, w.to(normed.dtype))
            if b is not None:
                heads = heads + b.to(heads.dtype)
            new = out.clone()
            new[..., first : first + n * g.d_head] = heads.reshape(*out.shape[:2], -1)
            return new

        return hook

    def _norm_input(self, receivers: range) -> Any:
        def hook(x: torch.Tensor) -> torch.Tensor | None:
            if self.grad:
                self._x_norm = x
                return None
            delta = self._delta(receivers)
            return None if delta is None else x + delta[:, :, 0].to(x.dtype)

        return hook
