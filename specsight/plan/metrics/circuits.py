"""Circuit metrics on the component graph (:mod:`specsight.plan.graph`): edge attribution
(EAP, EAP-IG) and the faithfulness of a circuit under edge ablation. Both run forwards of
their own after the plan's (the engine's ``after.edge_scores`` and ``after.ablated``), on
the clean and corrupt items' tokens they carry; the plan's rows lay out their results."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ...sites import family_table
from ..graph import CircuitGraph, GraphModules
from ..refs import ResultRef
from .base import CompileEnv, ReaderParts, RowMetric, explain_line

__all__ = ["EdgeAttribution", "Faithfulness", "graph_of"]

#: families whose layers read the residual stream through a norm before attention and again
#: before the MLP, in sequence (the graph's edges assume it), and the first norm's name
_FIRST_NORM = {"llama": "input_layernorm", "gpt2": "ln_1"}


@dataclass(frozen=True, kw_only=True)
class _Items(RowMetric):
    """What both circuit metrics carry: the graph, each item's clean and corrupt tokens, and
    its target and foil token."""

    buffered: ClassVar[bool] = False
    #: it runs forwards of its own after the plan's (a shard cannot run it)
    own_forwards: ClassVar[bool] = True
    graph: CircuitGraph
    clean_tokens: tuple[tuple[int, ...], ...]
    corrupt_tokens: tuple[tuple[int, ...], ...]
    targets: tuple[int, ...]
    foils: tuple[int, ...]
    labels: tuple[str, str]

    @classmethod
    def parts(cls, env: CompileEnv, name: str, metric: Any) -> dict[str, Any]:
        """The fields every circuit metric compiles the same way."""
        path = ("metrics", name)
        refs = [(metric.target, ("target",)), (metric.foil, ("foil",))]
        parts: ReaderParts = env.reader(name, metric, tokens=refs)
        clean = env.plain_prompts(metric.clean, path + ("clean",))
        corrupt = env.plain_prompts(metric.corrupt, path + ("corrupt",))
        _same_lengths(env, path, metric, clean, corrupt)
        n = len(clean)
        tokens = parts.tokens
        pairs = tokens.per_row or (tokens.ids,) * n
        return {
            **parts.fields("baseline", "tokens", "reduce"),
            "graph": graph_of(env, path + ("kind",)),
            "clean_tokens": tuple(tuple(t) for t in clean),
            "corrupt_tokens": tuple(tuple(t) for t in corrupt),
            "targets": tuple(p[0] for p in pairs),
            "foils": tuple(p[1] for p in pairs),
            "labels": (tokens.labels[0], tokens.labels[1]),
        }

    def logit_reads(self) -> Any:
        return iter(())  # its forwards are its own

    def what_pair(self) -> str:
        return f"{self.labels[0]!r} - {self.labels[1]!r}"


@dataclass(frozen=True, kw_only=True)
class EdgeAttribution(_Items):
    """``[upstream, downstream]`` edge scores, averaged over the items."""

    kind: ClassVar[str] = "edge_attribution"
    view: ClassVar[str] = "edges"
    signed: ClassVar[bool] = True
    steps: int
    method: str
    top: int
    #: a node per position too: scores [pos, upstream, downstream] (items of one length)
    per_token: bool = False

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> EdgeAttribution:
        fields = cls.parts(env, name, metric)
        steps = metric.steps if metric.method == "eap_ig" else 1
        per_token = metric.positions == "per_token"
        if per_token:
            _one_length(env, ("metrics", name, "positions"), fields["clean_tokens"])
        record = cls(**fields, steps=steps, method=metric.method, top=metric.top,
                     per_token=per_token)  # fmt: skip
        return replace(record, axes=(), shape=())

    def finish(self, after: Any) -> dict[str, Any]:
        return {self.name: after.edge_scores(self)}

    def manifest_extra(self) -> dict[str, Any]:
        g = self.graph
        shape = {"n_layers": g.n_layers, "n_heads": g.n_heads, "n_kv_heads": g.n_kv}
        files = [{"file": str(self.name), "ranked_by": str(self.name), "edges": self.top}]
        return {"graph": shape, "top": self.top, "method": self.method, "steps": self.steps,
                "per_token": self.per_token, "circuit_files": files}  # fmt: skip

    def suffix(self) -> tuple[str, ...]:
        return (("pos",) if self.per_token else ()) + ("upstream", "downstream")

    def suffix_values(self, axis: str) -> list[Any] | None:
        if axis == "pos":
            return list(range(len(self.clean_tokens[0])))
        if axis == "upstream":
            return self.graph.up_names()
        return self.graph.down_names() if axis == "downstream" else None

    def explain(self, plan: Any) -> str:
        how = "eap" if self.method == "eap" else f"eap_ig, {self.steps} steps"
        what = f"edge_attribution({self.what_pair()}, {how}) over {self.graph.n_edges} edges,"
        extra = (f"upstream={self.graph.n_up}", f"downstream={self.graph.n_down}")
        return explain_line(self, plan, what, extra=extra)


@dataclass(frozen=True, kw_only=True)
class Faithfulness(_Items):
    """``[edges]`` the metric with the circuit (of each size) as a fraction of the model's."""

    kind: ClassVar[str] = "faithfulness"
    view: ClassVar[str] = "faithfulness"
    companions: ClassVar[tuple[str, ...]] = (
        "ci_low",
        "ci_high",
        "circuit",
        "normalized",
        "full",
        "ablated",
    )
    ablation: str
    #: the circuits: the top ``sizes`` edges of metric ``source``, or the ``edges`` given
    #: as (upstream, downstream) or, per position, (upstream, downstream, position)
    source: ResultRef | None
    sizes: tuple[int, ...]
    edges: tuple[tuple[int, ...], ...]
    level: float
    n_boot: int
    seed: int

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> Faithfulness:
        fields = cls.parts(env, name, metric)
        path = ("metrics", name, "circuit")
        source, sizes, edges = env.circuit_edges(name, metric.circuit, fields["graph"], path)
        record = cls(
            **fields,
            ablation=metric.ablation,
            source=None if source is None else ResultRef(source),
            sizes=tuple(sizes),
            edges=tuple(edges),
            level=metric.level,
            n_boot=metric.n_boot,
            seed=metric.seed,
        )
        return replace(record, axes=(), shape=())

    def manifest_extra(self) -> dict[str, Any]:
        """The ablation, and a circuit file per size ranked from an edge attribution."""
        files = [
            {"file": f"{self.name}.top{k}", "ranked_by": str(self.source), "edges": k}
            for k in (self.sizes if self.source is not None else ())
        ]
        return {"ablation": self.ablation, "circuit_files": files}

    def circuit_sizes(self) -> list[int]:
        return list(self.sizes) if self.source is not None else [len(self.edges)]

    def finish(self, after: Any) -> dict[str, Any]:
        scores = None if self.source is None else after.metrics[self.source]
        values = after.faithfulness(self, scores)
        return {self.name if not k else f"{self.name}/{k}": v for k, v in values.items()}

    def suffix(self) -> tuple[str, ...]:
        return ("edges",)

    def suffix_values(self, axis: str) -> list[Any] | None:
        return self.circuit_sizes() if axis == "edges" else None

    def companion_axes(self, companion: str, axes: list[str]) -> list[str]:
        return [] if companion in ("full", "ablated") else axes

    def explain(self, plan: Any) -> str:
        circuit = (
            f"top {', '.join(map(str, self.sizes))} edges of {self.source}"
            if self.source is not None
            else f"{len(self.edges)} edges"
        )
        what = f"faithfulness({self.what_pair()}, {circuit}, ablation {self.ablation}),"
        return explain_line(self, plan, what, extra=(f"edges={len(self.circuit_sizes())}",))


def graph_of(env: CompileEnv, path: tuple[Any, ...]) -> CircuitGraph:
    """The component graph of the model (a located issue when its family has none)."""
    info = env.info
    table = family_table(info)
    first = _FIRST_NORM.get(info.family or "")
    if table is None or first is None:
        raise env.fail(
            "no-circuit-graph",
            f"{info.architecture} has no component graph here: edges assume a layer that reads "
            "the residual stream through a norm before attention and again before the MLP",
            path,
            "circuits support the Llama, Mistral, Qwen2/3 and GPT-2 families",
        )
    layers = range(info.n_layers)
    resolve = table["sites"]

    def sites(name: str) -> list[Any]:
        return env.sites(f"{name}.*", path)

    def columns(group: str) -> tuple[tuple[str, int], ...]:
        fused = resolve[group].layout == "fused"  # q, k, v: column blocks of one output
        first_col = {"q": 0, "k": 1, "v": 2}[group] * info.d_model if fused else 0
        return tuple((s.module, first_col) for s in sites(group))

    layer_names = tuple(s.module for s in sites("resid_pre"))
    modules = GraphModules(
        layers=layer_names,
        ln1=tuple(f"{layer_names[i]}.{first}" for i in layers),
        q=columns("q"),
        k=columns("k"),
        v=columns("v"),
        o_proj=tuple(s.module for s in sites("head_z")),
        ln2=tuple(s.module for s in sites("resid_mid")),
        mlp=tuple(s.module for s in sites("mlp_out")),
        final_norm=env.sites("final_norm", path)[0].module,
    )
    return CircuitGraph(
        n_layers=info.n_layers,
        n_heads=info.n_heads,
        n_kv=info.n_kv_heads,
        d_head=info.d_head,
        modules=modules,
    )


def _one_length(env: CompileEnv, path: tuple[Any, ...], prompts: tuple[tuple[int, ...], ...]) -> None:  # fmt: skip
    lengths = sorted({len(p) for p in prompts})
    if len(lengths) > 1:
        first = next(i for i, p in enumerate(prompts) if len(p) != len(prompts[0]))
        raise env.fail(
            "per-token-lengths",
            f"nodes per position need items of one length: item 0 has {len(prompts[0])} "
            f"tokens, item {first} {len(prompts[first])}",
            path,
            "use items of one template (the same tokens but for the names), or positions: summed",
        )


def _same_lengths(env: CompileEnv, path: tuple[Any, ...], metric: Any, clean: list, corrupt: list) -> None:  # fmt: skip
    if len(clean) != len(corrupt):
        raise env.fail(
            "circuit-items",
            f"'{metric.clean}' has {len(clean)} prompts but '{metric.corrupt}' has "
            f"{len(corrupt)}; a circuit metric pairs them item by item",
            path + ("corrupt",),
            "run both invokes over the same dataset",
        )
    for i, (a, b) in enumerate(zip(clean, corrupt)):
        if len(a) != len(b):
            raise env.fail(
                "circuit-lengths",
                f"item {i}: the clean prompt has {len(a)} tokens but the corrupt one has "
                f"{len(b)}; edges compare the two runs position by position",
                path + ("corrupt",),
                "pair prompts of the same token length (e.g. names of one token each)",
            )
