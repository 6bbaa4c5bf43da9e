"""Profile of the IOI residual-patching sweep (issue 27): where specsight's time goes.

The 420-cell sweep of ``specs/ioi_patching.yaml`` on the built-in model, run under
``torch.profiler`` (CPU). Its wall time is split into phases:

* ``compile``: specsight's compile of the spec (from the run's manifest);
* ``matmul``: the linear layers and the unembedding (aten mm / addmm / bmm / matmul / linear);
* ``attention``: scaled-dot-product attention kernels;
* ``other kernels``: every other aten op run by the model (norms, activations, rotary, adds);
* ``specsight copies and writes``: aten ops called from specsight's hooks (index, copy, cat,
  stack: patches, the untouched-run reuse) measured as the ops called outside the model's
  own modules;
* ``python``: the wall time no aten op accounts for (hook dispatch, Python per row and per
  forward, the plan's bookkeeping).

The expert's batched hooks (``bench/sweep_patching.py`` (b)) are profiled the same way, so the
two budgets can be read side by side. Writes the table into ``bench/README.md`` (section
``profile_sweep``) and ``bench/results/profile_sweep.json``.

    python bench/profile_sweep.py               # CPU, SmolLM2-135M
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import cpu_name, replace_section  # bench/ is on sys.path when a script runs
from sweep_patching import hooks_batched, load_setup, patching_spec, run_specsight, warmup_spec

RESULTS = Path(__file__).resolve().parent / "results" / "profile_sweep.json"
PHASES = (
    "compile",
    "matmul",
    "attention",
    "other kernels",
    "specsight copies and writes",
    "python",
)
_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
_ATTENTION = ("sdpa", "scaled_dot_product", "flash_attention", "_efficient_attention")
_WRITES = ("aten::index_put", "aten::copy_", "aten::cat", "aten::stack", "aten::index")


def _phase(name: str) -> str:
    if any(name.startswith(m) for m in _MATMUL):
        return "matmul"
    if any(a in name for a in _ATTENTION):
        return "attention"
    if any(name.startswith(w) for w in _WRITES):
        return "specsight copies and writes"
    return "other kernels"


def profile(fn: Callable[[], Any]) -> dict[str, float]:
    """Seconds per phase of one call of ``fn`` (top-level aten ops only, so nothing counts
    twice), and its wall time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        value = fn()
        wall = time.perf_counter() - start
    seconds = dict.fromkeys(PHASES, 0.0)
    events = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    for event in events:
        seconds[_phase(event.name)] += event.cpu_time_total / 1e6
    manifest = getattr(value, "manifest", None)  # specsight's own compile time, from its run
    seconds["compile"] = float(manifest["timings"]["compile_s"]) if manifest else 0.0
    seconds["python"] = max(0.0, wall - sum(seconds.values()))
    return {**seconds, "wall": wall, "aten_calls": float(len(events))}


def main() -> None:
    setup = load_setup("smollm2-135m", "cpu")
    layer_ids = list(range(setup.n_layers))
    run_specsight(setup, warmup_spec(setup), None)
    spec = patching_spec(setup)
    hooks_batched(setup, layer_ids)  # warm both up
    run_specsight(setup, spec, None)
    measured = {
        "hooks_batched (b)": profile(lambda: hooks_batched(setup, layer_ids)),
        "specsight": profile(lambda: run_specsight(setup, spec, None)),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu": cpu_name(), "phases": measured}, indent=2) + "\n")
    head = "| method | wall s | " + " | ".join(PHASES) + " | aten calls |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, row in measured.items():
        cells = [f"{row[p]:.2f} ({100 * row[p] / row['wall']:.0f}%)" for p in PHASES]
        lines.append(f"| {name} | {row['wall']:.2f} | " + " | ".join(cells) + f" | {row['aten_calls']:.0f} |")  # fmt: skip
    about = (
        f"SmolLM2-135M float32, the 420-cell IOI sweep, one profiled run each after a warm-up; "
        f"{cpu_name()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}. "
        "Seconds per phase of the wall time (the profiler's own overhead included in every "
        "row alike); 'python' is the wall time no top-level aten op accounts for."
    )
    spec_row = measured["specsight"]
    reading = (
        f"Reading: matrix products take {100 * spec_row['matmul'] / spec_row['wall']:.0f}% of "
        f"specsight's run and {100 * measured['hooks_batched (b)']['matmul'] / measured['hooks_batched (b)']['wall']:.0f}% "  # fmt: skip
        "of the hooks'; Python, hook dispatch and copies are a small share. The way to the "
        "compute limit is computing fewer layer-positions (a cell (L, p) needs only layers >= L "
        "at positions >= p) in larger products, not less Python."
    )
    block = "<!-- profile_sweep:start -->\n" + about + "\n\n" + "\n".join(lines)
    block += "\n\n" + reading
    block += "\n<!-- profile_sweep:end -->"
    replace_section(
        "<!-- profile_sweep:start -->",
        "<!-- profile_sweep:end -->",
        block,
        heading="## Profile of the patching sweep (`profile_sweep.py`, issue 27)\n\n",
    )
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
