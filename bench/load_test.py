"""Load test of ``specsight serve``: many concurrent clients on loopback for a fixed time.

The script starts ``specsight serve --model tiny-llama`` in a subprocess on a free 127.0.0.1
port, then runs ``--clients`` threads for ``--duration`` seconds. Each client is the real
:class:`~specsight.remote.client.RemoteClient` (its retries, its 429 back-off and its polling,
which starts at ``--poll`` seconds and grows to 1 s) and loops: submit a small spec (a 3-value
scale sweep with a ``prob`` and a ``top_k`` metric; the factors differ per client and iteration),
wait for the job, download the result and verify its sha256. A client stops submitting once the
duration is over and finishes the job it has in flight (bounded by ``--job-timeout``).

Then every job that was answered 202 is polled (bounded) until it is terminal: a job that is
not, or that the server no longer knows, is *lost*. Every HTTP answer is counted by status code
(an httpx event hook); 5xx answers and lost jobs must both be 0, or the script exits with 1.

Reported: throughput (succeeded jobs per second of the run), end-to-end latency of a job (submit
sent -> result downloaded and verified; p50, p90, p99, max), jobs by final state, the server's
batches (from its log: how many jobs each shared forward pass ran) and the load average. Results
go to ``bench/results/load_test.json`` and a table into ``bench/README.md`` (between the
``load`` markers; ``--quick`` writes ``load_test_quick.json`` and leaves the README alone).

    python bench/load_test.py                    # 32 clients, 60 s
    python bench/load_test.py --quick            # 8 clients, 10 s: a smoke check
    python bench/load_test.py --clients 64 --duration 120 --torch-threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from _common import cpu_name, replace_section  # bench/ is on sys.path when a script runs

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
MARK_START, MARK_END = "<!-- load:start -->", "<!-- load:end -->"

KEY = "load-test-key"
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
TERMINAL = ("succeeded", "failed", "cancelled")


def small_spec(client: int, iteration: int) -> dict[str, Any]:
    """A small job: 3 scale factors on one MLP output, a prob and a top_k metric."""
    base = round(0.1 * (client % 10) + 0.01 * (iteration % 10), 3)
    factors = [base, round(base + 0.5, 3), round(base + 1.0, 3)]
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {
            "base": {"prompt": CORRUPT},
            "a": {
                "prompt": CLEAN,
                "sweep": {"f": factors},
                "ops": [{"op": "scale", "site": "mlp_out.1", "factor": "{f}"}],
            },
        },
        "metrics": {
            "p": {"kind": "prob", "invoke": "a", "token": " Mary"},
            "top": {"kind": "top_k", "invoke": "a", "k": 3},
        },
    }


# --- the server --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``specsight serve`` in a subprocess on a free loopback port; always stopped by
    :meth:`stop` (SIGTERM, then SIGKILL after ``timeout``)."""

    def __init__(
        self,
        folder: Path,
        model: str,
        batch_jobs: int,
        torch_threads: int | None,
        keys: dict[str, str] | None = None,
        db: str | None = None,
        extra: list[str] | None = None,
    ):
        from specsight.remote.auth import hash_key

        keys = keys or {"load": KEY}
        (folder / "keys").write_text("".join(f"{n}:{hash_key(k)}\n" for n, k in keys.items()))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "server.log"
        command = [sys.executable, "-c", "from specsight.cli import main; main()", "serve"]
        command += ["--model", model, "--device", "cpu", "--port", str(self.port)]
        command += ["--db", db or str(folder / "jobs.sqlite"), "--keys", str(folder / "keys")]
        command += ["--batch-jobs", str(batch_jobs), "--grace", "10", *(extra or [])]
        env = dict(os.environ)
        if torch_threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(torch_threads)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env
            )

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds until /readyz answered 200; raises after ``timeout``."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - began
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready in {timeout} s:\n{self.tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def batches(self) -> list[int]:
        """Jobs per batch the workers ran (their 'ran N job(s)' log lines; a cluster's
        replicas log through Ray to the ingress's output)."""
        text = self.log.read_text(errors="replace")
        return [int(n) for n in re.findall(r"ran (\d+) job\(s\) in", text)]


# --- the clients ------------------------------------------------------------------------------


@dataclass
class ClientStats:
    """What one client thread saw."""

    latencies: list[float] = field(default_factory=list)  # succeeded jobs, seconds
    job_ids: list[str] = field(default_factory=list)  # every job answered 202/200
    final: Counter[str] = field(default_factory=Counter)  # final states seen by the client
    codes: Counter[int] = field(default_factory=Counter)  # every HTTP answer
    errors: list[str] = field(default_factory=list)


def client_loop(index: int, url: str, end: float, poll: float, job_timeout: float) -> ClientStats:
    """Submit, wait, download, verify; again until ``end`` (monotonic)."""
    from specsight.errors import RunError
    from specsight.remote.client import RemoteClient

    stats = ClientStats()

    def count(response: httpx.Response) -> None:
        stats.codes[response.status_code] += 1

    http = httpx.Client(timeout=30.0, event_hooks={"response": [count]})
    remote = RemoteClient(url, KEY, client=http)
    iteration = 0
    try:
        while time.monotonic() < end and iteration < 100_000:
            began = time.perf_counter()
            try:
                job = remote.submit(small_spec(index, iteration), spec_file="load.yaml")
                stats.job_ids.append(job.id)
                status = remote.wait(job.id, poll=poll, timeout=job_timeout)
                stats.final[status.state] += 1
                if status.state == "succeeded":
                    data, _ = remote.download(job.id, status)  # verifies the sha256 twice
                    assert hashlib.sha256(data).hexdigest() == status.result_sha256
                    stats.latencies.append(time.perf_counter() - began)
                else:
                    stats.errors.append(f"{job.id}: {status.state}: {status.error}")
            except (RunError, httpx.HTTPError) as exc:
                stats.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                time.sleep(0.2)
            iteration += 1
    finally:
        http.close()
    return stats


def drain(url: str, job_ids: list[str], timeout: float) -> dict[str, str]:
    """The final state of every job, polled until all are terminal or ``timeout`` passes;
    'missing' for a job the server does not know, the last state seen for a stuck one."""
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=30.0) as http:
        while True:
            for job_id in job_ids:
                if states.get(job_id) in TERMINAL:
                    continue
                r = http.get(f"/v1/jobs/{job_id}")
                states[job_id] = r.json()["state"] if r.status_code == 200 else "missing"
            if all(s in TERMINAL for s in states.values()) or time.monotonic() > deadline:
                return states
            time.sleep(0.5)


# --- the run ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1), linear between order statistics; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def run(
    args: argparse.Namespace, *, db: str | None = None, extra: list[str] | None = None
) -> dict[str, Any]:
    """One load test; ``db`` and ``extra`` (more ``specsight serve`` arguments, e.g. ``--ray``)
    choose the server."""
    import torch

    import specsight

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="specsight-load-") as tmp:
        server = Server(
            Path(tmp), args.model, args.batch_jobs, args.torch_threads, db=db, extra=extra
        )
        try:
            ready_s = server.wait_ready(timeout=args.ready_timeout)
            print(
                f"server ready on {server.url} in {ready_s:.1f} s; {args.clients} clients, "
                f"{args.duration:g} s"
            )
            results: list[ClientStats | None] = [None] * args.clients
            began = time.monotonic()
            end = began + args.duration

            def target(i: int) -> None:
                results[i] = client_loop(i, server.url, end, args.poll, args.job_timeout)

            threads = [
                threading.Thread(target=target, args=(i,), daemon=True) for i in range(args.clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=max(0.0, end - time.monotonic()) + args.job_timeout + 60)
            wall = time.monotonic() - began
            hung = sum(t.is_alive() for t in threads)
            stats = [s for s in results if s is not None]
            job_ids = [j for s in stats for j in s.job_ids]
            states = drain(server.url, job_ids, args.drain_timeout)
            batches = server.batches()
        finally:
            returncode = server.stop()
            log_tail = server.tail()
    load_after = os.getloadavg()

    latencies = [x for s in stats for x in s.latencies]
    codes: Counter[int] = sum((s.codes for s in stats), Counter())
    errors = [e for s in stats for e in s.errors]
    by_state = Counter(states.values())
    lost = sum(n for state, n in by_state.items() if state not in TERMINAL)
    server_errors = sum(n for code, n in codes.items() if code >= 500)
    succeeded = len(latencies)

    def ms(q: float) -> float | None:
        value = percentile(latencies, q)
        return None if value is None else round(value * 1000, 1)

    return {
        "benchmark": "load_test",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "specsight": specsight.__version__,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
        },
        "config": {
            "model": args.model,
            "clients": args.clients,
            "duration_s": args.duration,
            "poll_s": args.poll,
            "batch_jobs": args.batch_jobs,
            "torch_threads": args.torch_threads or "default",
            "job": "a 3-value scale sweep, prob and top_k metrics, a baseline invoke: 4 rows",
        },
        "server_ready_s": round(ready_s, 2),
        "wall_s": round(wall, 2),
        "jobs_submitted": len(job_ids),
        "jobs_succeeded_downloaded": succeeded,
        "throughput_jobs_per_s": round(succeeded / wall, 2) if wall else None,
        "latency_ms": {
            "p50": ms(0.50),
            "p90": ms(0.90),
            "p99": ms(0.99),
            "max": ms(1.0),
            "mean": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
        },
        "final_states": dict(sorted(by_state.items())),
        "http_codes": {str(k): v for k, v in sorted(codes.items())},
        "http_requests": sum(codes.values()),
        "server_errors_5xx": server_errors,
        "lost_jobs": lost,
        "client_errors": len(errors),
        "client_error_samples": errors[:5],
        "hung_clients": hung,
        "server_batches": {
            "count": len(batches),
            "jobs_per_batch_mean": round(statistics.fmean(batches), 2) if batches else None,
            "jobs_per_batch_max": max(batches, default=None),
        },
        "server_exit_code": returncode,
        "server_log_tail": log_tail[-1500:] if server_errors or lost or hung else None,
    }


def passed(result: dict[str, Any]) -> bool:
    """0 server errors, 0 lost jobs, no hung client, every job succeeded."""
    states = result["final_states"]
    return (
        result["server_errors_5xx"] == 0
        and result["lost_jobs"] == 0
        and result["hung_clients"] == 0
        and states.get("succeeded", 0) == result["jobs_submitted"] > 0
    )


def markdown(result: dict[str, Any]) -> str:
    """The README section (everything between the load markers)."""
    m, c, lat = result["machine"], result["config"], result["latency_ms"]
    batches = result["server_batches"]
    states = ", ".join(f"{k} {v}" for k, v in result["final_states"].items())
    codes = ", ".join(f"{k}: {v}" for k, v in result["http_codes"].items())
    rows = [
        (
            "clients × duration",
            f"{c['clients']} × {c['duration_s']:g} s (wall {result['wall_s']} s)",
        ),
        ("throughput", f"**{result['throughput_jobs_per_s']} jobs/s**"),
        (
            "latency p50 / p90 / p99 / max",
            f"**{lat['p50']} / {lat['p90']} / {lat['p99']}** / {lat['max']} ms",
        ),
        ("jobs submitted", str(result["jobs_submitted"])),
        ("final states", states),
        ("5xx answers", f"**{result['server_errors_5xx']}**"),
        ("lost jobs", f"**{result['lost_jobs']}**"),
        ("HTTP answers", f"{result['http_requests']} ({codes})"),
        (
            "server batches",
            f"{batches['count']}, mean {batches['jobs_per_batch_mean']} jobs, max {batches['jobs_per_batch_max']}",
        ),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    load = m["load_average_before"][0], m["load_average_after"][0]
    return f"""{MARK_START}
## `load_test.py`: many concurrent clients against `specsight serve`

```sh
python bench/load_test.py              # 32 clients, 60 s (≈ 1.5 min with start-up and drain)
python bench/load_test.py --quick      # 8 clients, 10 s: a smoke check
python bench/load_test.py --clients 64 --duration 120 --torch-threads 1 --poll 0.1
```

`specsight serve --model {c["model"]}` runs in a subprocess on a free 127.0.0.1 port. Each client
thread is the real `RemoteClient` and loops until the duration is over: submit a small job
({c["job"]}), poll it (from {c["poll_s"]} s, growing to 1 s, as `specsight run --remote`
does), download the result and verify its sha256. Latency is end to end, submit sent -> result
verified, so it includes the polling delay. After the run every job answered 202 is polled until
terminal; one that is not (or is unknown) is *lost*. The script exits with 1 on any 5xx or lost
job.
Results: [`results/load_test.json`](results/load_test.json).

{m["cpu"]}, {m["cores"]} cores (the clients run on the same cores as the server), torch
{m["torch"]}, torch threads in the server: {c["torch_threads"]}, `--batch-jobs {c["batch_jobs"]}`;
load average {load[0]} before, {load[1]} after; {result["date"]}.

| | |
|---|---|
{table}
{MARK_END}"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=None, help="seconds (default 60)")
    p.add_argument("--clients", type=int, default=None, help="client threads (default 32)")
    p.add_argument("--quick", action="store_true", help="10 s, 8 clients, no README update")
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--poll", type=float, default=0.2, help="first poll delay (grows to 1 s)")
    p.add_argument("--batch-jobs", type=int, default=16, help="passed to specsight serve")
    p.add_argument("--torch-threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    p.add_argument("--job-timeout", type=float, default=120.0, help="one job's wait, at most")
    p.add_argument("--drain-timeout", type=float, default=60.0)
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--readme", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--from-json", type=Path, default=None, help="no run: write this result's README table"
    )
    args = p.parse_args(argv)
    if args.from_json is not None:
        replace_section(MARK_START, MARK_END, markdown(json.loads(args.from_json.read_text())))
        print(f"updated {README.relative_to(ROOT)} from {args.from_json}")
        return 0
    args.duration = args.duration or (10.0 if args.quick else 60.0)
    args.clients = args.clients or (8 if args.quick else 32)
    if not (0 < args.duration <= 3600 and 0 < args.clients <= 512):
        p.error("--duration must be in (0, 3600] and --clients in [1, 512]")

    result = run(args)
    ok = passed(result)
    result["passed"] = ok
    out = args.json_out or RESULTS_DIR / (
        "load_test_quick.json" if args.quick else "load_test.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lat = result["latency_ms"]
    print(
        f"{result['jobs_succeeded_downloaded']} jobs in {result['wall_s']} s: "
        f"{result['throughput_jobs_per_s']} jobs/s; latency p50 {lat['p50']} ms, "
        f"p99 {lat['p99']} ms; states {result['final_states']}; "
        f"5xx {result['server_errors_5xx']}; lost {result['lost_jobs']}; "
        f"batches {result['server_batches']}"
    )
    print(f"wrote {out}")
    if args.readme or (args.readme is None and not args.quick):
        replace_section(MARK_START, MARK_END, markdown(result))
        print(f"updated {README.relative_to(ROOT)} ({MARK_START})")
    if not ok:
        print("FAILED: 5xx answers, lost or unfinished jobs (see the JSON)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
