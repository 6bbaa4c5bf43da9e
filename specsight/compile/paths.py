"""Compiling ``path_patch`` (torch-free): its nodes checked against the component graph, its
unpatched run found, and for every row and receiver a :class:`~specsight.plan.ops.PathPatch`
reading captures of the senders' outputs (in ``from`` and in the unpatched run) and of the
receiver's unpatched input, all taken in an earlier stage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import spec as S
from ..errors import did_you_mean, format_path
from ..plan import RowRef
from ..plan.graph import CircuitGraph
from ..plan.metrics.circuits import graph_of
from ..plan.ops import PathPatch, Sender
from ..sites import Site, resolve_site
from .ablations import capture_key
from .context import Context, SpecContext, SpecPath

__all__ = ["compile_path_patch", "path_base"]


def path_base(ctx: SpecContext, invoke: str, op: S.PathPatchOp) -> str | None:
    """The unpatched run a path_patch reads: ``base``, else the one invoke with the same
    prompt and no ops that change it (None: none or several)."""
    if op.base is not None:
        return op.base
    own = ctx.spec.invokes[invoke]
    found = [
        name
        for name, other in ctx.spec.invokes.items()
        if name != invoke
        and other.prompt == own.prompt
        and not other.sweep
        and other.generate is None
        and all(isinstance(o, S.SaveOp) for o in other.ops)
    ]
    return found[0] if len(found) == 1 else None


def _node(ctx: Context, graph: CircuitGraph, name: str, upstream: bool, path: SpecPath) -> int:
    names = graph.up_names() if upstream else graph.down_names()
    if name in names:
        return names.index(name)
    other = graph.down_names() if upstream else graph.up_names()
    if name in other:
        what = "an input (a receiver)" if upstream else "an output (a sender), not an input"
        raise ctx.fail("path-node", f"'{name}' is {what}", path,
                       did_you_mean(name + ".q", names) or did_you_mean(name, names))  # fmt: skip
    kinds = "embed, head.L.H, mlp.L" if upstream else "head.L.H.q|k|v, mlp.L, logits"
    raise ctx.fail("path-node", f"no node '{name}' in the model's graph ({kinds})", path,
                   did_you_mean(name, names))  # fmt: skip


def _site(ctx: Context, selector: str) -> Site:
    return resolve_site(selector, ctx.info, ctx.sae_sites)[0]


def _sender_site(ctx: Context, graph: CircuitGraph, up: int) -> tuple[Site, int, str]:
    """Where a sender's output is captured, its head (-1: not a head) and, for a head, the
    output projection its z goes through."""
    layer, is_head = graph.up_layer(up)
    if layer < 0:
        return _site(ctx, "resid_pre.0"), -1, ""
    if is_head:
        head = (up - 1) % (graph.n_heads + 1)
        return _site(ctx, f"head_z.{layer}"), head, graph.modules.o_proj[layer]
    return _site(ctx, f"mlp_out.{layer}"), -1, ""


def _receiver(ctx: Context, graph: CircuitGraph, down: int) -> tuple[Site, Site, dict[str, Any]]:
    """(the site the receiver's new value is written to, the site of its unpatched input,
    the op's receiver fields). The new input goes through the receiver's norm and is written
    at the norm's output (a head's: at its columns of the projection's output), so the
    residual stream the norm reads stays as it is for every other reader."""
    names = graph.modules
    if down == graph.n_down - 1:  # the final norm's output is written (its input is the
        norm = names.final_norm  # residual stream itself, which nothing else may see change)
        unpatched = _site(ctx, f"{norm}.input")
        return Site(module=norm, io="output", name="final_norm"), unpatched, {"norm": norm}
    layer, is_mlp = graph.down_layer(down)
    if is_mlp:
        norm = names.ln2[layer]
        written = Site(module=norm, io="output", name=f"{norm}.output", layer=layer)
        return written, _site(ctx, f"resid_mid.{layer}"), {"norm": norm}
    for group in ("q", "k", "v"):
        if down in graph.down_range(layer, group):
            module, first = getattr(names, group)[layer]
            head = down - graph.down_range(layer, group).start
            start = first + head * graph.d_head
            written = Site(module=module, io="output", name=f"{group}.{layer}", layer=layer)
            fields = {"norm": names.ln1[layer], "first": start, "project": True,
                      "cols": ((start, start + graph.d_head),)}  # fmt: skip
            return written, _site(ctx, f"resid_pre.{layer}"), fields
    raise AssertionError(down)


def _checked_sources(ctx: Context, invoke: str, op: S.PathPatchOp, path: SpecPath) -> str:
    """The unpatched run's invoke, after checking it and ``from`` against ``invoke``."""
    base = path_base(ctx, invoke, op)
    if base is None:
        raise ctx.fail(
            "path-base",
            f"path_patch needs the unpatched run of '{invoke}''s prompts, and the spec has "
            "no single invoke with the same prompt and no ops",
            path + ("base",),
            "add one (e.g. corrupt: {prompt: ...}) or name it with base:",
        )
    n = len(ctx.tokens[invoke])
    for field, source in (("from", op.from_), ("base", base)):
        if ctx.grids[source].axes or ctx.spec.invokes[source].generate is not None:
            raise ctx.fail("path-source", f"'{source}' sweeps or generates; path_patch reads "
                           "one run of it per prompt", path + (field,))  # fmt: skip
        counts = (1, n) if field == "from" else (n,)
        if len(ctx.tokens[source]) not in counts:
            raise ctx.fail(
                "prompt-count",
                f"'{invoke}' has {n} prompts but '{source}' has {len(ctx.tokens[source])}",
                path + (field,),
                "give both invokes the same prompts (the same dataset column)",
            )
    return base


def compile_path_patch(
    ctx: Context,
    invoke: str,
    op: S.PathPatchOp,
    path: SpecPath,
    cell: int,
    positions_of: Callable[[list[int], int], list[int]],
) -> None:
    """The PathPatch ops of one spec op in one sweep cell, for every row of ``invoke``
    (``positions_of(tokens, prompt)``: the positions its selectors pick in a row)."""
    from .metrics import MetricCompiler  # the compiler's services, as metric kinds get them

    graph = graph_of(MetricCompiler(ctx), path + ("op",))
    senders = [_node(ctx, graph, s, True, path + ("senders", i)) for i, s in enumerate(op.senders)]
    receivers = [_node(ctx, graph, r, False, path + ("receivers", i)) for i, r in enumerate(op.receivers)]  # fmt: skip
    for i, down in enumerate(receivers):
        if not any(graph.is_edge(up, down) for up in senders):
            raise ctx.fail(
                "path-edge",
                f"receiver '{op.receivers[i]}' reads before any sender writes (an edge into "
                "an earlier layer)",
                path + ("receivers", i),
                "receive in a later layer than the senders (a layer's MLP also reads its heads)",
            )
    base = _checked_sources(ctx, invoke, op, path)
    origin = format_path(path)
    # where each receiver is written and read, and its senders' outputs: the same in every row
    reached = [
        (
            *_receiver(ctx, graph, down),
            [_sender_site(ctx, graph, up) for up in senders if graph.is_edge(up, down)],
        )  # fmt: skip
        for down in receivers
    ]
    for prompt, tokens in enumerate(ctx.tokens[invoke]):
        source = prompt if len(ctx.tokens[op.from_]) > 1 else 0
        if ctx.tokens[base][prompt] != tokens or len(ctx.tokens[op.from_][source]) != len(tokens):
            raise ctx.fail("path-tokens", f"prompt {prompt}: '{base}' must have the same tokens "
                           f"and '{op.from_}' as many", path + ("from",))  # fmt: skip
        positions = tuple(sorted(positions_of(tokens, prompt)))
        for written, unpatched, fields, sites in reached:
            sent = tuple(
                Sender(
                    source=capture_key(ctx, op.from_, source, site, origin),
                    base=capture_key(ctx, base, prompt, site, origin),
                    head=head,
                    o_proj=o_proj,
                )
                for site, head, o_proj in sites
            )
            ctx.ops.append(PathPatch(
                site=written.name, module=written.module, io=written.io, layer=written.layer,
                row=RowRef(ctx.row_index[(invoke, cell, prompt)]), positions=positions,
                origin=origin, base_input=capture_key(ctx, base, prompt, unpatched, origin),
                senders=sent, n_heads=graph.n_heads, d_head=graph.d_head, **fields,
            ))  # fmt: skip
