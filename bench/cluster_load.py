"""The load test of ``load_test.py`` against a Ray cluster of 1 and 2 replicas, and against
today's single process, on one machine, in one run.

Every configuration serves ``tiny-llama`` from a fresh database of one throwaway PostgreSQL
server (tests/postgres.py: the machine's initdb/pg_ctl in a temporary folder), so that only the
serving differs:

- ``single``: ``specsight serve --db postgresql://...``: one process, its worker thread;
- ``single-sqlite``: the same with the default SQLite store (what a single box runs today);
- ``ray-1``: ``specsight serve --ray --replicas 1 --num-cpus 1``: a local Ray instance, the
  ingress in the serve process, one replica process claiming jobs from the store;
- ``ray-2``: the same with 2 replicas.

Reported per configuration: throughput (succeeded jobs per second), latency p50 / p99 (submit
sent -> result verified), lost jobs and 5xx answers; then the ratios ray-2 / ray-1 (scaling; both
replicas share this machine's cores with the clients and the database) and ray-1 / single (the
overhead of the Ray path). Results go to ``bench/results/cluster_load.json`` and a table into
``bench/README.md`` (between the ``cluster`` markers).

    python bench/cluster_load.py                 # 16 clients, 30 s each (≈ 4 min)
    python bench/cluster_load.py --quick         # 8 clients, 8 s each: a smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import load_test  # bench/ is on sys.path when a script runs
from _common import cpu_name, replace_section

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))
RESULTS = BENCH_DIR / "results" / "cluster_load.json"
MARK_START, MARK_END = "<!-- cluster:start -->", "<!-- cluster:end -->"

CONFIGS: dict[str, list[str]] = {
    "single": [],
    "single-sqlite": [],
    "ray-1": ["--ray", "--replicas", "1", "--num-cpus", "1"],
    "ray-2": ["--ray", "--replicas", "2", "--num-cpus", "1"],
}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from tests.postgres import PostgresServer, find_binaries

    bin_dir = find_binaries()
    if bin_dir is None:
        raise SystemExit("PostgreSQL is not installed (initdb, pg_ctl, postgres)")
    server = PostgresServer(bin_dir).start()
    runs: dict[str, Any] = {}
    try:
        for name in args.configs:
            with server.database() as url:
                db = None if name == "single-sqlite" else url
                print(f"--- {name}", flush=True)
                runs[name] = load_test.run(args, db=db, extra=CONFIGS[name])
                result = runs[name]
                result["passed"] = load_test.passed(result)
                lat = result["latency_ms"]
                print(
                    f"{name}: {result['throughput_jobs_per_s']} jobs/s, p50 {lat['p50']} ms, "
                    f"p99 {lat['p99']} ms, lost {result['lost_jobs']}, "
                    f"5xx {result['server_errors_5xx']}",
                    flush=True,
                )
    finally:
        server.stop()

    def ratio(a: str, b: str, key: str) -> float | None:
        if a not in runs or b not in runs:
            return None
        x, y = (runs[n]["throughput_jobs_per_s"] if key == "tput" else runs[n]["latency_ms"][key]
                for n in (a, b))  # fmt: skip
        return round(x / y, 2) if x and y else None

    return {
        "benchmark": "cluster_load",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "config": {
            "clients": args.clients,
            "duration_s": args.duration,
            "torch_threads": args.torch_threads,
            "batch_jobs": args.batch_jobs,
        },  # fmt: skip
        "runs": runs,
        "ratios": {
            "ray2_over_ray1_throughput": ratio("ray-2", "ray-1", "tput"),
            "ray2_over_ray1_p50": ratio("ray-2", "ray-1", "p50"),
            "ray2_over_ray1_p99": ratio("ray-2", "ray-1", "p99"),
            "ray1_over_single_throughput": ratio("ray-1", "single", "tput"),
            "ray1_over_single_p50": ratio("ray-1", "single", "p50"),
            "ray1_over_single_p99": ratio("ray-1", "single", "p99"),
        },
    }


def markdown(result: dict[str, Any]) -> str:
    c, r = result["config"], result["ratios"]
    rows = []
    for name, run in result["runs"].items():
        lat, batches = run["latency_ms"], run["server_batches"]
        rows.append(
            f"| `{name}` | {run['throughput_jobs_per_s']} | {lat['p50']} | {lat['p99']} | "
            f"{run['jobs_submitted']} | {run['lost_jobs']} | {run['server_errors_5xx']} | "
            f"{batches['jobs_per_batch_mean']} | {run['server_ready_s']} |"
        )
    table = "\n".join(rows)
    return f"""{MARK_START}
## `cluster_load.py`: the load test against Ray Serve replicas (issue 16)

```sh
python bench/cluster_load.py            # 4 configurations × 30 s, 16 clients (≈ 4 min)
```

`load_test.py`'s clients (the real `RemoteClient`: submit, poll, download, verify the sha256)
against `specsight serve` on `tiny-llama`, one configuration after the other, each with a fresh
database of one throwaway PostgreSQL server: `single` is one process with its worker thread
(`--db postgresql://...`), `single-sqlite` the same on the default SQLite store, `ray-1` and
`ray-2` are `specsight serve --ray --replicas N --num-cpus 1` (a local Ray instance; the
ingress in the serve process, N replica processes claiming jobs from the store). Everything,
clients and database included, shares this machine's cores, so 2 replicas cannot double the
throughput here; on a cluster each replica has its own GPU.
Results: [`results/cluster_load.json`](results/cluster_load.json).

{result["cpu"]}, {c["clients"]} clients × {c["duration_s"]:g} s per configuration, torch
threads {c["torch_threads"] or "default"}, `--batch-jobs {c["batch_jobs"]}`; {result["date"]}.

| server | jobs/s | p50 ms | p99 ms | jobs | lost | 5xx | jobs per batch | ready s |
|---|---|---|---|---|---|---|---|---|
{table}

- 2 replicas against 1: throughput **{r["ray2_over_ray1_throughput"]}×**, p50 {r["ray2_over_ray1_p50"]}×, p99 {r["ray2_over_ray1_p99"]}×.
- The Ray path at 1 replica against the single process (same PostgreSQL store): throughput **{r["ray1_over_single_throughput"]}×**, p50 {r["ray1_over_single_p50"]}×, p99 {r["ray1_over_single_p99"]}×.
{MARK_END}"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=None, help="seconds each (default 30)")
    p.add_argument("--clients", type=int, default=None, help="client threads (default 16)")
    p.add_argument("--quick", action="store_true", help="8 s, 8 clients, no README update")
    p.add_argument("--configs", default=",".join(CONFIGS), help="which, comma-separated")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--batch-jobs", type=int, default=16)
    args = p.parse_args(argv)
    args.duration = args.duration or (8.0 if args.quick else 30.0)
    args.clients = args.clients or (8 if args.quick else 16)
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    args.model, args.poll, args.job_timeout = "tiny-llama", 0.2, 120.0
    args.drain_timeout, args.ready_timeout = 60.0, 240.0
    os.environ["RAY_DEDUP_LOGS"] = "0"  # every replica's batch lines reach the ingress's log
    result = run_all(args)
    out = RESULTS.with_name("cluster_load_quick.json") if args.quick else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"]))
    print(f"wrote {out}")
    if not args.quick:
        replace_section(MARK_START, MARK_END, markdown(result))
    return 0 if all(run["passed"] for run in result["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
