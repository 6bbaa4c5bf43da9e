"""How compile time grows with each dimension of a spec: invokes, ops, sweep values, dataset
rows and metrics, at 2k, 4k, 8k and 16k of each, on the built-in model's shapes (no weights).
Linear growth doubles the time with each step; a quadratic pass would quadruple it. The table
goes into bench/README.md.

    python bench/compile_scaling.py [--no-readme]

CPU time of the validating load and the compile (``time.process_time``), best of 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import cpu_name, replace_section  # noqa: E402
from specsight.compile import Budget, compile_plan  # noqa: E402
from specsight.models.load import load_model_info  # noqa: E402
from specsight.spec import document_of, load_spec  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "compile_scaling.json"
SIZES = (2_000, 4_000, 8_000, 16_000)
PROMPT = "When Mary and John went to the store, John gave a drink to"


def _base(**fields: Any) -> dict[str, Any]:
    return {"specsight": 1, "model": "smollm2-135m", **fields}


def _spec(dimension: str, n: int) -> dict[str, Any]:
    if dimension == "invokes":
        return _base(invokes={f"i{i}": {"prompt": f"Prompt {i} says"} for i in range(n)})
    if dimension == "ops":
        ops = [
            {"op": "save", "site": f"resid_post.{i % 30}", "positions": [i % 14], "name": f"s{i}"}
            for i in range(n)
        ]
        return _base(invokes={"a": {"prompt": PROMPT, "ops": ops}})
    if dimension == "sweep values":
        swept = {
            "prompt": PROMPT,
            "sweep": {"k": [float(i) for i in range(n)]},
            "ops": [{"op": "scale", "site": "resid_post.3", "factor": "{k}"}],
        }
        metrics = {"p": {"kind": "prob", "invoke": "a", "token": " Mary"}}
        return _base(invokes={"a": swept}, metrics=metrics)
    if dimension == "dataset rows":
        rows = [{"p": PROMPT.replace("Mary", f"M{i}"), "io": " Mary"} for i in range(n)]
        metrics = {"p": {"kind": "prob", "invoke": "c", "token": "{io}"}}
        return _base(dataset={"rows": rows}, invokes={"c": {"prompt": "{p}"}}, metrics=metrics)
    metrics = {f"m{i}": {"kind": "prob", "invoke": "c", "token": " Mary"} for i in range(n)}
    return _base(invokes={"c": {"prompt": PROMPT}}, metrics=metrics)


DIMENSIONS = ("invokes", "ops", "sweep values", "dataset rows", "metrics")


def _seconds(data: dict[str, Any], info: Any, tokenizer: Any) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        spec = load_spec(data)
        compile_plan(
            spec,
            info,
            tokenizer,
            doc=document_of(spec),
            budget=Budget(max_batch=64, max_cells=10**6),
        )
        best = min(best, time.process_time() - started)
    return best


def run() -> dict[str, Any]:
    info, tokenizer = load_model_info("smollm2-135m")
    report: dict[str, Any] = {"sizes": list(SIZES), "seconds": {}}
    for dimension in DIMENSIONS:
        times = [_seconds(_spec(dimension, n), info, tokenizer) for n in SIZES]
        report["seconds"][dimension] = [round(t, 3) for t in times]
        print(dimension, report["seconds"][dimension], flush=True)
    report["cpu"] = cpu_name()
    report["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return report


def _table(report: dict[str, Any]) -> str:
    sizes = report["sizes"]
    head = " | ".join(f"{n:,}" for n in sizes)
    lines = [
        "<!-- scaling:start -->",
        "### `compile_scaling.py`",
        "",
        "CPU seconds to load and compile a spec with n of one thing (best of 3, the built-in "
        f"model's shapes); {report['cpu']}, {report['date']}. Linear growth doubles each step "
        f"({sizes[-1] // sizes[0]}x from the first column to the last); a quadratic pass would "
        f"grow {(sizes[-1] // sizes[0]) ** 2}x. Results: "
        "[`results/compile_scaling.json`](results/compile_scaling.json).",
        "",
        f"| n | {head} | last / first |",
        "| --- |" + " --- |" * (len(sizes) + 1),
    ]
    for dimension, times in report["seconds"].items():
        cells = " | ".join(f"{t:.2f}" for t in times)
        lines.append(f"| {dimension} | {cells} | {times[-1] / max(times[0], 1e-9):.1f}x |")
    lines.append("<!-- scaling:end -->")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    report = run()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    table = _table(report)
    print(table)
    if args.readme:
        replace_section(
            "<!-- scaling:start -->",
            "<!-- scaling:end -->",
            table,
            heading="## Compile scaling\n\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
