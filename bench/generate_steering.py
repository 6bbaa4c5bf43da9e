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
patched forward per cell): wall time (median of 3 / 1 run) and how the attribution grid matches
the exact effect (``logit_diff`` minus ``corrupt_logit_diff``): the cells whose patch restores
more than 5 logits and their smallest attribution, the largest attribution of the cells the
exact sweep calls null (|effect| < 0.5), Pearson's r, and Spearman's rho (fragile: most cells'
exact effect is float noise, whose order varies between machines).

Writes ``bench/results/generate_steering.json`` and the section between
``<!-- generate:start -->`` / ``<!-- generate:end -->`` of ``bench/README.md``.

On a GPU, ``--device cuda`` runs both parts on ``llama8b-random`` (Llama-3-8B dimensions, random
weights, bf16; see ``_common.random_llama``): the vector is rounded to bf16 once and all three
methods add that. In bf16 the methods need not pick the same tokens, so instead of requiring
equal ids the number of leading ids each shares with the hooks is reported. Results:
``bench/results/generate_steering_cuda.json`` and the ``<!-- generate:cuda:start -->`` section;
other device/model pairs (self-tests) write ``generate_steering_<device>_<model>.json`` only.

    .venv/bin/python bench/generate_steering.py
    python bench/generate_steering.py --device cuda                    # llama8b-random, bf16
    python bench/generate_steering.py --device cpu --model llama-small-random --rounds 1
    python bench/generate_steering.py --device cuda --report           # README from the JSON
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
from _common import (  # bench/ is on sys.path when a script runs
    RANDOM_LLAMAS,
    cpu_name,
    random_llama,
    replace_section,
    tokenizer_dir,
)

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results" / "generate_steering.json"
START, END = "<!-- generate:start -->", "<!-- generate:end -->"
#: the model each device benchmarks by default (its results get a README section)
DEFAULT_MODEL = {"cpu": "smollm2-135m", "cuda": "llama8b-random"}

MODEL = "smollm2-135m"
PROMPT = "I think you are"
LAYER = 6  # models with fewer layers (self-tests) steer at the middle layer instead
NEW_TOKENS = 64
COEFF = 3.0
ROUNDS = 5
LOVE = ["I love you", "I love this", "Love is", "We love it"]
HATE = ["I hate you", "I hate this", "Hate is", "We hate it"]
TARGET_RATIO = 1.03
ATTR_SPEC = ROOT / "specs" / "ioi_attribution.yaml"
EXACT_SPEC = ROOT / "specs" / "ioi_patching.yaml"


def steer_layer(model: Any) -> int:
    """LAYER, or the middle layer of a model with fewer layers."""
    n_layers = len(model.model.layers)
    return LAYER if n_layers > LAYER else n_layers // 2


def last_token_mean(model: Any, tokenizer: Any, prompts: list[str], layer: int) -> torch.Tensor:
    """Mean over prompts of the layer-``layer`` output at each prompt's last token."""
    rows = []
    caught: list[torch.Tensor] = []

    def hook(_mod: Any, _args: Any, out: Any) -> None:
        caught.append(out[0] if isinstance(out, tuple) else out)

    device = next(model.parameters()).device
    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        for prompt in prompts:
            with torch.inference_mode():
                model(torch.tensor([tokenizer.encode(prompt)], device=device))
            rows.append(caught.pop()[0, -1].float().clone())
    finally:
        handle.remove()
    return torch.stack(rows).mean(0)


def run_hooks(
    model: Any, ids: torch.Tensor, vector: torch.Tensor, pad_id: int, layer: int
) -> list[int]:
    """Hand-written: a forward hook on layers[layer] adds the vector at every position."""

    def hook(_mod: Any, _args: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (out[0] + vector, *out[1:])
        return out + vector

    handle = model.model.layers[layer].register_forward_hook(hook)
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


def steering_spec(vector: torch.Tensor, model_id: str, dtype: str, layer: int) -> dict[str, Any]:
    """The specsight spec: the same vector inline, coeff 1, on every step."""
    return {
        "specsight": 1,
        "name": "bench-steered-generation",
        "model": {"id": model_id, "dtype": dtype},
        "invokes": {
            "steered": {
                "prompt": PROMPT,
                "generate": {"max_new_tokens": NEW_TOKENS},
                "ops": [
                    {
                        "op": "add",
                        "site": f"resid_post.{layer}",
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

    # SmolLM2's tokenizer: the built-in model's, or $SPECSIGHT_BENCH_TOKENIZER's (random Llamas)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    if tokenizer(PROMPT)["input_ids"] != prompt_ids:
        raise SystemExit("the Hugging Face tokenizer disagrees with specsight's")
    return TransformersModel(loaded.model, task="text-generation", tokenizer=tokenizer)


def run_nnsight(
    nn_model: Any, vector: torch.Tensor, n_prompt: int, pad_id: int, layer_index: int
) -> list[int]:
    """nnsight 0.8.1: the vector added to layers[layer_index].output at each of the 64 steps."""
    out: list[Any] = []
    with nn_model.generate(
        PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id
    ) as tr:
        for _step in tr.iter[:NEW_TOKENS]:
            layer = nn_model.model.layers[layer_index]
            layer.output = layer.output + vector
        out.append(tr.result.save())
    seq = out[0]
    seq = getattr(seq, "sequences", seq)
    return seq[0, n_prompt:].tolist()


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Any) -> tuple[float, Any]:
    sync()
    t0 = time.perf_counter()
    value = fn()
    sync()
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


def leading_match(tokens: list[int], ref: list[int]) -> int:
    """How many leading ids ``tokens`` shares with ``ref``."""
    for i, (a, b) in enumerate(zip(tokens, ref)):
        if a != b:
            return i
    return min(len(tokens), len(ref))


def part_steering(loaded: Any, rounds: int, strict: bool) -> dict[str, Any]:
    """Steered generation three ways. ``strict``: a method whose tokens change between rounds
    is an error (float32 CPU); otherwise that is recorded."""
    model, tokenizer = loaded.model, loaded.tokenizer
    pad_id = loaded.tokenizer.pad_id
    first = next(model.parameters())
    device, dtype = first.device, first.dtype
    layer = steer_layer(model)
    love = last_token_mean(model, tokenizer, LOVE, layer)
    hate = last_token_mean(model, tokenizer, HATE, layer)
    # rounded to the model's dtype once, so all three add exactly the same values
    vector = (COEFF * (love - hate)).to(dtype).to("cpu", torch.float32)
    spec = steering_spec(vector, loaded.model_id, loaded.dtype, layer)
    # the inline list must give back exactly this vector
    assert torch.equal(torch.tensor(spec["invokes"]["steered"]["ops"][0]["vector"]).float(), vector)
    vector_model = vector.to(device, dtype)

    prompt_ids = tokenizer.encode(PROMPT)
    ids = torch.tensor([prompt_ids], device=device)
    nn_model = nnsight_model(loaded, prompt_ids)
    methods = {
        "hooks": lambda: run_hooks(model, ids, vector_model, pad_id, layer),
        "specsight": lambda: run_specsight(spec, loaded, len(prompt_ids)),
        "nnsight": lambda: run_nnsight(nn_model, vector_model, len(prompt_ids), pad_id, layer),
    }
    tokens: dict[str, list[int]] = {}
    times: dict[str, list[float]] = {name: [] for name in methods}
    unstable: dict[str, list[int]] = {}
    for name, fn in methods.items():  # warm-up, not timed
        t, tokens[name] = timed(fn)
        print(f"  warm-up {name:10s} {t:.3f} s", flush=True)
    for r in range(rounds):
        for name, fn in methods.items():
            t, toks = timed(fn)
            times[name].append(t)
            if toks != tokens[name]:
                if strict:
                    raise SystemExit(f"{name}: round {r} generated different tokens")
                unstable.setdefault(name, []).append(r)
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
    summary = {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "times_s": ts,
            "same_tokens_as_hooks": tokens[name] == ref,
            "n_tokens": len(tokens[name]),
            "matching_leading_tokens": leading_match(tokens[name], ref),
            "first_diff_index": (None if tokens[name] == ref else leading_match(tokens[name], ref)),
            "rounds_with_other_tokens": unstable.get(name, []),
        }
        for name, ts in times.items()
    }
    ratio = summary["specsight"]["median_s"] / summary["hooks"]["median_s"]
    ratio_min = summary["specsight"]["min_s"] / summary["hooks"]["min_s"]
    decode = tokenizer.backend.decode  # ids beyond the tokenizer's vocabulary decode to nothing
    return {
        "methods": summary,
        "specsight_over_hooks_median": ratio,
        "specsight_over_hooks_min": ratio_min,
        "target": f"specsight <= {TARGET_RATIO} x hooks (median)",
        "pass": ratio <= TARGET_RATIO,
        "layer": layer,
        "vector_norm": float(vector.norm()),
        "steered_ids": ref,
        "unsteered_ids": plain,
        "specsight_ids": tokens["specsight"],
        "nnsight_ids": tokens["nnsight"],
        "steered_text": decode(ref),
        "unsteered_text": decode(plain),
        "nnsight_text": decode(tokens["nnsight"]),
        "specsight_text": decode(tokens["specsight"]),
    }


def attribution_specs(loaded: Any) -> tuple[Any, Any]:
    """The two IOI specs for ``loaded``: their paths for the built-in model in float32 (as the
    CPU numbers were measured), else their content with ``model`` set to the loaded model's id
    and dtype and without ``expect`` (its claims are about the built-in model's numbers)."""
    if loaded.model_id == MODEL and loaded.dtype == "float32":
        return str(ATTR_SPEC), str(EXACT_SPEC)
    import yaml

    specs = []
    for path in (ATTR_SPEC, EXACT_SPEC):
        data = yaml.safe_load(path.read_text())
        data["model"] = {"id": loaded.model_id, "dtype": loaded.dtype}
        data.pop("expect", None)
        specs.append(data)
    return specs[0], specs[1]


def part_attribution(loaded: Any) -> dict[str, Any]:
    import specsight

    attr_spec, exact_spec = attribution_specs(loaded)
    specsight.run(attr_spec, model=loaded)  # warm-up (also loads the YAML once)
    attr_times, attr = [], None
    for _ in range(3):
        t, attr = timed(lambda: specsight.run(attr_spec, model=loaded))
        attr_times.append(t)
        print(f"  attribution {t:.3f} s", flush=True)
    exact_t, exact = timed(lambda: specsight.run(exact_spec, model=loaded))
    print(f"  exact sweep {exact_t:.3f} s", flush=True)
    atp = attr["atp"].float().cpu()
    effect = (exact["logit_diff"] - exact["corrupt_logit_diff"]).float().cpu()
    if atp.shape != effect.shape:
        raise SystemExit(f"grid shapes differ: atp {tuple(atp.shape)}, exact {tuple(effect.shape)}")
    rho = spearman(atp, effect)
    pearson = float(torch.corrcoef(torch.stack([atp.reshape(-1), effect.reshape(-1)]))[0, 1])
    strong, null = effect > 5, effect.abs() < 0.5
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
        "strong_cells": int(strong.sum()),
        "strong_min_atp": float(atp[strong].min()) if strong.any() else None,
        "null_cells": int(null.sum()),
        "null_max_abs_atp": float(atp[null].abs().max()) if null.any() else None,
        "corrupt_logit_diff": float(exact["corrupt_logit_diff"].reshape(-1)[0]),
        "clean_logit_diff": float(exact["clean_logit_diff"].reshape(-1)[0]),
    }


def _model_line(res: dict[str, Any]) -> str:
    """Which model, where: the CPU section's wording for the built-in model on the CPU."""
    if res["device"] == "cpu":
        return f"`{res['model']}` ({res['dtype']}, CPU)"
    dims = ""
    if res["model"] in RANDOM_LLAMAS:
        cfg = RANDOM_LLAMAS[res["model"]]
        dims = (
            f": random weights (seed 0), {cfg['num_hidden_layers']} layers, hidden "
            f"{cfg['hidden_size']}, vocabulary {cfg['vocab_size']}, SmolLM2's tokenizer"
        )
    return f"`{res['model']}` ({res['dtype']}, {res['machine'].get('gpu') or res['device']}{dims})"


def steering_lines(res: dict[str, Any]) -> list[str]:
    st = res["steering"]
    m = st["methods"]
    n = NEW_TOKENS
    layer = st.get("layer", LAYER)

    def same(name: str) -> str:
        e = m[name]
        if e["same_tokens_as_hooks"]:
            text = "yes"
        elif "matching_leading_tokens" in e:
            text = f"**no**: the first {e['matching_leading_tokens']} of {e['n_tokens']} match"
        else:
            text = f"**no** (first differs at {e['first_diff_index']})"
        if e.get("rounds_with_other_tokens"):
            text += f"; other ids in round(s) {e['rounds_with_other_tokens']}"
        return text

    rounding = (
        f"It is computed once, rounded to {res['dtype']}, and handed to all three as the same "
        f"values"
        if res["dtype"] != "float32"
        else "It is computed once and handed to all three as the same float32 values"
    )
    return [
        f'{_model_line(res)}, {n} new greedy tokens from "{PROMPT}"; the vector '
        f'{COEFF:g} × (mean layer-{layer} last-token residual of {len(LOVE)} " love" prompts − '
        f'the same for " hate"; norm {st["vector_norm"]:.2f}) is added to the output of '
        f"`model.model.layers[{layer}]` on every step (all prompt positions, then each new "
        f"token). {rounding} "
        "(specsight: inline `add` vector, `steps: all`). One warm-up each, then "
        f"{res['rounds']} interleaved rounds (each method once per round).",
        "",
        f"| method | median (s) | min (s) | same {n} ids as hooks |",
        "| --- | --- | --- | --- |",
        f"| hand-written hook + `model.generate` | {m['hooks']['median_s']:.3f} | "
        f"{m['hooks']['min_s']:.3f} | (reference) |",
        f"| `specsight.run(spec, model=loaded)` | {m['specsight']['median_s']:.3f} | "
        f"{m['specsight']['min_s']:.3f} | {same('specsight')} |",
        f"| nnsight 0.8.1 `generate` + `tr.iter[:{n}]` | {m['nnsight']['median_s']:.3f} | "
        f"{m['nnsight']['min_s']:.3f} | {same('nnsight')} |",
        "",
        f"specsight / hooks: {st['specsight_over_hooks_median']:.3f} (median), "
        f"{st['specsight_over_hooks_min']:.3f} (min). Target specsight ≤ {TARGET_RATIO} × "
        f"hooks (median): **{'PASS' if st['pass'] else 'FAIL'}**.",
        "",
        f"Steered: {json.dumps(st['steered_text'])[:200]}",
        "",
        f"Unsteered: {json.dumps(st['unsteered_text'])[:200]}",
    ]


def attribution_lines(at: dict[str, Any]) -> list[str]:
    return [
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
        *_match_rows(at),
    ]


def _match_rows(at: dict[str, Any]) -> list[str]:
    """How the attribution grid matches the exact effect (older results: correlations only)."""
    rows = []
    if at.get("strong_cells") is not None:
        rows += [
            f"| cells restoring > 5 logits (exact) | {at['strong_cells']} | smallest attribution "
            f"there **{at['strong_min_atp']:.2f}** |",
            f"| null cells (\\|exact\\| < 0.5) | {at['null_cells']} | largest \\|attribution\\| "
            f"there **{at['null_max_abs_atp']:.2f}** |",
        ]
    rows.append(
        f"| Pearson r / Spearman ρ, `atp` vs `logit_diff − corrupt_logit_diff` | "
        f"**{at['pearson']:.3f}** / {at['spearman']:.3f} | grid {at['grid_shape']}; ρ ranks "
        "float noise in the null cells |"
    )
    return rows


def table(res: dict[str, Any], key: str = "") -> str:
    """The README section (without markers): the CPU one has the heading and the command."""
    mach = res["machine"]
    lines: list[str] = []
    if not key:
        lines += [
            "## `generate_steering.py`: steered generation, and attribution vs exact patching",
            "",
            "```sh",
            ".venv/bin/python bench/generate_steering.py     # ≈ 2-3 min on a 2-core CPU",
            "```",
            "",
        ]
    else:
        lines += [
            f"### `generate_steering.py` on {key}",
            "",
            "```sh",
            f"python bench/generate_steering.py --device {res['device']} --model {res['model']}",
            "```",
            "",
        ]
    if "steering" in res:
        lines += [*steering_lines(res), ""]
    if "attribution" in res:
        lines += [*attribution_lines(res["attribution"]), ""]
    for part, reason in res.get("failed", {}).items():
        lines += [f"Not measured: {part}: {reason}.", ""]
    name = f"results/{res.get('results_file', RESULTS.name)}"
    if res["device"] == "cpu":
        lines.append(
            f"{mach['cpu']}, {mach['cores']} cores, torch "
            f"{mach['torch']} ({mach['torch_threads']} thread), nnsight {mach['nnsight']}; shared machine "
            f"(other benchmarks may run): load average {res['loadavg_start'][0]:.2f} at start, "
            f"{res['loadavg_end'][0]:.2f} at end; {res['date']}. "
            f"Results: [`{name}`]({name})."
        )
    else:
        lines.append(
            f"{mach.get('gpu', res['device'])}; {mach['cpu']}, {mach['cores']} cores; torch "
            f"{mach['torch']}, transformers {mach.get('transformers', '?')}, nnsight "
            f"{mach['nnsight']}, Python {mach['python']}; model built in "
            f"{res['load_model_s']:.1f} s; {res['date']}. Results: [`{name}`]({name})."
        )
    return "\n".join(lines)


def result_key(device: str, model: str) -> str:
    """'' for the built-in model on the CPU (the original section), 'cuda' for the GPU's
    default model, else '<device>_<model>' (self-tests: no README section unless --readme)."""
    if device == "cpu" and model == DEFAULT_MODEL["cpu"]:
        return ""
    if device == "cuda" and model == DEFAULT_MODEL["cuda"]:
        return "cuda"
    return f"{device}_{model}"


def paths(key: str) -> tuple[Path, str, str]:
    """(results JSON, README start marker, end marker) for a result key."""
    if not key:
        return RESULTS, START, END
    path = RESULTS.with_name(f"generate_steering_{key}.json")
    return path, f"<!-- generate:{key}:start -->", f"<!-- generate:{key}:end -->"


def write_json(path: Path, res: dict[str, Any], out_dir: str | None) -> None:
    text = json.dumps(res, indent=2) + "\n"
    for target in [path] + ([Path(out_dir) / path.name] if out_dir else []):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


def write_readme(key: str, res: dict[str, Any]) -> None:
    _, start, end = paths(key)
    section = table(res, key)
    heading = "" if not key else f"<!-- generate_steering {key} -->\n"
    replace_section(start, end, f"{start}\n{section}\n{end}", heading=heading)
    print(f"updated bench/README.md ({start})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved timing rounds")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the machine is shared, so more threads oversubscribe)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--model",
        help="smollm2-135m (cpu default), llama8b-random (cuda default) or llama-small-random",
    )
    parser.add_argument(
        "--dtype", help="float32 / bfloat16 / float16 (default: float32 on cpu, bfloat16 on cuda)"
    )
    parser.add_argument(
        "--parts", default="steering,attribution", help="comma list: steering, attribution"
    )
    parser.add_argument("--out-dir", help="also write the JSON into this folder (after each part)")
    parser.add_argument(
        "--readme",
        action=argparse.BooleanOptionalAction,
        help="write the README section (default: for the default model of cpu and cuda)",
    )
    parser.add_argument(
        "--report", action="store_true", help="run nothing: rebuild the section from the JSON"
    )
    args = parser.parse_args(argv)
    args.device = "cuda" if args.device.startswith("cuda") else args.device
    if args.model is None:
        args.model = DEFAULT_MODEL.get(args.device, MODEL)
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    return args


def load(args: argparse.Namespace) -> Any:
    from specsight.models.load import load_model

    if args.model in RANDOM_LLAMAS:
        return random_llama(args.model, args.device, getattr(torch, args.dtype))
    return load_model(args.model, dtype=args.dtype, device=args.device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    key = result_key(args.device, args.model)
    path, _, _ = paths(key)
    readme = args.readme if args.readme is not None else key in ("", "cuda")
    if args.report:
        res = json.loads(path.read_text())
        print(table(res, key))
        if readme:
            write_readme(key, res)
        return 0

    import nnsight
    import transformers

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    loaded = load(args)
    sync()
    load_s = time.perf_counter() - t0
    print(f"loaded {args.model} in {load_s:.1f} s; load average {load_start}", flush=True)
    machine = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "nnsight": getattr(nnsight, "__version__", "?"),
        "python": platform.python_version(),
    }
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    res: dict[str, Any] = {
        "date": date,
        "model": args.model,
        "dtype": loaded.dtype,
        "device": args.device,
        "load_model_s": load_s,
        "loadavg_start": list(load_start),
        "machine": machine,
        "rounds": args.rounds,
        "results_file": path.name,
    }
    # float32 on the CPU: the three must agree exactly, as the CPU section claims
    strict = args.device == "cpu" and loaded.dtype == "float32"
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for part in parts:
        print(f"{part}:", flush=True)
        try:
            if part == "steering":
                res["steering"] = part_steering(loaded, args.rounds, strict)
            elif part == "attribution":
                res["attribution"] = part_attribution(loaded)
            else:
                raise SystemExit(f"unknown part {part!r}")
        except Exception as exc:  # record it and go on with the next part (not on the CPU)
            if strict:
                raise
            import traceback

            traceback.print_exc()
            res.setdefault("failed", {})[part] = f"{type(exc).__name__}: {exc}"[:500]
        if args.device == "cuda":
            res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["loadavg_end"] = list(os.getloadavg())
        write_json(path, res, args.out_dir)
    print()
    print(table(res, key))
    print(f"\nwrote {path.relative_to(ROOT)}")
    if readme and "steering" in res:
        write_readme(key, res)
    return 0 if not res.get("failed") else 1


if __name__ == "__main__":
    sys.exit(main())
