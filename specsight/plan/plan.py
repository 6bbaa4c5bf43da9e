"""The execution plan: what the engine runs, fully resolved, holding no torch objects.

Every prompt is token ids, every op names a module, an input or output, one batch row and
concrete positions (:mod:`.parts`). A plan is JSON-serialisable, so the client can send it to a
server, and :meth:`Plan.explain` describes it without loading a model (``specsight plan``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .parts import Forward, PlanExpectation, PlanMetric, PlanSave, Row, RowOp

__all__ = ["PLAN_VERSION", "Plan", "human_bytes"]

PLAN_VERSION = 1


@dataclass(frozen=True)
class Plan:
    """Everything needed to run a spec on a model."""

    spec_name: str | None
    spec_sha256: str
    model: dict[str, Any]
    model_summary: dict[str, Any]
    rows: tuple[Row, ...]
    ops: tuple[RowOp, ...]
    forwards: tuple[Forward, ...]
    metrics: tuple[PlanMetric, ...]
    saves: tuple[PlanSave, ...]
    vectors: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: image and tensor inputs of rows: key -> {shape, dtype, values (flat)}
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    axis_values: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    axis_labels: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    invoke_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_batch: int = 64
    memory_estimate: dict[str, int] = field(default_factory=dict)
    expectations: tuple[PlanExpectation, ...] = ()
    deterministic: bool = False
    seed: int = 0
    #: the metric a backward pass starts from (``backward:``), None: no backward pass
    backward: str | None = None
    #: the dataset the rows came from: {file, sha256, rows, columns, used, sample, invokes}
    dataset: dict[str, Any] | None = None
    version: int = PLAN_VERSION

    # --- queries ---------------------------------------------------------------------------

    @property
    def item_invokes(self) -> frozenset[str]:
        """The invokes that run once per dataset item (none without a dataset)."""
        return frozenset((self.dataset or {}).get("invokes", ()))

    def hooks(self) -> list[tuple[str, str]]:
        """Distinct (module, io) pairs the plan touches, in first-use order."""
        seen: dict[tuple[str, str], None] = {}
        for op in self.ops:
            seen.setdefault((op.module, op.io), None)
        return list(seen)

    # --- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {data.get('version')!r} is not {PLAN_VERSION}")

        def build(kind: type, items: list[dict[str, Any]]) -> tuple[Any, ...]:
            names = {f.name for f in fields(kind)}
            out = []
            for item in items:
                unknown = set(item) - names
                if unknown:
                    raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
                out.append(kind(**{k: _tuples(v) for k, v in item.items()}))
            return tuple(out)

        data["rows"] = build(Row, data["rows"])
        data["ops"] = build(RowOp, data["ops"])
        data["forwards"] = build(Forward, data["forwards"])
        data["metrics"] = build(PlanMetric, data["metrics"])
        data["saves"] = build(PlanSave, data["saves"])
        data["expectations"] = build(PlanExpectation, data.get("expectations", []))
        data["vectors"] = {k: tuple(v) for k, v in data.get("vectors", {}).items()}
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    # --- explanation -----------------------------------------------------------------------

    def explain(self) -> str:
        """A readable description: invokes, forwards, hooks, metrics, memory estimate."""
        return _explain(self)


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


# --- explanation -----------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _ranges(values: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    if not values:
        return "-"
    values = sorted(set(values))
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


def _dims(metric: PlanMetric) -> list[str]:
    """``layer=30`` per axis of a metric's result (a reduced axis left out)."""
    skip = metric.reduce["axis"] if metric.reduce else None
    return [f"{a}={n}" for i, (a, n) in enumerate(zip(metric.axes, metric.shape)) if i != skip]


def _reduced(metric: PlanMetric) -> str:
    """``, mean over 64 items (+ stderr, 95% bootstrap interval)``."""
    r = metric.reduce
    if not r:
        return ""
    extra = "stderr" + (f", {r['level']:.0%} bootstrap interval" if r["ci"] else "")
    return f", {r['stat']} over {r['size']} {r['over']}s (+ {extra}, per-item values)"


def _explain(plan: Plan) -> str:
    m = plan.model_summary
    title = plan.spec_name or "(unnamed spec)"
    lines = [
        f"plan for {title} on {plan.model['id']} ({m['architecture']}, {m['n_layers']} layers, "
        f"d_model {m['d_model']}), {plan.model['dtype']}",
    ]
    data = plan.dataset
    if data is not None:
        source = data["file"] or "inline rows"
        used = (
            f"{data['used']} of {data['rows']} rows (sampled)"
            if data["sample"]
            else (f"{data['rows']} rows")
        )
        lines.append(
            f"dataset: {source}, {used}, columns {', '.join(data['columns'])}; sha256 "
            f"{data['sha256'][:12]}; one row per item in {', '.join(data['invokes']) or '-'}"
        )
    lines.append("invokes:")
    for name, inv in plan.invoke_info.items():
        tokens = "/".join(str(t) for t in sorted(set(inv["tokens"])))
        sweep = ""
        if inv["axes"]:
            dims = " x ".join(f"{a}[{len(plan.axis_values[name][a])}]" for a in inv["axes"])
            sweep = f", sweep {dims} = {inv['cells']} cells"
        rows = inv["cells"] * inv["prompts"]
        kind = plan.model_summary.get("inputs", "text")
        given = {"text": "prompt(s)", "image": "image(s)", "tensor": "input(s)"}.get(kind, "")
        if data is not None and name in data["invokes"]:
            given = "item(s)"
        unit = "tokens" if kind == "text" else "positions"
        lines.append(
            f"  {name}: {inv['prompts']} {given} of {tokens} {unit}{sweep}, {rows} row(s), stage {inv['stage']}"
        )
    sizes = Counter(len(f.rows) for f in plan.forwards)
    size_text = ", ".join(
        f"{count} x {rows} rows" for rows, count in sorted(sizes.items(), reverse=True)
    )
    lines.append(
        f"forwards: {len(plan.forwards)} ({size_text}; at most {plan.max_batch} rows each, "
        "counting rows x positions run when a forward starts late)"
    )
    for i, fwd in enumerate(plan.forwards[:6]):
        invokes = sorted({plan.rows[r].invoke for r in fwd.rows})
        gen = ""
        if fwd.generate is not None:
            how = "sampled" if fwd.generate.get("do_sample") else "greedy"
            gen = f", generates {fwd.generate['max_new_tokens']} tokens ({how}, left-padded, KV cache)"
        late = ""
        if fwd.from_base:
            n_seq = len({plan.rows[r].tokens for r in fwd.rows})
            late = f", from layer {fwd.shared_prefix} and position {fwd.position_start}"
            late += f" on (untouched runs of {n_seq} sequence{'s' if n_seq > 1 else ''})"
        lines.append(
            f"  #{i} stage {fwd.stage}: {len(fwd.rows)} rows x {fwd.seq_len} tokens{late} "
            f"({', '.join(invokes)}){gen}"
        )
    if len(plan.forwards) > 6:
        lines.append(f"  ... {len(plan.forwards) - 6} more")
    lines += _reuse_lines(plan, int(m["n_layers"]))
    kept = {len(f.keep_logits) for f in plan.forwards if f.keep_logits is not None}
    if kept:
        lines.append(
            f"logits: only the {'/'.join(map(str, sorted(kept)))} position(s) metrics read are unembedded"
        )
    hooks = plan.hooks()
    lines.append(f"hooks: {len(hooks)}")
    by_site: dict[str, Counter] = {}
    for op in plan.ops:
        by_site.setdefault(f"{op.module} ({op.io})", Counter())[op.kind] += 1
    for site, kinds in list(by_site.items())[:8]:
        ops = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
        lines.append(f"  {site}: {ops}")
    if len(by_site) > 8:
        lines.append(f"  ... {len(by_site) - 8} more sites")
    if plan.metrics:
        lines.append("metrics:")
        for metric in plan.metrics:
            what = metric.kind
            if metric.kind == "logit_diff":
                what = f"logit_diff({metric.token_strs[0]!r} - {metric.token_strs[1]!r})"
            elif metric.kind == "top_k":
                what = f"top_k(k={metric.k})"
            elif metric.kind == "recovery":
                patched, clean, corrupt = metric.inputs
                what = f"recovery = ({patched} - {corrupt}) / ({clean} - {corrupt})"
                if metric.reduce and metric.reduce["of"] == "means":
                    what = f"recovery of means = (mean {patched} - mean {corrupt}) / (mean {clean} - mean {corrupt})"
                shape = " x ".join(_dims(metric)) or "scalar"
                lines.append(f"  {metric.name}: {what} -> [{shape}]{_reduced(metric)}")
                continue
            elif metric.kind == "logit_lens":
                token = f"{metric.token_strs[0]!r}, " if metric.token_strs else ""
                what = (
                    f"logit_lens({token}k={metric.k}, sites {metric.sites[0]}..{metric.sites[-1]})"
                )
            elif metric.kind == "attribution":
                clean, corrupt = metric.inputs
                what = (
                    f"attribution = grad({metric.token_strs[0]!r} - {metric.token_strs[1]!r}) "
                    f". ({clean} - {corrupt}), sites {metric.sites[0]}..{metric.sites[-1]},"
                )
            elif metric.kind == "kl":
                reference = plan.rows[metric.reference_rows[0]].invoke
                what = f"KL({reference} || {metric.invoke}) of the next-token distributions"
            elif metric.token_strs:
                what = f"{metric.kind}({', '.join(repr(t) for t in metric.token_strs)})"
            dims = _dims(metric)
            if metric.kind == "logit_lens":
                dims.append(f"site={len(metric.sites)}")
            if metric.kind == "attribution":
                n_pos = len(plan.rows[metric.rows[0]].tokens)
                dims += [f"site={len(metric.sites)}", f"pos={n_pos}"]
            shape = " x ".join(dims) or "scalar"
            where = f"@ position {_ranges(list(metric.positions))}"
            if metric.kind == "loss":
                where = "(mean cross-entropy of every next-token prediction)"
            if plan.model_summary.get("inputs") == "image":
                where = "(the classifier's output)"
            lines.append(
                f"  {metric.name}: {what} on {metric.invoke} {where} -> [{shape}]{_reduced(metric)}"
                + (f"; effect = value - {metric.baseline}" if metric.baseline else "")
            )
    if plan.backward is not None:
        lines.append(
            f"backward: from {plan.backward}, summed over its rows (parameters frozen; "
            "gradients flow from the embedding output)"
        )
    if plan.saves:
        lines.append("saves:")
        for save in plan.saves:
            shape = " x ".join(f"{a}={n}" for a, n in zip(save.axes, save.shape))
            lines.append(
                f"  {save.name}: {save.site} [{shape + ' x ' if shape else ''}positions x width]"
            )
    mem = plan.memory_estimate
    if mem:
        lines.append(
            "memory estimate: "
            + ", ".join(f"{k} {human_bytes(v)}" for k, v in mem.items() if k != "total")
            + f"; total {human_bytes(mem['total'])}"
        )
    return "\n".join(lines)


def _reuse_lines(plan: Plan, n_layers: int) -> list[str]:
    """What prefix reuse and the reuse of untouched runs save, in row-layer-positions."""
    lines: list[str] = []
    plain = [f for f in plan.forwards if f.generate is None]
    full = sum(len(f.rows) * f.seq_len * n_layers for f in plain) or 1
    shared = [f for f in plain if f.shared_prefix and not f.from_base]
    if shared:
        saved = sum((len(f.rows) - 1) * f.shared_prefix * f.seq_len for f in shared)
        depths = ", ".join(str(f.shared_prefix) for f in shared[:12])
        more = ", ..." if len(shared) > 12 else ""
        lines.append(
            f"prefix reuse: {len(shared)} forward(s) of identical rows run their first layers "
            f"once (shared layers: {depths}{more}); {100 * saved / full:.0f}% of row-layers skipped"
        )
    based = [f for f in plain if f.from_base]
    if based:
        sequences = {plan.rows[r].tokens for f in based for r in f.rows}
        done = sum(
            len(f.rows) * (f.seq_len - f.position_start) * (n_layers - f.shared_prefix)
            for f in based
        ) + sum(len(t) * n_layers for t in sequences)
        spent = sum(len(f.rows) * f.seq_len * n_layers for f in based)
        starts = ", ".join(f"{f.shared_prefix}/{f.position_start}" for f in based[:12])
        more = ", ..." if len(based) > 12 else ""
        lines.append(
            f"reuse of untouched runs: {len(based)} forward(s) run only layers >= L at positions"
            f" >= p (L/p: {starts}{more}), reading layer L's input and earlier positions' keys "
            f"and values from one untouched run per sequence ({len(sequences)}); "
            f"{100 * (spent - done) / full:.0f}% of row-layer-positions skipped"
        )
    return lines
