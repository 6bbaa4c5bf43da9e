"""Cross-job batching in ``specsight serve``: 16 small jobs in shared forwards vs one by one.

Sixteen different small jobs (each an IOI-style prompt with its own names and place, a 3-value
scale sweep of one MLP output at its own layer, and a baseline invoke: 4 rows; ``logit_diff``
and ``prob`` metrics) go through the real server app (:func:`specsight.remote.server.create_app`
with FastAPI's ``TestClient``, in-process: no network, less noise) in two configurations:

* **batched**: ``batch_jobs=16``, the worker runs every queued job of the model together, its
  rows packed into shared forwards;
* **one by one**: ``batch_jobs=1``, the same jobs, one job per run.

and in two arrival patterns:

* ``queued``: all 16 jobs are submitted before the worker runs (a backlog);
* ``live``: the worker thread runs while 16 client threads submit at once, each then polling
  its job and downloading the result (what concurrent users see; the first job may start
  alone before the others arrive).

The time measured is the wall time from the first submit to the last result downloaded (sha256
verified). Each (model, pattern, configuration) runs ``--repeats`` times, interleaved, after one
untimed warm-up; the median is reported, with the number of model forwards. By default both
``smollm2-135m`` and ``tiny-llama`` run, with one torch thread (stable timings on cores shared
with other processes) and with torch's default thread count (``--threads 1,0``). Every job's tensors must agree between the two configurations and with a
local ``specsight.run`` within ``--atol`` (1e-5), or the script exits with 1. Results go to
``bench/results/cross_job_batching.json`` and a table into ``bench/README.md`` (between the
``batching`` markers).

    python bench/cross_job_batching.py                                   # both models
    python bench/cross_job_batching.py --models tiny-llama --repeats 1   # a quick self-test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from _common import cpu_name, replace_section  # bench/ is on sys.path when a script runs
from safetensors.torch import load as load_safetensors

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from specsight.models.load import LoadedModel

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
MARK_START, MARK_END = "<!-- batching:start -->", "<!-- batching:end -->"

KEY = "batching-key"
HEADERS = {"X-API-Key": KEY}
NAMES = [(" Mary", " John"), (" Alice", " Bob"), (" Anna", " Tom"), (" Sarah", " David")]
PLACES = ["the store", "the park", "the old library", "school"]
CONFIGS = {"batched": 16, "one_by_one": 1}
PATTERNS = ("queued", "live")
JOB_TIMEOUT_S = 600.0


def job_spec(i: int, model: str, n_layers: int) -> dict[str, Any]:
    """Job ``i`` of 16: its own names, place and layer; 4 rows (a baseline + 3 factors)."""
    a, b = NAMES[i % len(NAMES)]
    place = PLACES[(i // len(NAMES)) % len(PLACES)]
    prompt = f"When{a} and{b} went to {place},{b} gave a drink to"
    layer = (i * 2) % n_layers
    return {
        "specsight": 1,
        "name": f"batching-{i}",
        "model": model,
        "invokes": {
            "base": {"prompt": prompt},
            "scaled": {
                "prompt": prompt,
                "sweep": {"f": [0.0, 0.5, 2.0]},
                "ops": [{"op": "scale", "site": f"mlp_out.{layer}", "factor": "{f}"}],
            },
        },
        "metrics": {
            "ld": {"kind": "logit_diff", "invoke": "scaled", "target": a, "foil": b},
            "p_base": {"kind": "prob", "invoke": "base", "token": a},
        },
    }


def _result(client: TestClient, job_id: str) -> dict[str, torch.Tensor]:
    r = client.get(f"/v1/jobs/{job_id}/result", headers=HEADERS)
    if r.status_code != 200:
        raise RuntimeError(f"job {job_id}: result {r.status_code}: {r.text[:300]}")
    digest = hashlib.sha256(r.content).hexdigest()
    if digest != r.headers["X-Specsight-Sha256"]:
        raise RuntimeError(f"job {job_id}: the result's sha256 does not match its header")
    return load_safetensors(r.content)


def _submit(client: TestClient, spec: dict[str, Any]) -> str:
    r = client.post("/v1/jobs", json={"spec": spec, "client_version": "bench"}, headers=HEADERS)
    if r.status_code != 202:
        raise RuntimeError(f"submit: {r.status_code}: {r.text[:500]}")
    return r.json()["id"]


def _wait(client: TestClient, job_id: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        state = client.get(f"/v1/jobs/{job_id}", headers=HEADERS).json()["state"]
        if state == "succeeded":
            return
        if state in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} {state}")
        time.sleep(poll)
    raise RuntimeError(f"job {job_id} did not finish in {JOB_TIMEOUT_S} s")


def run_once(
    model: LoadedModel, specs: list[dict[str, Any]], batch_jobs: int, pattern: str, folder: Path
) -> tuple[float, list[dict[str, torch.Tensor]], list[int]]:
    """One measurement: (seconds from the first submit to the last result, every job's
    tensors in submit order, the jobs per batch the worker ran)."""
    from fastapi.testclient import TestClient

    from specsight.remote.auth import KeyRing
    from specsight.remote.jobs import JobStore
    from specsight.remote.server import create_app

    batches: list[int] = []
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".sqlite", delete=False) as f:
        db = Path(f.name)
    db.unlink()
    store = JobStore(db)
    try:
        live = pattern == "live"
        app = create_app(
            {model.model_id: model},
            store=store,
            keys=KeyRing.from_raw_keys({"bench": KEY}),
            batch_jobs=batch_jobs,
            start_worker=live,
            idle_s=0.005,
        )
        worker = app.state.server.worker
        original = worker._execute

        def counted(group: list[Any], m: LoadedModel) -> Any:
            batches.append(len(group))
            return original(group, m)

        worker._execute = counted  # count the jobs per run
        with TestClient(app) as client:
            if live:
                ids: list[str | None] = [None] * len(specs)
                tensors: list[dict[str, torch.Tensor] | None] = [None] * len(specs)
                errors: list[BaseException] = []
                gate = threading.Barrier(len(specs) + 1, timeout=60)

                def one(i: int) -> None:
                    try:
                        gate.wait()
                        ids[i] = _submit(client, specs[i])
                        _wait(client, ids[i])
                        tensors[i] = _result(client, ids[i])
                    except BaseException as exc:  # reported below
                        errors.append(exc)

                threads = [threading.Thread(target=one, args=(i,)) for i in range(len(specs))]
                for t in threads:
                    t.start()
                gate.wait()
                began = time.perf_counter()
                for t in threads:
                    t.join(JOB_TIMEOUT_S)
                elapsed = time.perf_counter() - began
                if errors or any(t.is_alive() for t in threads):
                    raise RuntimeError(f"live run failed: {errors[:3]}")
                out = [t for t in tensors if t is not None]
            else:
                began = time.perf_counter()
                job_ids = [_submit(client, spec) for spec in specs]
                for _ in range(len(specs) + 1):  # bounded: one job per run at the least
                    if not worker.run_once():
                        break
                out = [_result(client, job_id) for job_id in job_ids]
                elapsed = time.perf_counter() - began
    finally:
        store.close()
    if len(out) != len(specs):
        raise RuntimeError("a job has no result")
    return elapsed, out, batches


def max_diff(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> float:
    """The largest absolute difference between matching tensors of matching jobs."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if set(x) != set(y):
            raise RuntimeError(f"different tensors: {sorted(x)} vs {sorted(y)}")
        for name, tensor in x.items():
            if tensor.dtype.is_floating_point:
                diff = (tensor.double() - y[name].double()).abs().max().item()
            else:
                diff = 0.0 if torch.equal(tensor, y[name]) else float("inf")
            worst = max(worst, diff)
    return worst


def measure_model(
    model: LoadedModel, args: argparse.Namespace, folder: Path
) -> tuple[dict[str, Any], dict[str, float]]:
    """Every (pattern, configuration) ``repeats`` times on one model, with the current torch
    thread count: (its record, its largest differences)."""
    import specsight

    threads = torch.get_num_threads()
    tag = f"{model.model_id} ({threads} thread{'s' if threads > 1 else ''})"
    specs = [job_spec(i, model.model_id, model.info.n_layers) for i in range(args.jobs)]
    local = [specsight.run(spec, model=model).tensors for spec in specs]  # also a warm-up
    rows = [
        len(specsight.compile_plan(specsight.load_spec(s), model.info, model.tokenizer).rows)
        for s in specs
    ]
    forwards = [0]
    hook = model.model.register_forward_pre_hook(
        lambda *_: forwards.__setitem__(0, forwards[0] + 1)
    )
    summary: dict[str, Any] = {}
    diffs: dict[str, float] = {}
    try:
        for pattern in PATTERNS:
            times: dict[str, list[float]] = {c: [] for c in CONFIGS}
            runs: dict[str, list[int]] = {}
            n_forwards: dict[str, int] = {}
            first: dict[str, list[dict[str, torch.Tensor]]] = {}
            for rep in range(args.repeats + 1):  # rep 0 is an untimed warm-up
                configs = list(CONFIGS.items())
                for config, batch_jobs in configs if rep % 2 else configs[::-1]:
                    forwards[0] = 0
                    seconds, tensors, batches = run_once(model, specs, batch_jobs, pattern, folder)
                    first.setdefault(config, tensors)
                    label = "warm-up" if rep == 0 else f"rep {rep}"
                    print(
                        f"{tag:24} {pattern:6} {config:10} {label:7}: {seconds:7.3f} s;"
                        f" {forwards[0]} forwards; jobs per run {batches}",
                        flush=True,
                    )
                    if rep:
                        times[config].append(seconds)
                        runs[config], n_forwards[config] = batches, forwards[0]
            diffs[f"{tag} {pattern}: batched vs one_by_one"] = max_diff(
                first["batched"], first["one_by_one"]
            )
            for config in CONFIGS:
                diffs[f"{tag} {pattern}: {config} vs local run"] = max_diff(first[config], local)
            med = {c: statistics.median(times[c]) for c in CONFIGS}
            summary[pattern] = {
                "median_s": {c: round(v, 4) for c, v in med.items()},
                "min_s": {c: round(min(times[c]), 4) for c in CONFIGS},
                "all_s": {c: [round(x, 4) for x in times[c]] for c in CONFIGS},
                "speedup": round(med["one_by_one"] / med["batched"], 2),
                "jobs_per_run": runs,
                "forwards": n_forwards,
            }
    finally:
        hook.remove()
    record = {
        "model": model.model_id,
        "dtype": str(model.dtype),
        "device": str(model.device),
        "n_params": model.info.n_params,
        "torch_threads": threads,
        "jobs": len(specs),
        "rows_per_job": statistics.fmean(rows),
        "tokens_per_row": statistics.fmean(
            len(model.tokenizer.encode(s["invokes"]["base"]["prompt"])) for s in specs
        ),
        "results": summary,
        "specs": specs,
    }
    return record, diffs


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every torch thread count of ``--threads`` x every model of ``--models``; the record."""
    import specsight
    from specsight.models.load import load_model

    default_threads = torch.get_num_threads()
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    diffs: dict[str, float] = {}
    load_s: dict[str, float] = {}
    models: dict[str, LoadedModel] = {}
    with tempfile.TemporaryDirectory(prefix="specsight-batching-") as tmp:
        for threads in args.threads:
            torch.set_num_threads(threads or default_threads)
            for model_id in args.models:
                if model_id not in models:
                    began = time.perf_counter()
                    models[model_id] = load_model(model_id, device=args.device)
                    load_s[model_id] = round(time.perf_counter() - began, 2)
                record, found = measure_model(models[model_id], args, Path(tmp))
                runs.append(record)
                diffs.update(found)
    load_after = os.getloadavg()
    return {
        "benchmark": "cross_job_batching",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch_default_threads": default_threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "specsight": specsight.__version__,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
        },
        "config": {"repeats": args.repeats, "atol": args.atol, "device": args.device},
        "model_load_s": load_s,
        "runs": runs,
        "max_abs_diff": diffs,
        "agree": max(diffs.values()) <= args.atol,
    }


def markdown(result: dict[str, Any]) -> str:
    """The README section (everything between the batching markers)."""
    m, c = result["machine"], result["config"]
    lines = [
        "| model | torch threads | arrival | one by one (`--batch-jobs 1`) s | batched (`--batch-jobs 16`) s "
        "| **speed-up** | forwards, one by one → batched | jobs per run, batched (last repeat) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rec in result["runs"]:
        for pattern, r in rec["results"].items():
            med, fw = r["median_s"], r["forwards"]
            runs = r["jobs_per_run"].get("batched", [])
            lines.append(
                f"| `{rec['model']}` | {rec['torch_threads']} | `{pattern}` | {med['one_by_one']:.3f} | {med['batched']:.3f}"
                f" | **{r['speedup']:.2f}×** | {fw['one_by_one']} → {fw['batched']}"
                f" | {', '.join(map(str, runs))} |"
            )
    first = result["runs"][0]
    worst = max(result["max_abs_diff"].values())
    load = m["load_average_before"][0], m["load_average_after"][0]
    return f"""{MARK_START}
## `cross_job_batching.py`: jobs of several users in shared forwards

```sh
python bench/cross_job_batching.py      # smollm2-135m and tiny-llama, 1 and default threads
python bench/cross_job_batching.py --models tiny-llama --repeats 1      # a quick self-test
python bench/cross_job_batching.py --threads 1     # one torch thread only
```

{first["jobs"]} different small jobs: each its own IOI-style prompt (names and place, about
{first["tokens_per_row"]:.0f} tokens), a 3-value `scale` sweep of `mlp_out` at its own layer and
a baseline invoke ({first["rows_per_job"]:g} rows), `logit_diff` and `prob` metrics. They run
through the real server app in-process (`create_app` + FastAPI's `TestClient`: no network) with
`--batch-jobs 16` (the worker packs the rows of every queued job into shared forwards) and
`--batch-jobs 1` (one job per run). Time: first submit -> last result downloaded and
sha256-checked; median of {c["repeats"]} interleaved repeats after a warm-up. `queued`: all
jobs submitted before the worker runs; `live`: the worker runs while 16 threads submit at once,
poll (every 50 ms) and download. Results:
[`results/cross_job_batching.json`](results/cross_job_batching.json).

{m["cpu"]}, {m["cores"]} cores, torch {m["torch"]} (default {m["torch_default_threads"]} threads), {c["device"]};
load average {load[0]} before, {load[1]} after (other processes share the cores); {result["date"]}.

{chr(10).join(lines)}

Every job's tensors agree between batched and one by one, and with a local `specsight.run`:
largest absolute difference {worst:.2e} (limit {c["atol"]:g}).

On a CPU `smollm2-135m` is compute-bound: the 16 jobs cost the same arithmetic whether their
rows share forwards or not, so batching saves only the per-forward and per-run overhead (claim,
compile, store writes); `tiny-llama` is mostly overhead. With several torch threads every forward
also synchronises them, which on cores shared with other processes costs much more and varies
from run to run (see `all_s` in the JSON): batching pays it once instead of 16 times. In `live`
the first job often starts alone before the others arrive; the rest then run together. On a GPU
(not measured here) a forward of 4 rows leaves the device mostly idle, which batching fills.
{MARK_END}"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
        default=["smollm2-135m", "tiny-llama"],
        help="comma-separated model ids (default: smollm2-135m,tiny-llama)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=16, help="concurrent jobs (default 16)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--threads",
        type=lambda text: [int(t) for t in text.split(",") if t.strip()],
        default=[1, 0],
        help="comma-separated torch thread counts, 0 = torch's default (default: 1,0)",
    )
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument(
        "--readme",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the table into bench/README.md (default: for the default models on cpu)",
    )
    p.add_argument(
        "--from-json", type=Path, default=None, help="no run: write this result's README table"
    )
    args = p.parse_args(argv)
    if args.from_json is not None:
        replace_section(MARK_START, MARK_END, markdown(json.loads(args.from_json.read_text())))
        print(f"updated {README.relative_to(ROOT)} from {args.from_json}")
        return 0
    if not (1 <= args.jobs <= 64 and 1 <= args.repeats <= 50 and args.models and args.threads):
        p.error("--jobs in [1, 64], --repeats in [1, 50], --models and --threads not empty")

    result = measure(args)
    default = "smollm2-135m" in args.models and args.device == "cpu"
    name = "cross_job_batching.json" if default else "cross_job_batching_test.json"
    out = args.json_out or RESULTS_DIR / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for rec in result["runs"]:
        for pattern, r in rec["results"].items():
            med = r["median_s"]
            print(
                f"{rec['model']} ({rec['torch_threads']} threads) {pattern}: one by one {med['one_by_one']:.3f} s, batched "
                f"{med['batched']:.3f} s: speed-up {r['speedup']:.2f}x"
            )
    print(f"largest abs diff: {max(result['max_abs_diff'].values()):.3g} (limit {args.atol:g})")
    print(f"wrote {out}")
    if args.readme or (args.readme is None and default):
        replace_section(MARK_START, MARK_END, markdown(result))
        print(f"updated {README.relative_to(ROOT)} ({MARK_START})")
    if not result["agree"]:
        print(f"FAILED: results differ by more than {args.atol:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
