"""Fuzz the loader, validation and compiler with 10,000 mutated example specs under a time and
memory watchdog; the table goes into bench/README.md.

    python bench/fuzz_specs.py [--cases 10000] [--seed 0] [--no-readme]

Every case must end in a compiled plan or a located SpecError (anything else is "uncaught"),
within 5 s and within 300 MB of memory above the process's baseline. The mutations are those of
tests/test_fuzz.py (tests/spec_mutations.py): wrong types, keys, numbers, unicode, nesting,
anchors, tags and bytes.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench._common import cpu_name, replace_section  # noqa: E402
from specsight.models.load import load_model_info  # noqa: E402
from tests.spec_mutations import EXAMPLES, check_case, mutated  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fuzz_specs.json"
LIMIT_S, LIMIT_MB, HANG_S = 5.0, 300.0, 30


class _Hang(Exception):
    pass


def _on_alarm(_signum, _frame):
    raise _Hang


class _Peak:
    """The process's peak RSS while a case runs, sampled every 5 ms by a thread."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def reset(self) -> int:
        now = self.proc.memory_info().rss
        self.peak = now
        return now

    def close(self) -> None:
        self._stop.set()


def run(cases: int, seed: int) -> dict:
    infos = {name: load_model_info(name) for name in ("smollm2-135m", "tiny-vit")}
    signal.signal(signal.SIGALRM, _on_alarm)
    peak = _Peak()
    kinds: Counter[str] = Counter()
    slow, heavy, uncaught = [], [], []
    worst_s, worst_mb = 0.0, 0.0
    started = time.perf_counter()
    for i in range(cases):
        case_seed, example = seed + i, EXAMPLES[i % len(EXAMPLES)]
        text = mutated(case_seed, example)
        base = peak.reset()
        signal.alarm(HANG_S)
        try:
            outcome = check_case(text, infos)
        except _Hang:
            outcome = None
        finally:
            signal.alarm(0)
        grew_mb = max(0, peak.peak - base) / 2**20
        if outcome is None:
            kinds["hang"] += 1
            uncaught.append({"seed": case_seed, "example": example, "detail": "hang"})
            continue
        kinds[outcome.kind] += 1
        worst_s, worst_mb = max(worst_s, outcome.seconds), max(worst_mb, grew_mb)
        if outcome.kind == "failure":
            uncaught.append({"seed": case_seed, "example": example, "detail": outcome.detail})
        if outcome.seconds > LIMIT_S:
            slow.append({"seed": case_seed, "example": example, "seconds": outcome.seconds})
        if grew_mb > LIMIT_MB:
            heavy.append({"seed": case_seed, "example": example, "mb": grew_mb})
    peak.close()
    return {
        "cases": cases,
        "seed": seed,
        "outcomes": dict(kinds),
        "uncaught": uncaught,
        "over_limit_s": slow,
        "over_300mb": heavy,
        "max_case_s": round(worst_s, 4),
        "max_case_mb": round(worst_mb, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "cpu": cpu_name(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _table(report: dict) -> str:
    out = report["outcomes"]
    rows = [
        ("cases", report["cases"]),
        ("compiled", out.get("ok", 0)),
        ("located SpecError", out.get("spec-error", 0)),
        ("uncaught (anything else, or a hang)", len(report["uncaught"])),
        ("over 5 s", len(report["over_limit_s"])),
        ("over 300 MB", len(report["over_300mb"])),
        ("slowest case", f"{report['max_case_s']:.3f} s"),
        ("most memory one case added", f"{report['max_case_mb']:.1f} MB"),
        ("total", f"{report['total_s']} s"),
    ]
    lines = [
        "<!-- fuzz:start -->",
        "### `fuzz_specs.py`",
        "",
        f"{report['cases']:,} mutated example specs (seed {report['seed']}), each loaded, "
        "validated and compiled against its model's shapes; "
        f"{report['cpu']}, {report['date']}. Results: "
        "[`results/fuzz_specs.json`](results/fuzz_specs.json).",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in rows],
        "<!-- fuzz:end -->",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readme", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    report = run(args.cases, args.seed)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    table = _table(report)
    print(table)
    if args.readme:
        replace_section("<!-- fuzz:start -->", "<!-- fuzz:end -->", table, heading="## Fuzzing\n\n")
    failed = report["uncaught"] or report["over_limit_s"] or report["over_300mb"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
