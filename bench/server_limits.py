"""What hostile or greedy requests cost a real ``specsight serve`` process: memory and answer
time of requests that ask for too much, validation time of pathological specs, one key's share
of the queue, and how fast a cancel reaches a running generation.

    python bench/server_limits.py [--model smollm2-135m] [--no-readme]

The server runs in a subprocess on loopback; its resident memory is read from /proc (VmRSS now,
VmHWM the peak so far). Results go to bench/results/server_limits.json and a table into
bench/README.md (between the ``limits`` markers).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from _common import cpu_name, replace_section  # bench/ is on sys.path when a script runs
from load_test import Server

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "server_limits.json"
KEYS = {"alice": "alice-key", "bob": "bob-key"}
CLEAN = "When Mary and John went to the store, John gave a drink to"


def _memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def _post(url: str, spec: dict[str, Any], key: str = "alice") -> tuple[httpx.Response, float, int]:
    body = json.dumps({"spec": spec, "client_version": "bench"})
    started = time.perf_counter()
    response = httpx.post(
        f"{url}/v1/jobs",
        content=body,
        headers={"X-API-Key": KEYS[key], "content-type": "application/json"},
        timeout=600,
    )
    return response, time.perf_counter() - started, len(body)


def _huge_generation(model: str, new_tokens: int) -> dict[str, Any]:
    filler = "when the quick brown fox jumps over the lazy dog, " * 2  # ~226 KB for 2,000
    prompts = [f"Prompt {i}: {filler}it says" for i in range(2000)]
    ops = [{"op": "save", "site": "resid_post.*", "positions": "all", "steps": "all"}]
    return {
        "specsight": 1,
        "model": model,
        "invokes": {
            "a": {"prompt": prompts, "ops": ops, "generate": {"max_new_tokens": new_tokens}}
        },
    }


def _small(model: str, factor: float) -> dict[str, Any]:
    ops = [{"op": "scale", "site": "mlp_out.1", "factor": factor}]
    return {
        "specsight": 1,
        "model": model,
        "invokes": {"a": {"prompt": CLEAN, "ops": ops}},
        "metrics": {"p": {"kind": "prob", "invoke": "a", "token": " Mary"}},
    }


def measure(model: str) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "requests": []}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), model, batch_jobs=16, torch_threads=None, keys=KEYS)
        try:
            server.wait_ready()
            pid = server.proc.pid
            out["idle_mb"] = _memory_mb(pid)
            cases = [
                (
                    "2,000 prompts x 4,096 new tokens, every layer saved",
                    _huge_generation(model, 4096),
                ),
                ("the same with 200 new tokens", _huge_generation(model, 200)),
            ]
            sweep = _small(model, 1.0)
            sweep["invokes"]["a"]["sweep"] = {"layer": [f"x{i}" for i in range(3000)]}
            sweep["invokes"]["a"]["ops"] = [{"op": "zero", "site": "mlp_out.{layer}"}]
            cases.append(("a sweep list of 3,000 strings", sweep))
            keys = _small(model, 1.0)
            keys["invokes"]["a"].update({f"unknown_{i}": i for i in range(12_000)})
            cases.append(("12,000 unknown keys", keys))
            for name, spec in cases:
                response, seconds, size = _post(server.url, spec)
                memory = _memory_mb(pid)
                out["requests"].append(
                    {
                        "request": name,
                        "bytes": size,
                        "status": response.status_code,
                        "answer_s": round(seconds, 3),
                        "answer_bytes": len(response.content),
                        "rss_after_mb": round(memory["VmRSS"], 1),
                        "peak_rss_mb": round(memory["VmHWM"], 1),
                        "error": response.json().get("message", "")[:120],
                    }
                )
                print(out["requests"][-1], flush=True)
            out["fairness"] = _fairness(server.url, model)
            out["cancel"] = _cancel(server.url, model)
            out["final_mb"] = _memory_mb(pid)
        finally:
            server.stop()
    return out


def _fairness(url: str, model: str) -> dict[str, Any]:
    """One key submits until refused; then another key submits."""
    accepted = 0
    while True:
        response, _, _ = _post(url, _small(model, 1.0 + accepted / 1000))
        if response.status_code != 202:
            break
        accepted += 1
    other, _, _ = _post(url, _small(model, 0.5), key="bob")
    return {
        "alice_accepted": accepted,
        "alice_refused_status": response.status_code,
        "alice_refusal": response.json().get("message"),
        "bob_status": other.status_code,
    }


def _cancel(url: str, model: str) -> dict[str, Any]:
    """A long generation, cancelled once running: seconds from DELETE to cancelled."""
    headers = {"X-API-Key": KEYS["bob"]}
    spec = {
        "specsight": 1,
        "model": model,
        "invokes": {
            "g": {"prompt": [CLEAN] * 64, "generate": {"max_new_tokens": 256}},
        },
    }
    response, _, _ = _post(url, spec, key="bob")
    job = response.json()["id"]
    while httpx.get(f"{url}/v1/jobs/{job}", headers=headers).json()["state"] != "running":
        time.sleep(0.02)
    time.sleep(1.0)  # well into the generation
    asked = time.perf_counter()
    httpx.delete(f"{url}/v1/jobs/{job}", headers=headers)
    while True:
        state = httpx.get(f"{url}/v1/jobs/{job}", headers=headers).json()["state"]
        if state in ("cancelled", "succeeded", "failed"):
            break
        time.sleep(0.01)
    return {"state": state, "cancel_to_done_s": round(time.perf_counter() - asked, 3)}


def table(res: dict[str, Any]) -> str:
    lines = [
        "<!-- limits:start -->",
        "### `server_limits.py`",
        "",
        f"`specsight serve --model {res['model']}` on loopback, default limits; resident memory "
        f"from /proc (idle {res['idle_mb']['VmRSS']:.0f} MB). {res['cpu']}, {res['date']}. "
        "Results: [`results/server_limits.json`](results/server_limits.json).",
        "",
        "| request | body | answer | time | RSS after | peak RSS |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["requests"]:
        lines.append(
            f"| {r['request']} | {r['bytes'] / 1000:.0f} KB | {r['status']} "
            f"({r['answer_bytes'] / 1000:.1f} KB) | {r['answer_s']:.2f} s | "
            f"{r['rss_after_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB |"
        )
    fair, cancel = res["fairness"], res["cancel"]
    lines += [
        "",
        f"One key submitting small jobs as fast as it can: {fair['alice_accepted']} accepted, "
        f"then {fair['alice_refused_status']} ({fair['alice_refusal']}); another key's job "
        f"then: {fair['bob_status']}. A generation of 64 prompts x 256 tokens cancelled one "
        f"second into its run: {cancel['state']} {cancel['cancel_to_done_s']:.2f} s after the "
        "DELETE.",
        "<!-- limits:end -->",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--readme", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    res = measure(args.model)
    res["cpu"] = cpu_name()
    res["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    text = table(res)
    print(text)
    if args.readme:
        replace_section(
            "<!-- limits:start -->", "<!-- limits:end -->", text, heading="## Server limits\n\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
