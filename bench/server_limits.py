"""What hostile or greedy requests cost a real ``specsight serve`` process: memory and answer
time of requests that ask for too much, validation time of pathological specs, one key's share
of the queue and of the intake, slow bodies, a flood of idle connections under ``ulimit -n
1024``, a long prompt's memory before its 413, and how fast a cancel reaches a running
generation.

    python bench/server_limits.py [--model smollm2-135m] [--no-readme]

The server runs in a subprocess on loopback; its resident memory is read from /proc (VmRSS now,
VmHWM the peak so far). Results go to bench/results/server_limits.json and a table into
bench/README.md (between the ``limits`` markers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
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
        try:  # the server's open-file limit, as under `ulimit -n 1024`
            resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (1024, 1024))
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
            out["hardening"] = [
                _intake_fairness(server.url, model),
                _slow_body(server),
                _idle_flood(server, model),
                _long_prompt(server.url, pid, model),
                _dataset_line(model),
            ]
            for row in out["hardening"]:
                print(row, flush=True)
            out["fairness"] = _fairness(server.url, model)
            out["cancel"] = _cancel(server.url, model)
            out["final_mb"] = _memory_mb(pid)
        finally:
            server.stop()
    return out


def _intake_fairness(url: str, model: str) -> dict[str, Any]:
    """Two 16k-invoke specs from one key at once, then a 1-invoke spec from another key."""
    invokes = {f"i{i}": {"prompt": f"Prompt {i} says"} for i in range(16_000)}
    big = {"specsight": 1, "model": model, "invokes": invokes}
    done: dict[str, tuple[httpx.Response, float]] = {}

    def post(name: str, spec: dict[str, Any], key: str) -> None:
        response, seconds, _ = _post(url, spec, key)
        done[name] = (response, seconds)

    threads = [threading.Thread(target=post, args=(f"a{i}", big, "alice")) for i in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # both bodies sent: the large specs are in the intake
    post("b", _small(model, 0.25), "bob")
    for thread in threads:
        thread.join()
    for name in ("a0", "a1"):  # spare the CPU two 16k-row runs
        if done[name][0].status_code == 202:
            job = done[name][0].json()["id"]
            httpx.delete(f"{url}/v1/jobs/{job}", headers={"X-API-Key": KEYS["alice"]})
    answer, seconds = done["b"]
    return {
        "check": "2 x 16k-invoke specs from one key while another key submits 1 invoke",
        "measured": f"the other key's {answer.status_code} in {seconds:.2f} s (the 16k-invoke "
        f"specs: {done['a0'][0].status_code} in {done['a0'][1]:.2f} s, "
        f"{done['a1'][0].status_code} in {done['a1'][1]:.2f} s)",
        "target": "202 within 2 s",
        "ok": answer.status_code == 202 and seconds < 2.0,
        "seconds": round(seconds, 3),
    }


def _slow_body(server: Server) -> dict[str, Any]:
    """A keyed POST /v1/jobs declaring 100,000 bytes, sending one byte every 8 s."""
    limits = httpx.get(f"{server.url}/v1/limits", headers={"X-API-Key": KEYS["alice"]}).json()
    deadline = limits["connections"]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS['alice']}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n".encode()
        )
        began, answer = time.monotonic(), b""
        sock.settimeout(8.0)
        while time.monotonic() - began < 120:
            try:
                sock.sendall(b"{")
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            answer += data
        closed = time.monotonic() - began
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"
    return {
        "check": "slow body: POST /v1/jobs with a key, Content-Length 100,000, one byte every 8 s",
        "measured": f"{status}, closed {closed:.1f} s after the headers",
        "target": f"closed within the deadline ({deadline['body_timeout_s']:g} s in all; at least "
        f"{deadline['body_min_bytes_per_s']} bytes/s over every {deadline['body_window_s']:g} s)",
        "ok": closed <= deadline["body_timeout_s"] + 1,
        "seconds": round(closed, 2),
    }


def _idle_flood(server: Server, model: str) -> dict[str, Any]:
    """1,000 connections that never send a byte (no key), then the health routes and another
    key's submit, with the server's open-file limit at 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    flood = []
    for _ in range(1000):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", server.port))
        flood.append(sock)
    try:
        started = time.perf_counter()
        health = httpx.get(f"{server.url}/healthz", timeout=30).status_code
        ready = httpx.get(f"{server.url}/readyz", timeout=30).status_code
        response, _, _ = _post(server.url, _small(model, 0.75), "bob")
        seconds = time.perf_counter() - started
    finally:
        for sock in flood:
            sock.close()
    return {
        "check": "1,000 idle connections without a key (server: ulimit -n 1024)",
        "measured": f"/healthz {health}, /readyz {ready}, another key's submit "
        f"{response.status_code}; the three in {seconds:.2f} s",
        "target": "/healthz 200 (no 503)",
        "ok": (health, ready, response.status_code) == (200, 200, 202),
        "seconds": round(seconds, 3),
    }


def _long_prompt(url: str, pid: int, model: str) -> dict[str, Any]:
    """One 1.9 MB prompt: the server's peak RSS growth until its 413."""
    spec = _small(model, 1.0)
    spec["invokes"]["a"]["prompt"] = "The quick brown fox jumps over the lazy dog. " * 42_000
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    before = _memory_mb(pid)
    response, seconds, size = _post(url, spec)
    after = _memory_mb(pid)
    growth = after["VmHWM"] - before["VmRSS"]
    return {
        "check": f"a {size / 1e6:.1f} MB prompt",
        "measured": f"{response.status_code} in {seconds:.2f} s; peak RSS +{growth:.1f} MB "
        f"({response.json().get('message', '')[:80]})",
        "target": "413, RSS growth < 50 MB",
        "ok": response.status_code == 413 and growth < 50,
        "rss_growth_mb": round(growth, 1),
    }


def _dataset_line(model: str) -> dict[str, Any]:
    """Locally: ``specsight validate`` of a spec whose JSONL dataset is one 200 MB line; the
    line must be refused before it is read whole (peak RSS of the process from wait4)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with open(folder / "rows.jsonl", "w", encoding="utf-8") as handle:
            handle.write('{"clean": "')
            chunk = "When Mary and John went to the store " * 1000
            for _ in range(200_000_000 // len(chunk)):
                handle.write(chunk)
            handle.write('"}\n')
        spec = {
            "specsight": 1,
            "model": model,
            "dataset": {"file": "rows.jsonl"},
            "invokes": {"a": {"prompt": "{clean}"}},
        }
        (folder / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        size = (folder / "rows.jsonl").stat().st_size
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "specsight", "validate", str(folder / "spec.json")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        error = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()[-1:]
    peak = usage.ru_maxrss / 1024  # KiB on Linux
    return {
        "check": f"locally: `specsight validate`, a dataset line of {size / 1e6:.0f} MB",
        "measured": f"exit {proc.returncode} in {seconds:.2f} s; peak RSS {peak:.0f} MB "
        f"({(error or [''])[0].partition('dataset.file: ')[2][:80]})",
        "target": "refused (exit 2), peak RSS < 300 MB",
        "ok": proc.returncode == 2 and peak < 300,
        "peak_rss_mb": round(peak, 1),
    }


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
        f"`specsight serve --model {res['model']}` on loopback, default limits, open-file "
        "limit 1,024 (as under `ulimit -n 1024`); resident memory "
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
        "",
        "Fairness and resource limits (issue 23):",
        "",
        "| check | measured | target | |",
        "| --- | --- | --- | --- |",
    ]
    for row in res["hardening"]:
        mark = "PASS" if row["ok"] else "FAIL"
        lines.append(f"| {row['check']} | {row['measured']} | {row['target']} | {mark} |")
    lines.append("<!-- limits:end -->")
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
