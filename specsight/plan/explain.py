"""``specsight plan``: a plan described in words, without a model: the dataset, each invoke's
inputs and sweep, the forwards (batch sizes, reuse of prefixes and untouched runs), hooks,
metrics (each kind says its own line), saves and the memory estimate."""

from __future__ import annotations

from collections import Counter
from typing import Any

#: a :class:`~.plan.Plan` (which explains itself through this module)
Plan = Any

__all__ = ["explain", "human_bytes"]


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def explain(plan: Plan) -> str:
    """A readable description of ``plan``."""
    m = plan.model_summary
    title = plan.spec_name or "(unnamed spec)"
    lines = [
        f"plan for {title} on {plan.model['id']} ({m['architecture']}, {m['n_layers']} layers, "
        f"d_model {m['d_model']}), {plan.model['dtype']}",
    ]
    lines += _dataset_lines(plan)
    lines += _invoke_lines(plan)
    lines += _forward_lines(plan)
    lines += _reuse_lines(plan, int(m["n_layers"]))
    kept = {len(f.keep_logits) for f in plan.forwards if f.keep_logits is not None}
    if kept:
        lines.append(
            f"logits: only the {'/'.join(map(str, sorted(kept)))} position(s) metrics read are unembedded"
        )
    lines += _hook_lines(plan)
    if plan.metrics:
        lines.append("metrics:")
        lines += [metric.explain(plan) for metric in plan.metrics]
    if plan.backward:
        lines.append(
            f"backward: from {', '.join(plan.backward)}, summed over its rows (parameters "
            "frozen; gradients flow from the embedding output)"
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


def _dataset_lines(plan: Plan) -> list[str]:
    data = plan.dataset
    if data is None:
        return []
    source = data.file or "inline rows"
    used = f"{data.used} of {data.rows} rows (sampled)" if data.sample else f"{data.rows} rows"
    return [
        f"dataset: {source}, {used}, columns {', '.join(data.columns)}; sha256 "
        f"{data.sha256[:12]}; one row per item in {', '.join(data.invokes) or '-'}"
    ]


def _invoke_lines(plan: Plan) -> list[str]:
    lines = ["invokes:"]
    inputs = plan.model_summary.get("inputs", "text")
    over = plan.item_invokes
    for name, inv in plan.invokes.items():
        tokens = "/".join(str(t) for t in sorted(set(inv.tokens)))
        sweep = ""
        if inv.axes:
            dims = " x ".join(f"{a}[{len(inv.axis_values[a])}]" for a in inv.axes)
            sweep = f", sweep {dims} = {inv.cells} cells"
        rows = inv.cells * inv.prompts
        given = {"text": "prompt(s)", "image": "image(s)", "tensor": "input(s)"}.get(inputs, "")
        if name in over:
            given = "item(s)"
        unit = "tokens" if inputs == "text" else "positions"
        lines.append(
            f"  {name}: {inv.prompts} {given} of {tokens} {unit}{sweep}, {rows} row(s), stage {inv.stage}"
        )
    return lines


def _forward_lines(plan: Plan) -> list[str]:
    sizes = Counter(len(f.rows) for f in plan.forwards)
    size_text = ", ".join(
        f"{count} x {rows} rows" for rows, count in sorted(sizes.items(), reverse=True)
    )
    lines = [
        f"forwards: {len(plan.forwards)} ({size_text}; at most {plan.max_batch} rows each, "
        "counting rows x positions run when a forward starts late)"
    ]
    for i, fwd in enumerate(plan.forwards[:6]):
        invokes = sorted({plan.rows[r].invoke for r in fwd.rows})
        gen = ""
        if fwd.generate is not None:
            how = "sampled" if fwd.generate.do_sample else "greedy"
            gen = f", generates {fwd.generate.max_new_tokens} tokens ({how}, left-padded, KV cache)"
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
    return lines


def _hook_lines(plan: Plan) -> list[str]:
    lines = [f"hooks: {len(plan.hooks())}"]
    by_site: dict[str, Counter] = {}
    for op in plan.ops:
        part = "" if op.sae is None else f", sae.{op.sae}.{op.part}"
        by_site.setdefault(f"{op.module} ({op.io}{part})", Counter())[op.label] += 1
    for site, kinds in list(by_site.items())[:8]:
        ops = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
        lines.append(f"  {site}: {ops}")
    if len(by_site) > 8:
        lines.append(f"  ... {len(by_site) - 8} more sites")
    return lines


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
