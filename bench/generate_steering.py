"""Benchmark: steered greedy generation three ways, and attribution vs exact patching on IOI.

Part 1, steering. On ``smollm2-135m`` (float32, CPU), 64 new greedy tokens from "I think you
are", with a steering vector added to the output of ``model.model.layers[6]`` (``resid_post.6``)
on every step: all prompt positions in the prompt pass, the new token at each decode step. The
vector is 3 x (mean layer-6 last-token residual of four " love" prompts - the same for " hate"),
computed once here and given to all three methods as the same float32 tensor:

* ``hooks``: ``model.generate(input_ids, max_new_tokens=64, do_sample=False)`` with a forward
  hook on ``layers[6]`` adding the vector (the reference);
* ``specsight``: ``specsight.run(spec, model=loaded)``, the vector inline in an ``add`` op with
  ``steps: all``;
* ``nnsight``: nnsight 0.8.1's ``model.generate`` with ``for step in tr.iter[:64]`` setting
  ``layers[6].output`` to itself plus the vector.

The methods run interleaved (one warm-up each, then ROUNDS rounds of each method once); median
and min are reported, and the three must produce the same 64 token ids.

Part 2, attribution patching. ``specs/ioi_attribution.yaml`` (gradient x (clean - corrupt) at
every resid_post layer x position) against the exact sweep ``specs/ioi_patching.yaml`` (one
patched forward per cell): wall time (median of 3 / 1 run) and the Spearman rank correlation of
the attribution grid with the exact ``logit_diff`` grid minus ``corrupt_logit_diff``.

Writes ``bench/results/generate_steering.json`` and the section between
``<!-- generate:start -->`` / ``<!-- generate:end -->`` of ``bench/README.md``.

    .venv/bin/python bench/generate_steering.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from _common import cpu_name, replace_section  # bench/ is on sys.path when a script runs

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results" / "generate_steering.json"
START, END = "<!-- generate:start -->", "<!-- generate:end -->"

MODEL = "smollm2-135m"
PROMPT = "I think you are"
LAYER = 6
NEW_TOKENS = 64
COEFF = 3.0
ROUNDS = 5
LOVE = ["I love you", "I love this", "Love is", "We love it"]
HATE = ["I hate you", "I hate this", "Hate is", "We hate it"]
TARGET_RATIO = 1.03
ATTR_SPEC = ROOT / "specs" / "ioi_attribution.yaml"
EXACT_SPEC = ROOT / "specs" / "ioi_patching.yaml"


def last_token_mean(model: Any, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """Mean over prompts of the layer-LAYER output at each prompt's last token."""
    rows = []
    caught: list[torch.Tensor] = []

    def hook(_mod: Any, _args: Any, out: Any) -> None:
        caught.append(out[0] if isinstance(out, tuple) else out)

    handle = model.model.layers[LAYER].register_forward_hook(hook)
    try:
        for prompt in prompts:
            with torch.inference_mode():
                model(torch.tensor([tokenizer.encode(prompt)]))
            rows.append(caught.pop()[0, -1].float().clone())
    finally:
        handle.remove()
    return torch.stack(rows).mean(0)


def run_hooks(model: Any, ids: torch.Tensor, vector: torch.Tensor, pad_id: int) -> list[int]:
    """Hand-written: a forward hook on layers[LAYER] adds the vector at every position."""

    def hook(_mod: Any, _args: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (out[0] + vector, *out[1:])
        return out + vector

    handle = model.model.layers[LAYER].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            seq = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=pad_id,
            )
    finally:
        handle.remove()
    return seq[0, ids.shape[1] :].tolist()


def steering_spec(vector: torch.Tensor) -> dict[str, Any]:
    """The specsight spec: the same vector inline, coeff 1, on every step."""
    return {
        "specsight": 1,
        "name": "bench-steered-generation",
        "model": {"id": MODEL, "dtype": "float32"},
        "invokes": {
            "steered": {
                "prompt": PROMPT,
                "generate": {"max_new_tokens": NEW_TOKENS},
                "ops": [
                    {
                        "op": "add",
                        "site": f"resid_post.{LAYER}",
                        "vector": [float(x) for x in vector.tolist()],
                        "coeff": 1,
                        "positions": "all",
                        "steps": "all",
                    }
                ],
            }
        },
    }


def run_specsight(spec: dict[str, Any], loaded: Any, n_prompt: int) -> list[int]:
    import specsight

    results = specsight.run(spec, model=loaded)
    ids = results["steered/generated_ids"]
    flat = ids.reshape(-1).tolist()
    # generated_ids is [prompt, new_token]; tolerate a stored prompt prefix just in case
    return flat[-NEW_TOKENS:] if len(flat) >= NEW_TOKENS else flat


def nnsight_model(loaded: Any, prompt_ids: list[int]) -> Any:
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    from specsight.models import cache_dir

    tokenizer = AutoTokenizer.from_pretrained(str(cache_dir() / "models" / MODEL))
    if tokenizer(PROMPT)["input_ids"] != prompt_ids:
        raise SystemExit("the Hugging Face tokenizer disagrees with specsight's")
    return TransformersModel(loaded.model, task="text-generation", tokenizer=tokenizer)


def run_nnsight(nn_model: Any, vector: torch.Tensor, n_prompt: int, pad_id: int) -> list[int]:
    """nnsight 0.8.1: the vector added to layers[LAYER].output at each of the 64 steps."""
    out: list[Any] = []
    with nn_model.generate(
        PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id
    ) as tr:
        for _step in tr.iter[:NEW_TOKENS]:
            layer = nn_model.model.layers[LAYER]
            layer.output = layer.output + vector
        out.append(tr.result.save())
    seq = out[0]
    seq = getattr(seq, "sequences", seq)
    return seq[0, n_prompt:].tolist()


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank)."""
    x = x.double().reshape(-1)
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    sorted_x = x[order]
    i = 0
    n = len(x)
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def part_steering(loaded: Any, rounds: int) -> dict[str, Any]:
    model, tokenizer = loaded.model, loaded.tokenizer
    pad_id = loaded.tokenizer.pad_id
    love = last_token_mean(model, tokenizer, LOVE)
    hate = last_token_mean(model, tokenizer, HATE)
    vector = (COEFF * (love - hate)).to(torch.float32)
    spec = steering_spec(vector)
    # the inline list must give back exactly this float32 vector
    assert torch.equal(torch.tensor(spec["invokes"]["steered"]["ops"][0]["vector"]).float(), vector)

    prompt_ids = tokenizer.encode(PROMPT)
    ids = torch.tensor([prompt_ids])
    nn_model = nnsight_model(loaded, prompt_ids)
    methods = {
        "hooks": lambda: run_hooks(model, ids, vector, pad_id),
        "specsight": lambda: run_specsight(spec, loaded, len(prompt_ids)),
        "nnsight": lambda: run_nnsight(nn_model, vector, len(prompt_ids), pad_id),
    }
    tokens: dict[str, list[int]] = {}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for name, fn in methods.items():  # warm-up, not timed
        tokens[name] = fn()
    for r in range(rounds):
        for name, fn in methods.items():
            t, toks = timed(fn)
            times[name].append(t)
            if toks != tokens[name]:
                raise SystemExit(f"{name}: round {r} generated different tokens")
            print(f"  round {r} {name:10s} {t:.3f} s", flush=True)

    # unsteered, for the record (and to show the vector changes the text)
    with torch.inference_mode():
        plain = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad_id,
        )[0, len(prompt_ids) :].tolist()

    ref = tokens["hooks"]
    same = {name: toks == ref for name, toks in tokens.items()}
    first_diff = {
        name: next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), None)
        for name, toks in tokens.items()
    }
    summary = {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "times_s": ts,
            "same_tokens_as_hooks": same[name],
            "n_tokens": len(tokens[name]),
            "first_diff_index": first_diff[name],
        }
        for name, ts in times.items()
    }
    ratio = summary["specsight"]["median_s"] / summary["hooks"]["median_s"]
    ratio_min = summary["specsight"]["min_s"] / summary["hooks"]["min_s"]
    decode = tokenizer.backend.decode
    return {
        "methods": summary,
        "specsight_over_hooks_median": ratio,
        "specsight_over_hooks_min": ratio_min,
        "target": f"specsight <= {TARGET_RATIO} x hooks (median)",
        "pass": ratio <= TARGET_RATIO,
        "vector_norm": float(vector.norm()),
        "steered_ids": ref,
        "steered_text": decode(ref),
        "unsteered_text": decode(plain),
        "nnsight_text": decode(tokens["nnsight"]),
        "specsight_text": decode(tokens["specsight"]),
    }


def part_attribution(loaded: Any) -> dict[str, Any]:
    import specsight

    specsight.run(str(ATTR_SPEC), model=loaded)  # warm-up (also loads the YAML once)
    attr_times, attr = [], None
    for _ in range(3):
        t, attr = timed(lambda: specsight.run(str(ATTR_SPEC), model=loaded))
        attr_times.append(t)
        print(f"  attribution {t:.3f} s", flush=True)
    exact_t, exact = timed(lambda: specsight.run(str(EXACT_SPEC), model=loaded))
    print(f"  exact sweep {exact_t:.3f} s", flush=True)
    atp = attr["atp"].float()
    effect = (exact["logit_diff"] - exact["corrupt_logit_diff"]).float()
    if atp.shape != effect.shape:
        raise SystemExit(f"grid shapes differ: atp {tuple(atp.shape)}, exact {tuple(effect.shape)}")
    rho = spearman(atp, effect)
    pearson = float(torch.corrcoef(torch.stack([atp.reshape(-1), effect.reshape(-1)]))[0, 1])
    return {
        "attribution": {
            "median_s": statistics.median(attr_times),
            "min_s": min(attr_times),
            "times_s": attr_times,
            "engine_forward_s": attr.manifest.get("timings", {}),
        },
        "exact": {"time_s": exact_t, "timings": exact.manifest.get("timings", {})},
        "speedup_median": exact_t / statistics.median(attr_times),
        "grid_shape": list(atp.shape),
        "atp_axes": attr.axes("atp"),
        "exact_axes": exact.axes("logit_diff"),
        "spearman": rho,
        "pearson": pearson,
        "corrupt_logit_diff": float(exact["corrupt_logit_diff"].reshape(-1)[0]),
        "clean_logit_diff": float(exact["clean_logit_diff"].reshape(-1)[0]),
    }


def table(res: dict[str, Any]) -> str:
    st, at = res["steering"], res["attribution"]
    m = st["methods"]

    def same(name: str) -> str:
        if m[name]["same_tokens_as_hooks"]:
            return "yes"
        return f"**no** (first differs at {m[name]['first_diff_index']})"

    lines = [
        "## `generate_steering.py`: steered generation, and attribution vs exact patching",
        "",
        "```sh",
        ".venv/bin/python bench/generate_steering.py     # ≈ 2-3 min on a 2-core CPU",
        "```",
        "",
        f'`{MODEL}` (float32, CPU), {NEW_TOKENS} new greedy tokens from "{PROMPT}"; the vector '
        f'{COEFF:g} × (mean layer-{LAYER} last-token residual of {len(LOVE)} " love" prompts − '
        f'the same for " hate"; norm {st["vector_norm"]:.2f}) is added to the output of '
        f"`model.model.layers[{LAYER}]` on every step (all prompt positions, then each new "
        "token). It is computed once and handed to all three as the same float32 values "
        "(specsight: inline `add` vector, `steps: all`). One warm-up each, then "
        f"{res['rounds']} interleaved rounds (each method once per round).",
        "",
        "| method | median (s) | min (s) | same 64 ids as hooks |",
        "| --- | --- | --- | --- |",
        f"| hand-written hook + `model.generate` | {m['hooks']['median_s']:.3f} | "
        f"{m['hooks']['min_s']:.3f} | (reference) |",
        f"| `specsight.run(spec, model=loaded)` | {m['specsight']['median_s']:.3f} | "
        f"{m['specsight']['min_s']:.3f} | {same('specsight')} |",
        f"| nnsight 0.8.1 `generate` + `tr.iter[:{NEW_TOKENS}]` | {m['nnsight']['median_s']:.3f} | "
        f"{m['nnsight']['min_s']:.3f} | {same('nnsight')} |",
        "",
        f"specsight / hooks: {st['specsight_over_hooks_median']:.3f} (median), "
        f"{st['specsight_over_hooks_min']:.3f} (min). Target specsight ≤ {TARGET_RATIO} × "
        f"hooks (median): **{'PASS' if st['pass'] else 'FAIL'}**.",
        "",
        f"Steered: {json.dumps(st['steered_text'])[:200]}",
        "",
        f"Unsteered: {json.dumps(st['unsteered_text'])[:200]}",
        "",
        "IOI attribution patching ([`specs/ioi_attribution.yaml`](../specs/ioi_attribution.yaml))"
        " vs the exact sweep ([`specs/ioi_patching.yaml`](../specs/ioi_patching.yaml)), both "
        "`specsight.run(path, model=loaded)` after one warm-up of the attribution spec:",
        "",
        "| | time (s) | |",
        "| --- | --- | --- |",
        f"| attribution (`atp`) | {at['attribution']['median_s']:.3f} (median of 3; min "
        f"{at['attribution']['min_s']:.3f}) | |",
        f"| exact sweep | {at['exact']['time_s']:.3f} (1 run) | "
        f"{at['speedup_median']:.1f}× the attribution time |",
        f"| Spearman ρ, `atp` vs `logit_diff − corrupt_logit_diff` | "
        f"**{at['spearman']:.3f}** | Pearson {at['pearson']:.3f}; grid {at['grid_shape']} |",
        "",
        f"{res['machine']['cpu']}, {res['machine']['cores']} cores, torch "
        f"{res['machine']['torch']} ({res['machine']['torch_threads']} thread), nnsight {res['machine']['nnsight']}; shared machine "
        f"(other benchmarks may run): load average {res['loadavg_start'][0]:.2f} at start, "
        f"{res['loadavg_end'][0]:.2f} at end; {res['date']}. "
        "Results: [`results/generate_steering.json`](results/generate_steering.json).",
    ]
    return "\n".join(lines)


def main() -> int:
    import nnsight

    from specsight.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved timing rounds")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the machine is shared, so more threads oversubscribe)",
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    loaded = load_model(MODEL, dtype="float32", device="cpu")
    load_s = time.perf_counter() - t0
    print(f"loaded {MODEL} in {load_s:.1f} s; load average {load_start}", flush=True)
    print("steering:", flush=True)
    steering = part_steering(loaded, args.rounds)
    print("attribution vs exact:", flush=True)
    attribution = part_attribution(loaded)
    res = {
        "date": date,
        "model": MODEL,
        "dtype": "float32",
        "device": "cpu",
        "load_model_s": load_s,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "nnsight": getattr(nnsight, "__version__", "?"),
            "python": platform.python_version(),
        },
        "rounds": args.rounds,
        "steering": steering,
        "attribution": attribution,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    section = table(res)
    replace_section(START, END, f"{START}\n{section}\n{END}")
    print()
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
