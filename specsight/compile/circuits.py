"""What circuit metrics need of the compiler (torch-free): an invoke's plain prompts (no
sweep, ops or generation: the metrics run forwards of their own), and the edges a
faithfulness metric's circuit names (the top edges of an earlier edge_attribution metric, a
circuit file checked against the model, or edges listed), each bad one a located issue.

A circuit file (written by ``run --out``) is JSON: ``{"specsight_circuit": 1, "model":
{...}, "nodes": [...], "edges": [{"edge": "head.3.1->mlp.5", "score": 0.12}, ...],
"spec_sha256": ..., "metric": ...}``.
"""

from __future__ import annotations

import json
from typing import Any

from .. import spec as S
from ..errors import did_you_mean
from ..plan.graph import CircuitGraph
from .context import Context, SpecPath
from .inputs import existing_file

__all__ = ["plain_prompts", "circuit_edges", "graph_model", "CIRCUIT_FORMAT"]

#: the ``specsight_circuit`` version of circuit files
CIRCUIT_FORMAT = 1
#: a circuit file's size limit (bytes)
_MAX_FILE = 64 * 2**20


def graph_model(info: Any) -> dict[str, Any]:
    """What a circuit file records of the model its edges belong to."""
    return {
        "id": info.model_id,
        "architecture": info.architecture,
        "n_layers": info.n_layers,
        "n_heads": info.n_heads,
        "n_kv_heads": info.n_kv_heads,
    }


def plain_prompts(ctx: Context, ref: str, path: SpecPath) -> list[list[int]]:
    """The tokens of an invoke without a sweep, generation or ops other than saves."""
    if ref not in ctx.spec.invokes:
        hint = did_you_mean(ref, ctx.spec.invokes) or "invokes: " + ", ".join(ctx.spec.invokes)
        raise ctx.fail("unknown-invoke", f"no invoke named '{ref}'", path, hint)
    invoke = ctx.spec.invokes[ref]
    changes = [op.op for op in invoke.ops if not isinstance(op, S.SaveOp)]
    if invoke.sweep or invoke.generate is not None or changes:
        raise ctx.fail(
            "circuit-invoke",
            f"a circuit metric runs '{ref}''s prompts in forwards of its own, so the invoke "
            "may not sweep, generate or have ops that change the run"
            + (f" (it has {changes[0]})" if changes else ""),
            path,
            "give the metric an invoke with only a prompt (a dataset column or a list) and saves",
        )
    return [list(t) for t in ctx.tokens[ref]]


def circuit_edges(
    ctx: Context, name: str, circuit: Any, graph: CircuitGraph, path: SpecPath
) -> tuple[str | None, list[int], list[tuple[int, ...]]]:
    """(the edge_attribution metric ranked, the circuit sizes, the edges given)."""
    lengths = {len(t) for t in ctx.tokens[ctx.spec.metrics[name].clean]}  # of its items
    if circuit.from_ is not None:
        return _ranked(ctx, name, circuit, graph, path), circuit.sizes(), []
    if circuit.edges is not None:
        return None, [], _parsed(ctx, graph, circuit.edges, path + ("edges",), lengths)
    return None, [], _from_file(ctx, circuit.file, graph, path + ("file",), lengths)


def _ranked(ctx: Context, name: str, circuit: Any, graph: CircuitGraph, path: SpecPath) -> str:
    source = circuit.from_
    names = list(ctx.spec.metrics)
    earlier = names[: names.index(name)]
    metrics = ctx.spec.metrics
    ranked = [m for m in earlier if isinstance(metrics[m], S.EdgeAttributionMetric)]
    if source not in ranked:
        found = metrics.get(source)
        why = (
            f"no metric named '{source}'"
            if found is None
            else f"'{source}' comes after '{name}'"
            if isinstance(found, S.EdgeAttributionMetric)
            else f"'{source}' is a {found.kind} metric"
        )
        hint = did_you_mean(source, ranked) or (
            "edge_attribution metrics above it: " + ", ".join(ranked)
            if ranked
            else "add an edge_attribution metric above this one"
        )
        raise ctx.fail("circuit-source", f"{why}; a circuit ranks the edges of an "
                       "edge_attribution metric listed before it", path + ("from",), hint)  # fmt: skip
    n_edges = graph.n_edges
    if metrics[source].positions == "per_token":
        n_edges *= len(ctx.tokens[metrics[source].clean][0])
    too_big = [k for k in circuit.sizes() if k > n_edges]
    if too_big:
        raise ctx.fail(
            "circuit-size",
            f"a circuit of {too_big[0]} edges, but the model's graph has {n_edges}",
            path + ("top",),
            f"use at most {n_edges}",
        )
    return source


def _parsed(ctx: Context, graph: CircuitGraph, names: list[Any], path: SpecPath, lengths: set[int]) -> list[tuple[int, ...]]:  # fmt: skip
    """Edges 'UP->DOWN', or 'UP->DOWN@POS' per position (all one way or the other; POS a
    position of every item: ``lengths``, the items' token counts)."""
    edges: list[tuple[int, ...]] = []
    for i, edge in enumerate(names):
        found = _parse_one(graph, edge, lengths)
        if not isinstance(found, str) and edges and len(found) != len(edges[0]):
            found = "edges are all per position ('...@POS') or none are"
        if isinstance(found, str):
            raise ctx.fail("bad-edge", f"edge '{edge}': {found}", path + (i,),
                           "write edges as 'head.3.1->head.5.0.q', 'mlp.2->logits', 'embed->mlp.0'")  # fmt: skip
        if found in edges:
            raise ctx.fail("bad-edge", f"edge '{edge}' is listed twice", path + (i,))
        edges.append(found)
    return edges


def _parse_one(graph: CircuitGraph, edge: Any, lengths: set[int]) -> tuple[int, ...] | str:
    if not isinstance(edge, str):
        return "an edge is a string"
    name, at, pos = edge.partition("@")
    found = graph.parse_edge(name)
    if isinstance(found, str) or not at:
        return found
    if not pos.isdigit():
        return "a position after '@' is a number, e.g. 'head.3.1->logits@13'"
    if lengths and (len(lengths) > 1 or int(pos) >= min(lengths)):
        return f"position {pos} is not a position every item has ({min(lengths)} tokens)"
    return (*found, int(pos))


def _from_file(ctx: Context, file: str, graph: CircuitGraph, path: SpecPath, lengths: set[int]) -> list[tuple[int, ...]]:  # fmt: skip
    full = existing_file(ctx, file, path, "circuit")
    try:
        with open(full, "rb") as handle:
            raw = handle.read(_MAX_FILE + 1)
        if len(raw) > _MAX_FILE:
            raise ValueError(f"it is over {_MAX_FILE // 2**20} MiB")
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("specsight_circuit") != CIRCUIT_FORMAT:
            raise ValueError("it is not a circuit file ('specsight_circuit': 1)")
        edges = data.get("edges")
        if not isinstance(edges, list) or not all(isinstance(e, dict) for e in edges):
            raise ValueError("its 'edges' is not a list of {edge, score} objects")
    except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ctx.fail("circuit-file", f"cannot read circuit file '{file}': {exc}", path,
                       "write circuit files with specsight run --out") from None  # fmt: skip
    model, here = data.get("model"), graph_model(ctx.info)
    shape = ("architecture", "n_layers", "n_heads", "n_kv_heads")
    if not isinstance(model, dict) or any(model.get(k) != here[k] for k in shape):
        theirs = model.get("id") if isinstance(model, dict) else None
        raise ctx.fail(
            "circuit-model",
            f"circuit file '{file}' is for another model ({theirs or 'unknown'}: "
            f"{_shape(model)}), not {here['id']} ({_shape(here)})",
            path,
            "find the circuit again on this model (an edge_attribution metric and run --out)",
        )
    return _parsed(ctx, graph, [e.get("edge") for e in edges], path, lengths)


def _shape(model: Any) -> str:
    if not isinstance(model, dict):
        return "no model recorded"
    return (
        f"{model.get('architecture')}, {model.get('n_layers')} layers, "
        f"{model.get('n_heads')} heads, {model.get('n_kv_heads')} kv heads"
    )
