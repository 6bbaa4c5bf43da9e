"""specsight's own time on the sweep and dataset benchmarks at two git revisions, interleaved.

Each revision is checked out into a temporary git worktree and run with this checkout's
environment (``PYTHONPATH`` pointing at the worktree), alternating revision by revision for
``--rounds`` rounds, so that both see the same machine load. Per round: ``sweep_patching.py
--method specsight`` (``--repeats`` timed sweeps of the 420-cell IOI grid on the built-in model)
and, unless ``--sweep-only``, ``dataset_patching.py --method specsight`` (the 5,040-cell dataset
grid). Prints the table, writes ``bench/results/compare_revisions.json`` and the table into
``bench/README.md``.

    python bench/compare_revisions.py 2bf4a75 HEAD            # before and after a change
    python bench/compare_revisions.py 2bf4a75 HEAD --sweep-only --rounds 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from _common import cpu_name, replace_section  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "compare_revisions.json"
_HEADING = """## `compare_revisions.py`: specsight's own time at two revisions

```sh
python bench/compare_revisions.py OLD NEW      # the sweep and the dataset grid, interleaved
```

Results: [`results/compare_revisions.json`](results/compare_revisions.json).

"""


def _worktree(rev: str, folder: Path) -> Path:
    path = folder / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(path), rev],
                   check=True, capture_output=True)  # fmt: skip
    return path


def _run(tree: Path, script: str, args: list[str], out: Path) -> list[float]:
    """One child run of a benchmark method in ``tree``; its timed runs in seconds."""
    cmd = [sys.executable, f"bench/{script}", "--method", "specsight", "--json-out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(cmd + args, cwd=tree, env=env, check=True)
    return [float(t) for t in json.loads(out.read_text())["times_s"]]


def _short(rev: str) -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip()


def measure(revs: list[str], args: argparse.Namespace) -> dict:
    times: dict[str, dict[str, list[float]]] = {rev: {"sweep": [], "dataset": []} for rev in revs}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trees = {rev: _worktree(rev, folder) for rev in revs}
        try:
            for round_ in range(args.rounds):
                for rev in revs:
                    out = folder / f"{round_}.json"
                    sweep = ["--repeats", str(args.repeats)]
                    times[rev]["sweep"] += _run(trees[rev], "sweep_patching.py", sweep, out)
                    if not args.sweep_only:
                        times[rev]["dataset"] += _run(trees[rev], "dataset_patching.py", [], out)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)  # fmt: skip
    return {
        "revisions": revs,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "cpu": cpu_name(),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "times_s": times,
    }


def table(report: dict) -> str:
    a, b = report["revisions"]
    lines = [
        f"{report['cpu']}, 2 cores, torch threads: torch's default; {report['rounds']} "
        f"interleaved rounds ({report['repeats']} timed sweeps each); {report['when']}.",
        "",
        f"| benchmark | runs | `{a}` median s | `{b}` median s | ratio | `{a}` best s | `{b}` best s |",
        "|---|---|---|---|---|---|---|",
    ]
    for bench in ("sweep", "dataset"):
        old, new = report["times_s"][a][bench], report["times_s"][b][bench]
        if not old or not new:
            continue
        ratio = statistics.median(new) / statistics.median(old)
        lines.append(
            f"| {bench} | {len(old)} + {len(new)} | {statistics.median(old):.2f} | "
            f"{statistics.median(new):.2f} | **{ratio:.3f}×** | {min(old):.2f} | {min(new):.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("revisions", nargs=2, help="the two git revisions (old, new)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed sweeps per sweep run")
    p.add_argument("--sweep-only", action="store_true")
    p.add_argument("--readme", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    report = measure([_short(rev) for rev in args.revisions], args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    text = table(report)
    print(text)
    if args.readme:
        start, end = "<!-- revisions:start -->", "<!-- revisions:end -->"
        replace_section(start, end, f"{start}\n{text}\n{end}", heading=_HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
