"""SAE feature sweep on the built-in model: each of the 4096 features of an SAE on
``resid_post.6`` zeroed, one at a time, at the last token of the IOI prompt, and the logit
difference ' Mary' − ' John' read for every feature. specsight (one spec, a swept ``zero`` on
``sae.s.features``) against hand-written forward hooks, batched (the best of several batch
sizes) and one forward per feature (a subset, extrapolated). Every method gives the same
[4096] vector within 1e-4 × max |logit diff|, or the script exits with status 1.

The SAE has random weights (seeded), written in SAELens's format into a temporary folder and
scaled on the model's own layer-6 residual stream so that a few dozen features fire at the
last token, as in a trained SAE.

    python bench/sae_feature_sweep.py     # ≈ 7 min on an idle 2-core CPU; writes the table
    python bench/sae_feature_sweep.py --repeats 1 --batch 64 --no-readme     # ≈ 3 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, cpu_seconds, other_load, replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "sae_feature_sweep_cpu.json"
START, END = "<!-- sae_sweep:start -->", "<!-- sae_sweep:end -->"
HEADING = """## `sae_feature_sweep.py`: SAE feature sweep

Every feature of a 4096-feature SAE on `resid_post.6` of the built-in model zeroed, one at a
time, at the last token of "When Mary and John went to the store, John gave a drink to", and
logit(' Mary') − logit(' John') read for each: a [4096] vector. The SAE (SAELens format,
`standard`, d_in 576) has seeded random weights scaled on the model's own layer-6 residual
stream (W_enc ~ N(0, 1/n²) with n the residual's median norm, b_enc ≈ −2, decoder rows of norm
n/10), so a few dozen features fire at the last token, like a trained SAE's L0; zeroing feature
i subtracts f_i · W_dec[i] there.

| method | what it is |
| --- | --- |
| `specsight` | `specsight.run(spec, model=loaded)` on a spec with `saes: {s: {path, site: resid_post.6}}`, a base invoke and an invoke swept over `feature: "0:4096"` with `{op: zero, site: sae.s.features, positions: [-1], dims: ["{feature}"]}`; compile included |
| `hooks_batched` | the researcher's: B rows of the prompt per forward (B the fastest of 32/64/128/256 on a trial), a forward hook on `model.model.layers[6]` encoding each row's last position and subtracting f[row, feature] · W_dec[feature] there, `torch.inference_mode`, logits only at the last position (`logits_to_keep=1`) |
| `hooks_per_feature` | the same hook, one forward per feature: 128 evenly spaced features timed, × 32 (extrapolated) |

Every value must equal specsight's within 1e-4 × max |logit diff|, and every inactive feature
must leave specsight's value at the base invoke's, or the script exits with status 1. The
target is specsight ≤ 0.5 × `hooks_batched`.

specsight's plan runs the 4096 rows as 16 forwards of 256 rows that start at layer 6 and
position 13, reading the earlier positions' keys and values and layer 6's input from one
untouched run (94 % of row-layer-positions skipped); the hooks run all 14 positions of all 30
layers for every row. Of specsight's time (torch profiler, 2 threads), the 24 decoder layers
take ≈ 75 %, the full-vocabulary unembedding of the last position ≈ 22 % (+ 3 % picking the two
logits out of it), compiling the 4096 cells ≈ 5 %. An expert who also cached the prompt's
prefix (keys and values of positions 0–12, one row per feature at the last token only) would
come close to specsight; that baseline is not timed here.

"""
MODEL = "smollm2-135m"
PROMPT = "When Mary and John went to the store, John gave a drink to"
TARGET, FOIL = " Mary", " John"
LAYER = 6
D_SAE = 4096
SEED = 0


# --------------------------------------------------------------------------------- the SAE


@dataclass
class Sae:
    """The bench's SAE: its weights (float32) and the folder holding them."""

    folder: Path
    w_enc: torch.Tensor  # [d_in, d_sae]
    w_dec: torch.Tensor  # [d_sae, d_in]
    b_enc: torch.Tensor  # [d_sae]
    b_dec: torch.Tensor  # [d_in]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations (standard architecture, no b_dec on the input)."""
        return torch.relu(x.float() @ self.w_enc + self.b_enc)


def residual(lm: Any, ids: torch.Tensor) -> torch.Tensor:
    """The output of decoder layer ``LAYER`` for ``ids`` [1, pos]: [pos, d_model]."""
    kept: list[torch.Tensor] = []

    def hook(_module: Any, _args: Any, output: Any) -> None:
        kept.append((output[0] if isinstance(output, tuple) else output)[0].clone())

    handle = lm.model.model.layers[LAYER].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            lm.model.model(ids)
    finally:
        handle.remove()
    return kept[0].float()


def write_sae(folder: Path, resid: torch.Tensor, seed: int = SEED) -> Sae:
    """Random SAE weights scaled on ``resid`` [pos, d_in], saved in SAELens's format.

    With n the median norm of the residual over positions: W_enc ~ N(0, 1/n²), so a typical
    position's pre-activations are ~N(0, 1); b_enc ~ -2 ± 0.2, so ~2 % of the features fire
    (a trained SAE's L0 of a few dozen to a hundred); W_dec rows random directions of norm
    n / 10, so zeroing one active feature moves the residual by a few percent."""
    d_in = resid.shape[-1]
    norm = float(resid.norm(dim=-1).median())
    gen = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(d_in, D_SAE, generator=gen) / norm
    b_enc = -2.0 + 0.2 * torch.randn(D_SAE, generator=gen)
    w_dec = torch.randn(D_SAE, d_in, generator=gen)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * (norm / 10)
    b_dec = torch.zeros(d_in)
    weights = {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec}
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "sae_weights.safetensors")
    cfg = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": D_SAE,
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "hook_name": f"blocks.{LAYER}.hook_resid_post",
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return Sae(folder, w_enc, w_dec, b_enc, b_dec)


# --------------------------------------------------------------------------------- specsight


def spec_for(sae: Sae) -> dict[str, Any]:
    site = f"resid_post.{LAYER}"
    zero = {"op": "zero", "site": "sae.s.features", "positions": [-1], "dims": ["{feature}"]}
    metric = {"kind": "logit_diff", "target": TARGET, "foil": FOIL}
    return {
        "specsight": 1,
        "model": {"id": MODEL},
        "saes": {"s": {"path": str(sae.folder), "site": site}},
        "invokes": {
            "base": {"prompt": PROMPT},
            "sweep": {"prompt": PROMPT, "sweep": {"feature": f"0:{D_SAE}"}, "ops": [zero]},
        },
        "metrics": {"ld": {**metric, "invoke": "sweep"}, "base": {**metric, "invoke": "base"}},
    }


def run_specsight(lm: Any, spec: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """The [4096] logit differences and the base prompt's, from one ``specsight.run``."""
    import specsight

    metrics = specsight.run(spec, model=lm).metrics
    return metrics["ld"], float(metrics["base"])


# --------------------------------------------------------------------------------- hooks


def answer_ids(lm: Any) -> tuple[int, int]:
    """The metric's token ids, read as specsight reads them (no special tokens)."""
    return lm.tokenizer.encode_plain(TARGET)[0], lm.tokenizer.encode_plain(FOIL)[0]


class ZeroFeatureHook:
    """A forward hook on decoder layer ``LAYER``: row r zeroes feature ``features[r]`` at the
    last position, h[r, -1] -= f[r, features[r]] * W_dec[features[r]]."""

    def __init__(self, lm: Any, sae: Sae):
        self.sae = sae
        self.features = torch.zeros(0, dtype=torch.long)
        self.handle = lm.model.model.layers[LAYER].register_forward_hook(self)

    def __call__(self, _module: Any, _args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        rows = torch.arange(hidden.shape[0])
        acts = self.sae.encode(hidden[:, -1])  # [rows, d_sae]
        hidden[:, -1] -= acts[rows, self.features, None] * self.sae.w_dec[self.features]

    def close(self) -> None:
        self.handle.remove()


def hooks_sweep(lm: Any, sae: Sae, features: torch.Tensor, batch: int) -> torch.Tensor:
    """Logit differences for ``features``, ``batch`` rows of the prompt per forward, logits
    at the last position only."""
    target, foil = answer_ids(lm)
    ids = torch.tensor([lm.tokenizer.encode(PROMPT)])
    hook, out = ZeroFeatureHook(lm, sae), []
    try:
        with torch.inference_mode():
            for chunk in features.split(batch):
                hook.features = chunk
                logits = lm.model(ids.expand(len(chunk), -1), logits_to_keep=1).logits[:, -1]
                out.append(logits[:, target] - logits[:, foil])
    finally:
        hook.close()
    return torch.cat(out).float()


def hooks_base(lm: Any, batch: int) -> torch.Tensor:
    """The prompt's logit difference without the hook, ``batch`` identical rows (for the
    exact comparison with inactive features)."""
    target, foil = answer_ids(lm)
    ids = torch.tensor([lm.tokenizer.encode(PROMPT)]).expand(batch, -1)
    with torch.inference_mode():
        logits = lm.model(ids, logits_to_keep=1).logits[:, -1]
    return (logits[:, target] - logits[:, foil]).float()


# --------------------------------------------------------------------------------- timing


def wait_idle(limit: float, cores: float = 0.3) -> float:
    """Wait up to ``limit`` seconds until other processes keep fewer than ``cores`` cores busy
    (over 5 s); the cores they kept busy at the last look."""
    deadline = time.monotonic() + limit
    while True:
        start = cpu_seconds()
        time.sleep(5.0)
        busy = other_load(start)
        if busy < cores or time.monotonic() > deadline:
            return busy
        print(f"  waiting: other processes keep {busy:.1f} cores busy", file=sys.stderr)


@dataclass
class Timing:
    wall: list[float]
    cpu: list[float]
    other: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def best(self) -> float:
        return min(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """``fn()``, its wall seconds, its process CPU seconds and the cores other processes
    kept busy meanwhile."""
    start = cpu_seconds()
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return value, wall, cpu, other_load(start)


def pick_batch(lm: Any, sae: Sae, batches: list[int], trial: int) -> dict[int, float]:
    """Seconds per feature of the batched hooks at each batch size, on ``trial`` features
    (after one forward of that size to warm up)."""
    per_feature = {}
    for batch in batches:
        hooks_sweep(lm, sae, torch.arange(batch), batch)
        features = torch.arange(max(trial, batch))
        _, wall, _, _ = timed(lambda b=batch, f=features: hooks_sweep(lm, sae, f, b))
        per_feature[batch] = wall / len(features)
        print(f"  hooks_batched B={batch}: {per_feature[batch] * 1e3:.2f} ms per feature")
    return per_feature


def _timing(t: Timing) -> dict[str, Any]:
    return {
        "wall": t.wall,
        "cpu": t.cpu,
        "median": t.median,
        "best": t.best,
        "cpu_median": t.cpu_median,
        "other": t.other,
    }


def load_1min() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# --------------------------------------------------------------------------------- report

BUSY_CORES = 0.2  # others' cores above which the table calls the timings noisy


def table(r: dict[str, Any]) -> str:
    """The README block (markers included) of results ``r``."""
    spec_t, hooks_t, per_t = r["specsight"], r["hooks_batched"], r["hooks_per_feature"]
    busy = max(*spec_t["other"], *hooks_t["other"], per_t["other"])
    noisy = f" Other processes kept up to {busy:.1f} cores busy: timings are noisy." * (
        busy > BUSY_CORES
    )
    trials = ", ".join(f"B={b}: {s * D_SAE:.0f} s" for b, s in r["batch_trial"].items())
    lines = [
        START,
        f"CPU: {r['cpu']}, {r['threads']} torch threads; torch {r['torch']}, specsight "
        f"{r['specsight_version']}; {r['date']}; 1-minute load {r['load_before']:.2f} before, "
        f"{r['load_after']:.2f} after.{noisy}",
        "",
        f"`{r['command']}`: {D_SAE} features, {r['active']} active at the last position; logit "
        f"diffs {r['ld_min']:.3f} … {r['ld_max']:.3f} (base {r['base']:.4f}). Wall seconds, "
        f"model loaded, {r['repeats']} interleaved runs after a warm-up; ratios of medians "
        "(of bests).",
        "",
        "| method | median s | best s | CPU s (median) | others' cores (max) "
        "| specsight / method | max abs diff vs specsight |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, t, diff in (
        ("`specsight`", spec_t, 0.0),
        (f"`hooks_batched` (B={r['batch']})", hooks_t, r["diff_batched"]),
    ):
        ratio = f"{spec_t['median'] / t['median']:.2f}× ({spec_t['best'] / t['best']:.2f}×)"
        lines.append(
            f"| {name} | {t['median']:.2f} | {t['best']:.2f} | {t['cpu_median']:.2f} | "
            f"{max(t['other']):.1f} | {ratio} | {diff:.1e} |"
        )
    ratio = f"{spec_t['median'] / per_t['extrapolated']:.3f}×"
    lines.append(
        f"| `hooks_per_feature` (extrapolated: {per_t['features']} features "
        f"× {D_SAE // per_t['features']}) | {per_t['extrapolated']:.1f} | – | – | "
        f"{per_t['other']:.1f} | {ratio} | {r['diff_per_feature']:.1e} |"
    )
    verdict = "PASS" if spec_t["median"] <= 0.5 * hooks_t["median"] else "FAIL"
    lines += [
        "",
        f"`hooks_batched` batch sizes, a trial of {r['trial']} features each, extrapolated to "
        f"{D_SAE}: {trials}.",
        f"All values equal within 1e-4 × max |ld| = {r['tolerance']:.1e}: {r['equal']}. "
        f"Inactive features: {r['inactive_distinct']} distinct value in specsight, "
        f"{r['inactive_vs_base']:.1e} from its base invoke (a 1-row forward); in the hooks "
        f"bit-equal to a hook-free forward of the same batch: {r['hooks_inactive_exact']}.",
        f"Target specsight ≤ 0.5 × `hooks_batched` (medians): {verdict}.",
        END,
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method")
    parser.add_argument(
        "--batch",
        default="32,64,128,256",
        help="hooks_batched batch sizes to try (comma-separated); the fastest is timed",
    )
    parser.add_argument("--trial", type=int, default=512, help="features per batch-size trial")
    parser.add_argument("--per-feature", type=int, default=128, help="hooks_per_feature subset")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=120.0,
        help="before each timed run, wait up to this many seconds for idle CPUs (0: never)",
    )
    parser.add_argument("--no-readme", action="store_true")
    return parser.parse_args()


def measure(
    lm: Any, sae: Sae, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Timing], dict[str, Any]]:
    """The batch trial, then specsight and the batched hooks interleaved, then the
    per-feature subset: (last results per method, timings, facts for the report)."""
    batches = [int(b) for b in args.batch.split(",")]
    print("hooks_batched: batch sizes")
    per_feature = pick_batch(lm, sae, batches, args.trial)
    batch = min(per_feature, key=per_feature.__getitem__)
    every = torch.arange(D_SAE)
    spec = spec_for(sae)
    methods: dict[str, Callable[[], Any]] = {
        "specsight": lambda: run_specsight(lm, spec),
        "hooks_batched": lambda: hooks_sweep(lm, sae, every, batch),
    }
    run_specsight(lm, spec)  # warm-up (the trial warmed the hooks up)
    results: dict[str, Any] = {}
    times = {name: Timing([], [], []) for name in methods}
    for i in range(args.repeats):  # interleaved, so a busy moment hits every method alike
        for name, method in methods.items():
            if args.wait_idle:
                wait_idle(args.wait_idle)
            results[name], wall, cpu, other = timed(method)
            times[name].wall.append(wall)
            times[name].cpu.append(cpu)
            times[name].other.append(other)
            print(f"  run {i + 1}: {name} {wall:.2f} s, CPU {cpu:.2f} s, others {other:.1f} cores")
    subset = torch.arange(0, D_SAE, D_SAE // args.per_feature)
    if args.wait_idle:
        wait_idle(args.wait_idle)
    results["hooks_per_feature"], wall, _, other = timed(lambda: hooks_sweep(lm, sae, subset, 1))
    per = {"features": len(subset), "seconds": wall, "extrapolated": wall * D_SAE / len(subset)}
    facts = {"batch": batch, "batch_trial": per_feature, "subset": subset}
    facts["hooks_per_feature"] = {**per, "other": other}
    return results, times, facts


def check(
    lm: Any, results: dict[str, Any], active: torch.Tensor, batch: int, subset: torch.Tensor
) -> dict[str, Any]:
    """How far the hooks' values are from specsight's, and what inactive features give."""
    ours, base = results["specsight"]
    batched = results["hooks_batched"]
    tolerance = 1e-4 * float(ours.abs().max())
    diff_batched = float((batched - ours).abs().max())
    diff_per = float((results["hooks_per_feature"] - ours[subset]).abs().max())
    inactive = ours[~active]
    inactive_vs_base = float((inactive - base).abs().max())
    quiet = (~active).nonzero().squeeze(-1)  # row r of each chunk against row r of a base run
    hooks_exact = bool((batched[quiet] == hooks_base(lm, batch)[quiet % batch]).all())
    distinct = len(inactive.unique())
    return {
        "base": base,
        "ld_min": float(ours.min()),
        "ld_max": float(ours.max()),
        "tolerance": tolerance,
        "diff_batched": diff_batched,
        "diff_per_feature": diff_per,
        "inactive_distinct": distinct,
        "inactive_vs_base": inactive_vs_base,
        "hooks_inactive_exact": hooks_exact,
        "equal": max(diff_batched, diff_per, inactive_vs_base) <= tolerance and distinct == 1,
        "ld": ours.tolist(),
    }


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import specsight
    from specsight.models.load import load_model

    lm = load_model(MODEL, device="cpu")
    ids = torch.tensor([lm.tokenizer.encode(PROMPT)])
    load_before = load_1min()
    with tempfile.TemporaryDirectory(prefix="sae_sweep_") as folder:
        resid = residual(lm, ids)
        sae = write_sae(Path(folder), resid)
        active = sae.encode(resid[-1]) > 0
        print(f"{int(active.sum())} of {D_SAE} features active at the last position")
        results, times, facts = measure(lm, sae, args)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python bench/sae_feature_sweep.py", *sys.argv[1:]]),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "specsight_version": specsight.__version__,
        "load_before": load_before,
        "load_after": load_1min(),
        "repeats": args.repeats,
        "active": int(active.sum()),
        "batch": facts["batch"],
        "trial": args.trial,
        "batch_trial": facts["batch_trial"],
        "specsight": _timing(times["specsight"]),
        "hooks_batched": _timing(times["hooks_batched"]),
        "hooks_per_feature": facts["hooks_per_feature"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    report.update(check(lm, results, active, facts["batch"], facts["subset"]))
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    block = table(report)
    print(block)
    if not args.no_readme:
        replace_section(START, END, block, heading=HEADING)
    return 0 if report["equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
