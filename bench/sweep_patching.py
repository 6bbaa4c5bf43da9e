"""Benchmark of issue 3: an IOI residual-stream activation-patching sweep, five ways.

Every (layer, position) cell of the corrupted prompt gets the clean prompt's decoder-layer output
at that one position, and the metric is logit(" Mary") - logit(" John") at the last position.
On ``smollm2-135m`` that is 30 layers x 14 positions = 420 cells. The methods:

* ``hooks_per_cell`` (a): hand-written torch forward hooks, one forward per cell;
* ``hooks_batched`` (b): hand-written hooks, 64 cells per forward (the reference);
* ``nnsight_per_cell`` (c): nnsight 0.8.1, one trace per cell, as its docs show;
* ``nnsight_per_layer`` (d): nnsight, one trace per layer, one invoke per position;
* ``specsight``: ``specsight.run`` on the spec of ``specs/ioi_patching.yaml``.

A second measurement, ``single_forward``, times one forward of the clean prompt that keeps all
layer outputs: specsight's ``save`` of ``resid_post.*`` against hooks appending to a list.

Each method runs in its own subprocess (``--method NAME --json-out FILE``), so peak RSS is per
method. Without ``--method`` the script is the orchestrator: it runs the methods, checks every
grid against (b), prints a table with PASS/FAIL lines for the targets, writes
``bench/results/sweep_patching_<device>.json`` and the table into ``bench/README.md``.

    python bench/sweep_patching.py                              # everything, CPU, SmolLM2
    python bench/sweep_patching.py --methods specsight --merge  # rerun specsight (and (b)) only
    python bench/sweep_patching.py --report                     # rebuild the table from the JSON
    python bench/sweep_patching.py --device cpu --model llama-small-random   # quick self-test
    python bench/sweep_patching.py --device cuda --model llama8b-random      # GPU, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from _common import (  # bench/ is on sys.path when a script runs
    RANDOM_LLAMAS,
    cpu_name,
    cpu_seconds,
    other_load,
    random_llama,
    replace_section,
    tokenizer_dir,
)

if TYPE_CHECKING:
    from specsight.models.load import LoadedModel

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
TARGET, FOIL = " Mary", " John"

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"

REFERENCE = "hooks_batched"
SWEEP_METHODS = (
    "hooks_per_cell",
    "hooks_batched",
    "hooks_kv_reuse",
    "nnsight_per_cell",
    "nnsight_per_layer",
    "specsight",
)
ALL_METHODS = (*SWEEP_METHODS, "single_forward")
ALIASES = {"a": "hooks_per_cell", "b": "hooks_batched", "c": "nnsight_per_cell"}
ALIASES |= {"d": "nnsight_per_layer", "e": "hooks_kv_reuse"}
LETTERS = {name: letter for letter, name in ALIASES.items()}
#: methods timed several times (median and min); the others run once
REPEATED = {"hooks_batched", "hooks_kv_reuse", "specsight"}
#: methods that --quick runs on the first QUICK_LAYERS layers only (time extrapolated)
QUICK_METHODS = {"hooks_per_cell", "nnsight_per_cell"}
QUICK_LAYERS = 3
#: the model each device benchmarks by default; other models are self-tests
DEFAULT_MODEL = {"cpu": "smollm2-135m", "cuda": "llama8b-random"}
TOLERANCE = 1e-4
#: other processes using more cores than this during a method make its timings suspect
BUSY_CORES = 0.2


# --------------------------------------------------------------------------- set-up


@dataclass
class Setup:
    """The model and the prompts, as every method needs them."""

    loaded: LoadedModel
    model_name: str
    device: str
    dtype: str
    clean_ids: torch.Tensor  # [1, T]
    corrupt_ids: torch.Tensor  # [1, T]
    target: int
    foil: int

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.loaded.model.model.layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_pos(self) -> int:
        return int(self.clean_ids.shape[1])


def _one_token(loaded: LoadedModel, text: str) -> int:
    ids = loaded.tokenizer.encode_plain(text)
    if len(ids) != 1:
        raise SystemExit(f"{text!r} is {len(ids)} tokens, not one")
    return ids[0]


def load_setup(model_name: str, device: str) -> Setup:
    """Load the model and tokenize the prompts."""
    from specsight.models.load import load_model

    if model_name in RANDOM_LLAMAS:
        loaded = random_llama(model_name, device)
    else:
        loaded = load_model(model_name, device=device)
    clean = loaded.tokenizer.encode(CLEAN)
    corrupt = loaded.tokenizer.encode(CORRUPT)
    if len(clean) != len(corrupt):
        raise SystemExit(f"the prompts have {len(clean)} and {len(corrupt)} tokens")
    dev = next(loaded.model.parameters()).device
    return Setup(
        loaded=loaded,
        model_name=model_name,
        device=str(dev),
        dtype=loaded.dtype,
        clean_ids=torch.tensor([clean], device=dev),
        corrupt_ids=torch.tensor([corrupt], device=dev),
        target=_one_token(loaded, TARGET),
        foil=_one_token(loaded, FOIL),
    )


def sync(setup: Setup) -> None:
    if setup.device.startswith("cuda"):
        torch.cuda.synchronize()


def empty_grid(setup: Setup) -> torch.Tensor:
    return torch.full((setup.n_layers, setup.n_pos), math.nan)


def logit_diff(setup: Setup, last_logits: torch.Tensor) -> torch.Tensor:
    """logit(target) - logit(foil) per row of ``last_logits`` [rows, vocab], as float32 CPU."""
    return (last_logits[:, setup.target] - last_logits[:, setup.foil]).float().cpu()


# --------------------------------------------------------------------------- hand-written hooks


def _hidden(output: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's output: a tensor (transformers 5) or a tuple."""
    return output if isinstance(output, torch.Tensor) else output[0]


@contextlib.contextmanager
def hooks(pairs: list[tuple[torch.nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Register forward hooks and remove them all on exit."""
    handles = [module.register_forward_hook(fn) for module, fn in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture_clean(setup: Setup) -> torch.Tensor:
    """Every decoder layer's output on the clean prompt: [n_layers, T, d_model]."""
    saved: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        saved.append(_hidden(output)[0])

    with torch.inference_mode(), hooks([(layer, keep) for layer in setup.layers]):
        setup.model(input_ids=setup.clean_ids)
    return torch.stack(saved)


def _patcher(rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> Callable:
    """A hook writing ``values`` [n, d] into the output at (rows[i], positions[i])."""

    def patch(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        _hidden(output)[rows, positions] = values
        return output

    return patch


def hooks_per_cell(setup: Setup, layer_ids: list[int]) -> torch.Tensor:
    """(a) One forward per cell; the clean activations come from one hooked clean run."""
    clean = capture_clean(setup)
    grid = empty_grid(setup)
    one_row = torch.zeros(1, dtype=torch.long, device=clean.device)
    with torch.inference_mode():
        for layer in layer_ids:
            for pos in range(setup.n_pos):
                where = torch.tensor([pos], device=clean.device)
                patch = _patcher(one_row, where, clean[layer, where])
                with hooks([(setup.layers[layer], patch)]):
                    logits = setup.model(input_ids=setup.corrupt_ids, logits_to_keep=1).logits
                grid[layer, pos] = logit_diff(setup, logits[:, -1])[0]
    return grid


def hooks_batched(setup: Setup, layer_ids: list[int], chunk: int = 64) -> torch.Tensor:
    """(b) ``chunk`` cells per forward, one hook per layer present in a chunk patching its rows."""
    clean = capture_clean(setup)
    device = clean.device
    cells = torch.tensor([(layer, pos) for layer in layer_ids for pos in range(setup.n_pos)])
    grid = empty_grid(setup)
    with torch.inference_mode():
        for part in cells.split(chunk):
            part_dev = part.to(device)
            patches = []
            for layer in part[:, 0].unique().tolist():
                rows = (part_dev[:, 0] == layer).nonzero().squeeze(1)
                positions = part_dev[rows, 1]
                patches.append(
                    (setup.layers[layer], _patcher(rows, positions, clean[layer, positions]))
                )
            ids = setup.corrupt_ids.expand(len(part), -1)
            with hooks(patches):
                logits = setup.model(input_ids=ids, logits_to_keep=1).logits
            grid[part[:, 0], part[:, 1]] = logit_diff(setup, logits[:, -1])
    return grid


def hooks_kv_reuse(setup: Setup, layer_ids: list[int]) -> torch.Tensor:
    """(e) An expert's hand-written causal reuse: a patch at position p changes nothing before
    p, so for each p the corrupted prefix [0, p) runs once into a KV cache, and the cells of p
    (one row per layer) run over positions p.. only, reading that cache."""
    from transformers import DynamicCache

    clean = capture_clean(setup)
    grid = empty_grid(setup)
    device = clean.device
    rows = torch.arange(len(layer_ids), device=device)
    with torch.inference_mode():
        for pos in range(setup.n_pos):
            cache = DynamicCache()
            if pos > 0:
                setup.model(input_ids=setup.corrupt_ids[:, :pos], past_key_values=cache)
                cache.batch_repeat_interleave(len(layer_ids))
            ids = setup.corrupt_ids[:, pos:].expand(len(layer_ids), -1)
            at = torch.zeros(1, dtype=torch.long, device=device)  # local position 0 is p
            patches = [
                (setup.layers[layer], _patcher(rows[i : i + 1], at, clean[layer, pos : pos + 1]))
                for i, layer in enumerate(layer_ids)
            ]
            with hooks(patches):
                logits = setup.model(
                    input_ids=ids, past_key_values=cache if pos > 0 else None, logits_to_keep=1
                ).logits
            grid[layer_ids, pos] = logit_diff(setup, logits[:, -1])
    return grid


def hooks_save_all(setup: Setup) -> list[torch.Tensor]:
    """One clean forward keeping every decoder layer's output (for ``single_forward``)."""
    saved: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        saved.append(_hidden(output))

    with torch.inference_mode(), hooks([(layer, keep) for layer in setup.layers]):
        setup.model(input_ids=setup.clean_ids)
    return saved


# --------------------------------------------------------------------------- nnsight


def nnsight_model(setup: Setup) -> Any:
    """The loaded model wrapped by nnsight, with SmolLM2's Hugging Face tokenizer."""
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    for prompt, ids in ((CLEAN, setup.clean_ids), (CORRUPT, setup.corrupt_ids)):
        if tokenizer(prompt)["input_ids"] != ids[0].tolist():
            raise SystemExit("the Hugging Face tokenizer disagrees with specsight's")
    return TransformersModel(setup.model, task="text-generation", tokenizer=tokenizer)


def nnsight_clean(model: Any, n_layers: int) -> list[Any]:
    """The clean run in one trace, saving every layer output."""
    clean: list[Any] = []
    with model.trace(CLEAN):
        for layer in range(n_layers):
            clean.append(model.model.layers[layer].output.save())
    return clean


def nnsight_diff(setup: Setup, model: Any) -> Any:
    """Inside a trace: the saved logit difference at the last position.

    The difference is computed inside the trace: saving ``logits[:, -1]`` would save a view that
    keeps the whole [rows, T, vocab] logits tensor alive (2.75 MB per cell here, 1.1 GB in all).
    """
    last = model.output.logits[:, -1]
    return (last[:, setup.target] - last[:, setup.foil]).save()


def nnsight_per_cell(setup: Setup, layer_ids: list[int], model: Any) -> torch.Tensor:
    """(c) One trace per cell. A Llama layer's output is a tensor: index ``[:, pos]``."""
    clean = nnsight_clean(model, setup.n_layers)
    saved: list[Any] = []
    for layer in layer_ids:
        for pos in range(setup.n_pos):
            with model.trace(CORRUPT):
                model.model.layers[layer].output[:, pos] = clean[layer][:, pos]
                saved.append(nnsight_diff(setup, model))
    return _fill(setup, layer_ids, saved)


def nnsight_per_layer(setup: Setup, layer_ids: list[int], model: Any) -> torch.Tensor:
    """(d) One trace per layer with one invoke per position."""
    clean = nnsight_clean(model, setup.n_layers)
    saved: list[Any] = []
    for layer in layer_ids:
        with model.trace() as tracer:
            for pos in range(setup.n_pos):
                with tracer.invoke(CORRUPT):
                    model.model.layers[layer].output[:, pos] = clean[layer][:, pos]
                    saved.append(nnsight_diff(setup, model))
    return _fill(setup, layer_ids, saved)


def _fill(setup: Setup, layer_ids: list[int], saved: list[Any]) -> torch.Tensor:
    """A grid from logit differences saved in (layer, position) order."""
    grid = empty_grid(setup)
    diffs = torch.cat([torch.as_tensor(d).reshape(-1) for d in saved]).float().cpu()
    grid[layer_ids] = diffs.reshape(len(layer_ids), setup.n_pos)
    return grid


# --------------------------------------------------------------------------- specsight


def _spec_header(setup: Setup) -> dict[str, Any]:
    return {
        "specsight": 1,
        "name": "bench-ioi-resid-patching",
        "model": {"id": setup.model_name, "dtype": setup.dtype},
    }


def patching_spec(setup: Setup) -> dict[str, Any]:
    """specs/ioi_patching.yaml without its baseline metrics."""
    patch = {"op": "patch", "site": "resid_post.{layer}", "positions": ["{pos}"], "from": "clean"}
    corrupt = {"prompt": CORRUPT, "sweep": {"layer": "all", "pos": "all"}, "ops": [patch]}
    metric = {"kind": "logit_diff", "invoke": "corrupt", "target": TARGET, "foil": FOIL}
    return {
        **_spec_header(setup),
        "invokes": {"clean": {"prompt": CLEAN}, "corrupt": corrupt},
        "metrics": {"logit_diff": metric},
    }


def warmup_spec(setup: Setup) -> dict[str, Any]:
    metric = {"kind": "logit_diff", "invoke": "clean", "target": TARGET, "foil": FOIL}
    return {
        **_spec_header(setup),
        "invokes": {"clean": {"prompt": CLEAN}},
        "metrics": {"logit_diff": metric},
    }


def save_all_spec(setup: Setup) -> dict[str, Any]:
    save = {"op": "save", "site": "resid_post.*"}
    return {**_spec_header(setup), "invokes": {"clean": {"prompt": CLEAN, "ops": [save]}}}


def run_specsight(setup: Setup, spec: dict[str, Any], max_batch: int | None) -> Any:
    import specsight

    kwargs = {} if max_batch is None else {"max_batch": max_batch}
    return specsight.run(spec, model=setup.loaded, **kwargs)


# --------------------------------------------------------------------------- one method


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def timed(setup: Setup, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(setup)
    start = time.perf_counter()
    value = fn()
    sync(setup)
    return time.perf_counter() - start, value


def sweep_runner(name: str, setup: Setup, args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    """Warm the method up with one small forward; return a function computing its grid."""
    quick = args.quick and name in QUICK_METHODS
    layer_ids = list(range(QUICK_LAYERS if quick else setup.n_layers))
    if name in ("hooks_per_cell", "hooks_batched", "hooks_kv_reuse"):
        with torch.inference_mode():
            setup.model(input_ids=setup.clean_ids)
        if name == "hooks_per_cell":
            return lambda: hooks_per_cell(setup, layer_ids)
        if name == "hooks_kv_reuse":
            return lambda: hooks_kv_reuse(setup, layer_ids)
        return lambda: hooks_batched(setup, layer_ids, args.chunk)
    if name in ("nnsight_per_cell", "nnsight_per_layer"):
        model = nnsight_model(setup)
        warm: list[Any] = []
        with model.trace(CLEAN):
            warm.append(model.output.logits[:, -1].save())
        fn = nnsight_per_cell if name == "nnsight_per_cell" else nnsight_per_layer
        return lambda: fn(setup, layer_ids, model)
    run_specsight(setup, warmup_spec(setup), args.max_batch)
    spec = patching_spec(setup)
    return lambda: run_specsight(setup, spec, args.max_batch)["logit_diff"].float().cpu()


def measure_sweep(name: str, setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    runner = sweep_runner(name, setup, args)
    warm = {"rss_after_warmup_mb": rss_mb(), "peak_rss_after_warmup_mb": peak_rss_mb()}
    repeats = args.repeats if name in REPEATED else 1
    times, grid = [], None
    for _ in range(repeats):
        seconds, grid = timed(setup, runner)
        times.append(seconds)
        print(f"  {name}: {seconds:.2f} s", file=sys.stderr, flush=True)
    assert grid is not None
    entry: dict[str, Any] = {**warm, "times_s": times, "median_s": statistics.median(times)}
    entry["min_s"] = min(times)
    layers_run = int((~grid.isnan()).any(dim=1).sum())
    if layers_run < setup.n_layers:  # --quick: scale up to the whole grid
        scale = setup.n_layers / layers_run
        entry.update(extrapolated=True, layers_run=layers_run, measured_s=entry["median_s"])
        entry["median_s"] *= scale
        entry["min_s"] *= scale
    entry["grid"] = [[None if math.isnan(v) else v for v in row] for row in grid.tolist()]
    return entry


def measure_single_forward(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Hooks vs specsight, one clean forward saving every layer output, interleaved repetitions."""
    spec = save_all_spec(setup)
    hook_saved = hooks_save_all(setup)
    results = run_specsight(setup, spec, args.max_batch)
    diff = max(
        (results[f"clean/resid_post.{i}"].float().cpu() - t[0].float().cpu()).abs().max().item()
        for i, t in enumerate(hook_saved)
    )
    hook_times, spec_times = [], []
    for _ in range(args.single_reps):
        hook_times.append(timed(setup, lambda: hooks_save_all(setup))[0])
        spec_times.append(timed(setup, lambda: run_specsight(setup, spec, args.max_batch))[0])
    return {
        "reps": args.single_reps,
        "hooks_median_s": statistics.median(hook_times),
        "hooks_min_s": min(hook_times),
        "specsight_median_s": statistics.median(spec_times),
        "specsight_min_s": min(spec_times),
        "max_abs_diff": diff,
    }


def child_main(args: argparse.Namespace) -> None:
    """Run one method in this process and write its JSON entry."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    setup = load_setup(args.model, args.device)
    sync(setup)
    entry: dict[str, Any] = {
        "method": args.method,
        "load_s": time.perf_counter() - start,
        "rss_after_load_mb": rss_mb(),
        "peak_rss_after_load_mb": peak_rss_mb(),
        "date": now(),
    }
    if setup.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start_cpu = cpu_seconds()
    if args.method == "single_forward":
        entry.update(measure_single_forward(setup, args))
    else:
        entry.update(measure_sweep(args.method, setup, args))
    entry["other_load_cores"] = other_load(start_cpu)
    entry["peak_rss_mb"] = peak_rss_mb()
    if setup.device.startswith("cuda"):
        entry["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    entry["config"] = {"model": args.model, "device": setup.device, "dtype": setup.dtype}
    entry["config"] |= {"n_layers": setup.n_layers, "n_pos": setup.n_pos}
    entry["config"]["torch_threads"] = torch.get_num_threads()
    Path(args.json_out).write_text(json.dumps(entry) + "\n")


# --------------------------------------------------------------------------- orchestrator


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine_info(device: str) -> dict[str, Any]:
    import transformers

    import specsight

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nnsight": _version("nnsight"),
        "specsight": specsight.__version__,
        "date": now(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def run_child(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one method in a fresh interpreter and return its JSON entry."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "entry.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--method", method]
        cmd += ["--json-out", str(out), "--device", args.device, "--model", args.model]
        cmd += ["--chunk", str(args.chunk), "--repeats", str(args.repeats)]
        cmd += ["--single-reps", str(args.single_reps)]
        if args.max_batch is not None:
            cmd += ["--max-batch", str(args.max_batch)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        print(f"running {method} ...", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(cmd, check=False, timeout=args.method_timeout)
        except subprocess.TimeoutExpired:  # the child is killed before this is raised
            msg = f"{method} ran past --method-timeout {args.method_timeout:g} s"
            raise MethodFailed(msg) from None
        if done.returncode != 0:
            raise MethodFailed(f"{method} exited with status {done.returncode}")
        return json.loads(out.read_text())


class MethodFailed(RuntimeError):
    """A method's child process failed or ran too long."""


def wait_idle(max_wait_s: float) -> None:
    """Wait (at most ``max_wait_s``) until other processes leave the CPUs idle for 10 s."""
    import psutil

    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=10.0) / 100 * (os.cpu_count() or 1)
        if busy <= BUSY_CORES:
            return
        print(f"  waiting: other processes keep {busy:.1f} cores busy", file=sys.stderr)
    print("  still busy; running anyway", file=sys.stderr)


def parse_methods(
    text: str | None, device: str, run_all: bool, reuse_reference: bool = False
) -> list[str]:
    """Method names in run order; the reference (b) is always included (unless
    ``reuse_reference``: the stored (b) is kept).

    Without ``text``: every method in the table's order. With it: the order given, (b) first
    when it is missing (so partial results always hold the reference)."""
    if text is None:
        skip = {"nnsight_per_cell"} if device.startswith("cuda") and not run_all else set()
        return [m for m in ALL_METHODS if m not in skip]
    names = [ALIASES.get(t.strip(), t.strip()) for t in text.split(",") if t.strip()]
    unknown = set(names) - set(ALL_METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {ALL_METHODS}")
    if set(names) & set(SWEEP_METHODS) and REFERENCE not in names and not reuse_reference:
        names.insert(0, REFERENCE)
    return list(dict.fromkeys(names))


def max_abs_diff(grid: list[list[float | None]], reference: list[list[float | None]]) -> float:
    """Largest |grid - reference| over the cells both hold (``--quick`` grids are partial)."""
    pairs = [
        abs(a - b)
        for row, ref_row in zip(grid, reference)
        for a, b in zip(row, ref_row)
        if a is not None and b is not None
    ]
    return max(pairs, default=math.nan)


def strict(entries: dict[str, dict[str, Any]]) -> bool:
    """Agreement is enforced in float32 on the CPU only (bf16 batching changes the numbers)."""
    config = entries[REFERENCE]["config"]
    return config["dtype"] == "float32" and config["device"] == "cpu"


def label(name: str, entry: dict[str, Any]) -> str:
    letter = f" ({LETTERS[name]})" if name in LETTERS else ""
    return f"{name}{letter}{' †' if entry.get('extrapolated') else ''}"


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def sweep_table(entries: dict[str, dict[str, Any]]) -> list[str]:
    ref, slow = entries[REFERENCE], entries.get("nnsight_per_cell")
    cuda = "cuda_peak_mb" in ref
    head = "| method | median s | min s | × (b) | speed-up vs (c) | load s "
    head += "| RSS after load / warm-up MB "
    head += "| peak RSS MB | RSS × (b) |" + (" CUDA peak MB |" if cuda else "") + " max abs diff |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in SWEEP_METHODS:
        if name not in entries:
            continue
        e = entries[name]
        cells = [
            label(name, e),
            fmt(e["median_s"]),
            fmt(e["min_s"]),
            fmt(e["median_s"] / ref["median_s"]),
            fmt(slow["median_s"] / e["median_s"], 1) if slow else "–",
            fmt(e["load_s"]),
            f"{fmt(e['rss_after_load_mb'], 0)} / {fmt(e.get('rss_after_warmup_mb'), 0)}",
            fmt(e["peak_rss_mb"], 0),
            fmt(e["peak_rss_mb"] / ref["peak_rss_mb"]),
        ]
        if cuda:
            cells.append(fmt(e.get("cuda_peak_mb"), 0))
        cells.append(f"{e['max_abs_diff']:.2e}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def single_table(entry: dict[str, Any]) -> list[str]:
    ms = 1000.0
    return [
        "| single forward, save every layer output | median ms | min ms |",
        "|---|---|---|",
        f"| hand-written hooks | {fmt(entry['hooks_median_s'] * ms)} | "
        f"{fmt(entry['hooks_min_s'] * ms)} |",
        f"| specsight (`save resid_post.*`) | {fmt(entry['specsight_median_s'] * ms)} | "
        f"{fmt(entry['specsight_min_s'] * ms)} |",
    ]


def targets(entries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets that the methods present allow checking."""
    found: list[dict[str, Any]] = []
    ref, spec = entries.get(REFERENCE), entries.get("specsight")
    slow = entries.get("nnsight_per_cell")
    if ref and spec:
        ratio = spec["median_s"] / ref["median_s"]
        found.append({"target": "specsight time ≤ 0.8 × (b)", "value": ratio, "limit": 0.8})
        rss = spec["peak_rss_mb"] / ref["peak_rss_mb"]
        found.append({"target": "specsight peak RSS ≤ 1.3 × (b)", "value": rss, "limit": 1.3})
        # issue 27: at the compute limit
        found.append({"target": "specsight time ≤ 0.35 × (b) [issue 27]", "value": ratio, "limit": 0.35})  # fmt: skip
    reuse = entries.get("hooks_kv_reuse")
    if reuse and spec:
        ratio = spec["median_s"] / reuse["median_s"]
        found.append({"target": "specsight time ≤ 0.5 × (e) [issue 27]", "value": ratio, "limit": 0.5})  # fmt: skip
    if spec and slow:
        note = " [(c) extrapolated]" if slow.get("extrapolated") else ""
        speedup = slow["median_s"] / spec["median_s"]
        found.append({"target": f"specsight ≥ 5× faster than (c){note}", "value": speedup,
                      "limit": 5.0, "at_least": True})  # fmt: skip
    single = entries.get("single_forward")
    if single:
        limit = 1.05 * single["hooks_median_s"] + 0.005
        found.append({"target": "single forward: specsight ≤ 1.05 × hooks + 5 ms",
                      "value": single["specsight_median_s"], "limit": limit})  # fmt: skip
    for t in found:
        t["pass"] = t["value"] >= t["limit"] if t.get("at_least") else t["value"] <= t["limit"]
    return found


def target_lines(found: list[dict[str, Any]]) -> list[str]:
    return [
        f"{'PASS' if t['pass'] else 'FAIL'}: {t['target']} (got {t['value']:.3f}, "
        f"limit {t['limit']:.3f})"
        for t in found
    ]


def report_key(args: argparse.Namespace) -> str:
    """``cpu`` / ``cuda`` for the default model of a device, else ``<device>_<model>``."""
    device = "cuda" if args.device.startswith("cuda") else args.device
    key = device if DEFAULT_MODEL.get(device) == args.model else f"{device}_{args.model}"
    return key + ("_quick" if args.quick else "")


def report_markdown(report: dict[str, Any]) -> str:
    entries, machine, config = report["methods"], report["machine"], report["config"]
    hardware = machine.get("gpu") or f"{machine['cpu']}, {machine['cores_usable']} cores"
    lines = [
        f"Model `{config['model']}` ({config['dtype']}, {config['device']}), "
        f"{config['n_layers']} × {config['n_pos']} = {config['cells']} cells; {hardware}, "
        f"torch threads: {config.get('torch_threads', '?')}; "
        f"torch {machine['torch']}, transformers {machine['transformers']}, "
        f"nnsight {machine['nnsight']}, specsight {machine['specsight']}; {machine['date']}.",
        "",
    ]
    busy = max(e.get("other_load_cores", 0.0) for e in entries.values())
    if busy > BUSY_CORES:
        lines[0] += f" Other processes kept up to {busy:.1f} cores busy: timings are noisy."
    if REFERENCE in entries:
        lines += sweep_table(entries)
        if any(e.get("extrapolated") for e in entries.values()):
            lines.append(f"\n† extrapolated from the first {QUICK_LAYERS} layers (`--quick`).")
        lines.append("")
    if "single_forward" in entries:
        lines += [*single_table(entries["single_forward"]), ""]
    lines += ["```", *target_lines(report["targets"]), "```"]
    for name, reason in report.get("failed", {}).items():
        lines.append(f"\nNot measured: {name}: {reason}.")
    return "\n".join(lines)


def collect(
    args: argparse.Namespace,
    stored: dict[str, Any],
    failed: dict[str, str],
    save: Callable[[dict[str, dict[str, Any]]], None],
) -> dict[str, dict[str, Any]]:
    """Run the chosen methods, each in its own process, over the stored entries if merging.

    After each method ``save`` gets the entries so far. A failed method ends the run, unless
    ``--keep-going``: then its reason goes into ``failed`` and the next method runs."""
    reuse = args.reuse_reference and REFERENCE in stored.get("methods", {})
    if args.reuse_reference and not reuse:
        print("  no stored (b) to reuse: running it", file=sys.stderr, flush=True)
    methods = [] if args.report else parse_methods(args.methods, args.device, args.all, reuse)
    entries = dict(stored.get("methods", {})) if args.merge or args.report else {}
    if args.merge or args.report:
        failed.update({k: v for k, v in stored.get("failed", {}).items() if k not in methods})
    for method in methods:
        if args.wait_idle:
            wait_idle(args.wait_idle)
        try:
            entries[method] = run_child(method, args)
        except MethodFailed as exc:
            if not args.keep_going:
                raise SystemExit(f"FAILED: {exc}") from None
            print(f"FAILED: {exc}; going on", file=sys.stderr, flush=True)
            entries.pop(method, None)
            failed[method] = str(exc)
            continue
        failed.pop(method, None)
        busy = entries[method]["other_load_cores"]
        if busy > BUSY_CORES:
            print(f"  warning: other processes kept {busy:.1f} cores busy", file=sys.stderr)
        if method != methods[-1]:
            save(entries)
    if REFERENCE not in entries and "single_forward" not in entries:
        raise SystemExit("nothing measured")
    return entries


def check_agreement(entries: dict[str, dict[str, Any]]) -> bool:
    """Record each grid's largest difference from (b); False where one exceeds the tolerance."""
    if REFERENCE not in entries:
        return True
    ok, enforce = True, strict(entries)
    for name in SWEEP_METHODS:
        if name in entries:
            diff = max_abs_diff(entries[name]["grid"], entries[REFERENCE]["grid"])
            entries[name]["max_abs_diff"] = diff
            if enforce and not diff <= TOLERANCE:
                ok = False
                print(f"FAILED: {name} differs from (b) by {diff:.3g} > {TOLERANCE}")
    return ok


def build_report(
    args: argparse.Namespace,
    stored: dict[str, Any],
    entries: dict[str, dict[str, Any]],
    failed: dict[str, str],
) -> tuple[dict[str, Any], bool]:
    """The JSON report of ``entries`` and whether the grids agree with (b)."""
    ok = check_agreement(entries)
    first = entries.get(REFERENCE) or entries.get("single_forward") or next(iter(entries.values()))
    config = {**first["config"], "cells": first["config"]["n_layers"] * first["config"]["n_pos"]}
    machine = stored["machine"] if args.report and stored else machine_info(args.device)
    report = {
        "benchmark": "sweep_patching",
        "machine": machine,
        "config": config,
        "reference": REFERENCE,
        "tolerance": TOLERANCE if REFERENCE in entries and strict(entries) else None,
        "agree": ok,
        "methods": entries,
        "targets": targets(entries),
    }
    if failed:
        report["failed"] = dict(failed)
    return report, ok


def write_report(path: Path, report: dict[str, Any], out_dir: str | None) -> None:
    """Write the JSON report (atomically) and copy it into ``out_dir`` if given."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1) + "\n"
    targets_ = [path] + ([Path(out_dir) / path.name] if out_dir else [])
    for target in targets_:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


def orchestrate(args: argparse.Namespace) -> int:
    key = report_key(args)
    path = RESULTS_DIR / f"sweep_patching_{key}.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    failed: dict[str, str] = {}

    def save_partial(entries: dict[str, dict[str, Any]]) -> None:
        report, _ = build_report(args, stored, dict(entries), failed)
        write_report(path, {**report, "partial": True}, args.out_dir)
        print(f"  (partial results written to {path.name})", file=sys.stderr, flush=True)

    entries = collect(args, stored, failed, save_partial)
    report, ok = build_report(args, stored, entries, failed)
    markdown = report_markdown(report)
    print("\n" + markdown)
    write_report(path, report, args.out_dir)
    print(f"\nwrote {path.relative_to(BENCH_DIR.parent)}")
    if args.out_dir:
        print(f"copied it into {args.out_dir}")
    if not ok:
        print("FAILED: grids disagree with (b); README left unchanged", file=sys.stderr)
        return 1
    if args.readme or (args.readme is None and key in DEFAULT_MODEL):
        start, end = f"<!-- sweep_patching:{key}:start -->", f"<!-- sweep_patching:{key}:end -->"
        replace_section(
            start, end, f"{start}\n{markdown}\n{end}", heading=f"## sweep_patching, {key}\n\n"
        )
        print(f"updated {README.relative_to(BENCH_DIR.parent)} (sweep_patching:{key})")
    return 0


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=ALL_METHODS, help="run one method (child process)")
    p.add_argument("--json-out", help="where --method writes its JSON entry")
    p.add_argument("--methods", help="comma list: a,b,c,d,specsight,single_forward or full names")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--model", help="smollm2-135m (cpu default), llama8b-random (cuda default), "
                   "llama-small-random (self-test)")  # fmt: skip
    p.add_argument("--max-batch", type=int, help="specsight's max_batch (default: the library's)")
    p.add_argument("--chunk", type=int, default=64, help="cells per forward in (b)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of (b) and specsight")
    p.add_argument("--single-reps", type=int, default=20, help="repetitions of single_forward")
    p.add_argument("--quick", action="store_true", help="(a), (c): first 3 layers, extrapolated")
    p.add_argument("--all", action="store_true", help="on cuda, also run nnsight_per_cell")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each method, wait up to S s for the CPUs to be idle")  # fmt: skip
    p.add_argument("--keep-going", action="store_true",
                   help="a failed method is recorded in the JSON and the next one runs")  # fmt: skip
    p.add_argument("--method-timeout", type=float, metavar="S",
                   help="kill a method's process after S s (a failure)")  # fmt: skip
    p.add_argument("--out-dir", help="also write the JSON report into this folder, after each "
                   "method (partial) and at the end")  # fmt: skip
    p.add_argument("--merge", action="store_true",
                   help="keep the stored results of methods not rerun")  # fmt: skip
    p.add_argument("--reuse-reference", action="store_true",
                   help="with --merge: keep the stored (b) instead of rerunning it (saves a "
                   "model load; same machine and session only)")  # fmt: skip
    p.add_argument("--report", action="store_true",
                   help="run nothing: rebuild the table from the stored JSON")  # fmt: skip
    p.add_argument("--readme", action=argparse.BooleanOptionalAction,
                   help="write the table into bench/README.md (default: only for a full run "
                   "of the device's default model)")  # fmt: skip
    args = p.parse_args(argv)
    device = "cuda" if args.device.startswith("cuda") else args.device
    if args.model is None:
        args.model = DEFAULT_MODEL.get(device, "smollm2-135m")
    if args.method and not args.json_out:
        p.error("--method needs --json-out")
    if args.reuse_reference and not args.merge:
        p.error("--reuse-reference needs --merge")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.method:
        child_main(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
