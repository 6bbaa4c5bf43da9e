"""Correctness of specsight on a GPU: the golden specs on tiny models, CUDA against the CPU.

The cases are those of ``tests/test_golden.py``: every example spec of ``specs/`` (but the two
steering ones, which need the built-in model) and every tiny-model twin in
``tests/golden/specs/``, each on ``tiny-llama`` and ``tiny-gpt2`` (``--models`` picks others),
``expect`` removed (its claims are about the built-in model); an example written for a tiny model
of its own (``vit_patching``: ``tiny-vit``, images beside the spec) runs on that model only.
Each case runs through the public
API (``specsight.load_spec`` of the spec dict with ``model.device`` / ``model.dtype`` set, then
``specsight.run``) in these configurations:

* ``cpu/float32``: the reference;
* ``<device>/float32`` and ``<device>/bfloat16``;
* ``<device>/bfloat16/max_batch=1``: one row per forward, compared with the CPU reference and
  with the batched ``<device>/bfloat16`` run (what batching alone changes in bf16).

For every result tensor: the largest absolute difference from the reference (and the
reference's largest magnitude, for scale); integer tensors (generated ids, top-k ids) count
their differing elements instead; NaN (padding of saves) must sit at the same places. A
configuration that raises is recorded with its error; the script goes on. The JSON goes to
``--out`` after every case; a table goes to stdout.

    python bench/cuda_check.py --out /tmp/cuda_check.json                 # device cuda
    python bench/cuda_check.py --device cpu --out /tmp/cpu_check.json     # a self-test
    python bench/cuda_check.py --models tiny-llama,tiny-qwen3,tiny-mamba --specs ioi_patching
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
TINY_SPECS = ROOT / "tests" / "golden" / "specs"
#: the example specs that need the built-in model (layer 6, its vocabulary): twins replace them
SKIP = ("steering_add", "steering_generate")
DEFAULT_MODELS = "tiny-llama,tiny-gpt2"


def spec_paths(names: str | None) -> list[Path]:
    paths = [p for p in sorted(SPECS.glob("*.yaml")) if p.stem not in SKIP]
    paths += sorted(TINY_SPECS.glob("*.yaml"))
    if names:
        wanted = {n.strip() for n in names.split(",") if n.strip()}
        paths = [p for p in paths if p.stem in wanted]
    return paths


def own_model(path: Path) -> str | None:
    """The tiny model an example of ``specs/`` was written for (e.g. ``tiny-vit``: images), run
    on that model only, as ``tests/test_golden.py`` does; None for the others."""
    if path.parent != SPECS:
        return None
    ref = yaml.safe_load(path.read_text()).get("model")
    model = ref.get("id") if isinstance(ref, dict) else ref
    return model if isinstance(model, str) and model.startswith("tiny-") else None


def cases(paths: list[Path], models: list[str]) -> list[tuple[Path, str]]:
    """(spec, model) pairs, model-major (a run cut short has every spec of the first model);
    the examples with their own tiny model come after the first model's block."""
    shared = [p for p in paths if own_model(p) is None]
    own = [(p, own_model(p) or "") for p in paths if own_model(p) is not None]
    out = [(p, m) for m in models[:1] for p in shared] + own
    return out + [(p, m) for m in models[1:] for p in shared]


def _absolute_files(value: Any, base: Path) -> Any:
    """Relative image paths made absolute (a spec given as a dict has no folder of its own)."""
    if isinstance(value, str) and not Path(value).is_absolute():
        return str(base / value)
    if isinstance(value, list):
        return [_absolute_files(v, base) for v in value]
    return value


def spec_dict(path: Path, model: str, device: str, dtype: str) -> dict[str, Any]:
    """The spec of ``path`` for ``model`` on ``device`` in ``dtype``, without ``expect``."""
    data = yaml.safe_load(path.read_text())
    ref = data.get("model")
    ref = dict(ref) if isinstance(ref, dict) else {}
    ref.update(id=model, device=device, dtype=dtype)
    data["model"] = ref
    data.pop("expect", None)
    for invoke in (data.get("invokes") or {}).values():
        if isinstance(invoke, dict) and "image" in invoke:
            invoke["image"] = _absolute_files(invoke["image"], path.parent)
    return data


def run_config(path: Path, model: str, device: str, dtype: str, max_batch: int | None) -> Any:
    import specsight

    spec = specsight.load_spec(spec_dict(path, model, device, dtype))
    kwargs = {} if max_batch is None else {"max_batch": max_batch}
    return specsight.run(spec, **kwargs)


def compare(tensor: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """How ``tensor`` differs from ``ref`` (both on the CPU after the run)."""
    out: dict[str, Any] = {
        "shape": list(ref.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
    }
    if tuple(tensor.shape) != tuple(ref.shape):
        out["error"] = f"shape {list(tensor.shape)} != reference {list(ref.shape)}"
        return out
    if not ref.dtype.is_floating_point and not tensor.dtype.is_floating_point:
        differ = int((tensor.cpu() != ref.cpu()).sum())
        out.update(kind="int", differing=differ, elements=ref.numel())
        return out
    a, b = tensor.detach().cpu().double(), ref.detach().cpu().double()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    both = ~(nan_a | nan_b)
    diff = (a[both] - b[both]).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    ref_max = float(b[both].abs().max()) if both.any() else 0.0
    out.update(
        kind="float",
        max_abs_diff=max_abs,
        ref_max_abs=ref_max,
        # relative to the tensor's scale: ratio metrics (recovery) have large values anyway
        max_rel_diff=max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf),
        nan_mismatch=int((nan_a != nan_b).sum()),
    )
    return out


def worst(tensors: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(the worst tensor's name, a short description) for the table."""
    if not tensors:
        return "-", "no tensors"
    broken = [n for n, t in tensors.items() if "error" in t or t.get("nan_mismatch")]
    if broken:
        t = tensors[broken[0]]
        return broken[0], t.get("error") or f"NaN at {t['nan_mismatch']} other places"
    floats = {n: t for n, t in tensors.items() if t["kind"] == "float"}
    ints = {n: t for n, t in tensors.items() if t["kind"] == "int" and t["differing"]}
    text = ""
    name = "-"
    if floats:
        name = max(floats, key=lambda n: floats[n]["max_abs_diff"])
        t = floats[name]
        text = f"{t['max_abs_diff']:.2e} (of |ref| ≤ {t['ref_max_abs']:.3g})"
    if ints:
        iname = next(iter(ints))
        text += f"; {iname}: {ints[iname]['differing']}/{ints[iname]['elements']} ids differ"
    return name, text or "equal"


def table_rows(case: dict[str, Any]) -> list[str]:
    rows = []
    for config, run in case["runs"].items():
        if config == "cpu/float32":
            continue
        if "error" in run:
            rows.append(
                f"{case['spec']:<24} {case['model']:<13} {config:<28} ERROR {_first_line(run['error'])}"
            )
            continue
        if "skipped" in run:
            continue
        for against, tensors in run["diffs"].items():
            name, text = worst(tensors)
            label = config if against == "cpu/float32" else f"{config} vs {against}"
            rows.append(f"{case['spec']:<24} {case['model']:<13} {label:<28} {name:<26} {text}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="the device to check against the CPU")
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma list of tiny models")
    p.add_argument("--specs", help="comma list of spec names (file stems); default: all")
    p.add_argument("--out", required=True, help="the JSON report (written after every case)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import specsight

    device = args.device
    configs: list[tuple[str, str, str, int | None]] = [
        ("cpu/float32", "cpu", "float32", None),
        (f"{device}/float32", device, "float32", None),
        (f"{device}/bfloat16", device, "bfloat16", None),
        (f"{device}/bfloat16/max_batch=1", device, "bfloat16", 1),
    ]
    if device == "cpu":  # the CPU float32 reference again: a self-test that must give 0
        configs[1] = ("cpu/float32/again", "cpu", "float32", None)
    #: a configuration compared with another besides the CPU reference
    also_against = {f"{device}/bfloat16/max_batch=1": f"{device}/bfloat16"}

    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "specsight": specsight.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    report: dict[str, Any] = {
        "benchmark": "cuda_check",
        "machine": machine,
        "configs": [c[0] for c in configs],
        "cases": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    print(f"{'spec':<24} {'model':<13} {'config':<28} {'worst tensor':<26} max abs diff")
    failures = 0
    for path, model in cases(spec_paths(args.specs), models):
        case: dict[str, Any] = {"spec": path.stem, "model": model, "runs": {}}
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for name, dev, dtype, max_batch in configs:
            if "error" in case["runs"].get("cpu/float32", {}):
                case["runs"][name] = {"skipped": "the CPU reference failed"}
                continue
            t0 = time.perf_counter()
            try:
                results = run_config(path, model, dev, dtype, max_batch)
            except Exception as exc:
                last = traceback.format_exc().strip().splitlines()[-3:]
                case["runs"][name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
                case["runs"][name]["traceback_tail"] = last
                failures += 1
                continue
            seconds = time.perf_counter() - t0
            tensors[name] = {k: v.detach().cpu() for k, v in results.tensors.items()}
            run: dict[str, Any] = {"time_s": round(seconds, 4), "diffs": {}}
            run["device"] = results.manifest.get("model", {}).get("device")
            for against in ("cpu/float32", also_against.get(name)):
                if against is None or name == against or against not in tensors:
                    continue
                ref = tensors[against]
                diffs = {
                    k: compare(v, ref[k]) if k in ref else {"error": "not in the reference"}
                    for k, v in tensors[name].items()
                }
                diffs |= {k: {"error": "missing here"} for k in ref if k not in tensors[name]}
                run["diffs"][against] = diffs
            case["runs"][name] = run
        for line in table_rows(case):
            print(line, flush=True)
        if "error" in case["runs"].get("cpu/float32", {}):
            err = _first_line(case["runs"]["cpu/float32"]["error"])
            print(f"{path.stem:<24} {model:<13} {'cpu/float32':<28} ERROR {err}", flush=True)
            print(f"{'':<24} {'':<13} (other configurations skipped)", flush=True)
        report["cases"].append(case)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
        os.replace(tmp, out)
    largest, largest_rel = _largest(report, "max_abs_diff"), _largest(report, "max_rel_diff")
    report["summary"] = {
        "failed_runs": failures,
        "largest_max_abs_diff": largest,
        "largest_max_rel_diff": largest_rel,
    }
    out.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    print(f"\n{failures} run(s) failed (reference failures included); over all cases:")
    print(f"  {'configuration':<44} {'max abs diff':>12} {'max rel diff':>12}")
    for config, value in largest.items():
        print(f"  {config:<44} {value:12.3e} {largest_rel.get(config, math.nan):12.3e}")
    print(f"wrote {out}")
    return 0


def _largest(report: dict[str, Any], field: str) -> dict[str, float]:
    """Per configuration (and comparison), the largest ``field`` over all cases."""
    found: dict[str, float] = {}
    for case in report["cases"]:
        for config, run in case["runs"].items():
            for against, tensors in run.get("diffs", {}).items():
                key = config if against == "cpu/float32" else f"{config} vs {against}"
                for t in tensors.values():
                    value = t.get(field)
                    if value is not None and not math.isnan(value):
                        found[key] = max(found.get(key, 0.0), value)
    return found


def _first_line(text: str, width: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _json_default(value: Any) -> Any:
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
