"""Benchmark of issue 13: residual patching over a dataset, 64 IOI items x 30 layers x 14 positions.

For every item of ``specs/data/ioi.jsonl`` (64 rows: clean, corrupt, io, s), every decoder layer
L and every position p of its corrupt prompt, the clean prompt's (same item) layer-L output at p
replaces the corrupt one, and the metric is logit(io) - logit(s) at the last position. On
``smollm2-135m`` (float32, CPU) that is 30 x 14 x 64 = 26,880 patched rows; the grid is
[layer, pos, item] (and its mean over items [layer, pos]). The methods:

* ``hooks_batched`` (b): hand-written forward hooks, 64 rows per forward (the reference);
* ``nnsight_per_layer`` (d): nnsight 0.8.1, per item one clean trace, then one trace per layer
  with one invoke per position (``--quick``: the first items only, time extrapolated);
* ``specsight``: ``specsight.run`` on a dataset spec (``sweep: {layer: all, pos: all}``);
* ``specsight_mean``: the same spec with ``reduce: mean`` on the metric.

A second measurement, ``stream``, runs a one-invoke ``logit_diff`` spec with ``reduce: mean``
over N inline rows on ``tiny-llama`` (N = 1k, 10k, 100k, each in its own process) and records
peak RSS and seconds, to see whether memory stays flat in the number of rows.

Each method runs in its own subprocess (``--method NAME --json-out FILE``), so peak RSS is per
method. Without ``--method`` the script is the orchestrator: it runs the methods, checks every
grid against (b) (within 1e-4), prints the table, writes
``bench/results/dataset_patching_cpu.json`` and the section of ``bench/README.md``.

    python bench/dataset_patching.py                   # everything (about 45 min on 2 cores)
    python bench/dataset_patching.py --quick           # nnsight on 4 items, extrapolated (†)
    python bench/dataset_patching.py --methods specsight --merge   # rerun specsight and (b)
    python bench/dataset_patching.py --report          # rebuild the table from the JSON
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from _common import replace_section, tokenizer_dir  # bench/ is on sys.path when a script runs
from sweep_patching import (
    BUSY_CORES,
    TOLERANCE,
    MethodFailed,
    _hidden,
    _patcher,
    cpu_seconds,
    fmt,
    hooks,
    machine_info,
    now,
    other_load,
    peak_rss_mb,
    rss_mb,
    wait_idle,
    write_report,
)

if TYPE_CHECKING:
    from specsight.models.load import LoadedModel

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DATASET = BENCH_DIR.parent / "specs" / "data" / "ioi.jsonl"
SPECSIGHT_DIR = BENCH_DIR.parent / "specsight"
MODEL = "smollm2-135m"
STREAM_MODEL = "tiny-llama"

REFERENCE = "hooks_batched"
GRID_METHODS = ("hooks_batched", "nnsight_per_layer", "specsight", "specsight_mean")
ALIASES = {"b": "hooks_batched", "d": "nnsight_per_layer"}
LETTERS = {name: letter for letter, name in ALIASES.items()}
STREAM_ROWS = (1_000, 10_000, 100_000, 300_000)
#: single tokens for tiny-llama's tokenizer (and SmolLM2's)
NAMES = (" Mary", " John", " Tom", " Anna", " Bob", " Alice")
#: nnsight_per_layer with --quick: the first QUICK_ITEMS items, time scaled to all items
QUICK_ITEMS = 4
#: the issue's target: specsight's time at most this fraction of (b)'s
TARGET_RATIO = 0.4
README_START, README_END = (
    "<!-- dataset_patching:cpu:start -->",
    "<!-- dataset_patching:cpu:end -->",
)
HEADING = "## `dataset_patching.py`: patching over a dataset (issue 13)\n\n"


# --------------------------------------------------------------------------- set-up


@dataclass
class Data:
    """The model and the tokenized dataset."""

    loaded: LoadedModel
    rows: list[dict[str, Any]]
    clean_ids: torch.Tensor  # [items, T]
    corrupt_ids: torch.Tensor  # [items, T]
    target: torch.Tensor  # [items] token of io
    foil: torch.Tensor  # [items] token of s

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.loaded.model.model.layers

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, positions, items): the grid's shape."""
        return len(self.layers), int(self.clean_ids.shape[1]), len(self.rows)


def load_data(n_items: int | None = None) -> Data:
    """Load the model and tokenize the first ``n_items`` rows (all when None); all prompts must
    have one length."""
    from specsight.models.load.loader import load_model

    loaded = load_model(MODEL, dtype="float32", device="cpu")
    rows = [json.loads(line) for line in DATASET.read_text().splitlines() if line.strip()]
    rows = rows[:n_items] if n_items else rows
    tok = loaded.tokenizer
    clean = [tok.encode(r["clean"]) for r in rows]
    corrupt = [tok.encode(r["corrupt"]) for r in rows]
    if len({len(ids) for ids in clean + corrupt}) != 1:
        raise SystemExit("the prompts of the dataset differ in length")
    names = {name: tok.encode_plain(name) for r in rows for name in (r["io"], r["s"])}
    if any(len(ids) != 1 for ids in names.values()):
        raise SystemExit("an io or s name is not a single token")
    return Data(
        loaded=loaded,
        rows=rows,
        clean_ids=torch.tensor(clean),
        corrupt_ids=torch.tensor(corrupt),
        target=torch.tensor([names[r["io"]][0] for r in rows]),
        foil=torch.tensor([names[r["s"]][0] for r in rows]),
    )


# --------------------------------------------------------------------------- (b) hooks


def capture_clean(data: Data) -> torch.Tensor:
    """Every decoder layer's output on every clean prompt, one forward: [L, items, T, d]."""
    saved: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        saved.append(_hidden(output))

    with torch.inference_mode(), hooks([(layer, keep) for layer in data.layers]):
        data.model(input_ids=data.clean_ids)
    return torch.stack(saved)


def hooks_batched(data: Data, chunk: int = 64) -> torch.Tensor:
    """(b) Rows (layer, pos, item) in chunks of ``chunk`` per forward; in each chunk one hook per
    layer present writes the clean values into its rows with index tensors. [L, T, items]."""
    clean = capture_clean(data)
    n_layers, n_pos, n_items = data.shape
    cells = torch.cartesian_prod(
        torch.arange(n_layers), torch.arange(n_pos), torch.arange(n_items)
    )  # the grid's row-major order
    diffs: list[torch.Tensor] = []
    with torch.inference_mode():
        for part in cells.split(chunk):
            layer, pos, item = part.unbind(1)
            patches = []
            for index in layer.unique().tolist():
                rows = (layer == index).nonzero().squeeze(1)
                values = clean[index, item[rows], pos[rows]]
                patches.append((data.layers[index], _patcher(rows, pos[rows], values)))
            with hooks(patches):
                out = data.model(input_ids=data.corrupt_ids[item], logits_to_keep=1)
            last = out.logits[:, -1]
            diff = last.gather(1, data.target[item, None]) - last.gather(1, data.foil[item, None])
            diffs.append(diff.squeeze(1).float())
    return torch.cat(diffs).reshape(n_layers, n_pos, n_items)


# --------------------------------------------------------------------------- (d) nnsight


def nnsight_model(data: Data) -> Any:
    """The loaded model wrapped by nnsight, with SmolLM2's Hugging Face tokenizer (checked to
    tokenize every prompt as specsight does)."""
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    for i, row in enumerate(data.rows):
        for key, ids in (("clean", data.clean_ids), ("corrupt", data.corrupt_ids)):
            if tokenizer(row[key])["input_ids"] != ids[i].tolist():
                raise SystemExit(f"item {i}: the Hugging Face tokenizer disagrees with specsight")
    return TransformersModel(data.model, task="text-generation", tokenizer=tokenizer)


def nnsight_per_layer(data: Data, model: Any, n_run: int) -> torch.Tensor:
    """(d) For each of the first ``n_run`` items: one trace saving every layer's output on the
    clean prompt, then one trace per layer with one invoke per position, each saving the logit
    difference computed inside the trace. Items not run stay NaN."""
    n_layers, n_pos, n_items = data.shape
    grid = torch.full((n_layers, n_pos, n_items), math.nan)
    for i in range(n_run):
        row, target, foil = data.rows[i], int(data.target[i]), int(data.foil[i])
        clean: list[Any] = []
        with model.trace(row["clean"]):
            for layer in range(n_layers):
                clean.append(model.model.layers[layer].output.save())
        saved: list[Any] = []
        for layer in range(n_layers):
            with model.trace() as tracer:
                for pos in range(n_pos):
                    with tracer.invoke(row["corrupt"]):
                        model.model.layers[layer].output[:, pos] = clean[layer][:, pos]
                        last = model.output.logits[:, -1]
                        saved.append((last[:, target] - last[:, foil]).save())
        diffs = torch.cat([torch.as_tensor(d).reshape(-1) for d in saved]).float()
        grid[:, :, i] = diffs.reshape(n_layers, n_pos)
    return grid


# --------------------------------------------------------------------------- specsight


def _header(model: str) -> dict[str, Any]:
    return {"specsight": 1, "model": {"id": model, "dtype": "float32"}}


def dataset_spec(reduce: bool, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The issue's spec: clean and a swept, patched corrupt invoke per item, ``logit_diff``;
    over ``rows`` inline when given (``--items``), else over the dataset file."""
    patch = {"op": "patch", "site": "resid_post.{layer}", "positions": ["{pos}"], "from": "clean"}
    patched = {"prompt": "{corrupt}", "sweep": {"layer": "all", "pos": "all"}, "ops": [patch]}
    metric = {"kind": "logit_diff", "invoke": "patched", "target": "{io}", "foil": "{s}"}
    if reduce:
        metric["reduce"] = "mean"
    return {
        **_header(MODEL),
        # absolute: a dict's relative paths resolve against the working directory
        "dataset": {"rows": rows} if rows else {"file": str(DATASET)},
        "invokes": {"clean": {"prompt": "{clean}"}, "patched": patched},
        "metrics": {"ld": metric},
    }


def warmup_spec(model: str, rows: list[dict[str, Any]], prompt: str) -> dict[str, Any]:
    """One invoke over ``rows`` with a ``logit_diff`` metric reduced to its mean."""
    metric = {"kind": "logit_diff", "invoke": "a", "target": "{io}", "foil": "{s}"}
    return {
        **_header(model),
        "dataset": {"rows": rows},
        "invokes": {"a": {"prompt": prompt}},
        "metrics": {"ld": {**metric, "reduce": "mean"}},
    }


def stream_rows(n: int) -> list[dict[str, str]]:
    """``n`` IOI-like rows, io and s cycling through the pairs of :data:`NAMES`."""
    rows = []
    for k in range(n):
        io = NAMES[k % len(NAMES)]
        s = NAMES[(k + 1 + (k // len(NAMES)) % (len(NAMES) - 1)) % len(NAMES)]
        rows.append(
            {"p": f"When{io} and{s} went to the store,{s} gave a drink to", "io": io, "s": s}
        )
    return rows


# --------------------------------------------------------------------------- one method


def grid_runner(
    name: str, data: Data, args: argparse.Namespace, extra: dict[str, Any]
) -> tuple[Any, int]:
    """Warm the method up with one small forward; return a function computing the grid (or
    (grid, mean grid)) and the number of items it covers. ``extra`` gets what the method
    reports beside its grid (forwards; specsight's plan and timings)."""
    import specsight

    n_layers, n_pos, n_items = data.shape
    if name == "hooks_batched":
        with torch.inference_mode():
            data.model(input_ids=data.clean_ids[:1])
        extra["forwards"] = 1 + math.ceil(n_layers * n_pos * n_items / args.chunk)
        return lambda: hooks_batched(data, args.chunk), n_items
    if name == "nnsight_per_layer":
        model = nnsight_model(data)
        with model.trace(data.rows[0]["clean"]):
            model.output.logits[:, -1].save()
        n_run = min(args.quick_items, n_items) if args.quick else n_items
        extra["forwards"] = n_items * (1 + n_layers)  # traces, of 1 and n_pos rows
        return lambda: nnsight_per_layer(data, model, n_run), n_run
    specsight.run(warmup_spec(MODEL, data.rows[:1], "{clean}"), model=data.loaded)
    spec = dataset_spec(name == "specsight_mean", data.rows if args.items else None)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        results = specsight.run(spec, model=data.loaded)
        plan = results.manifest["plan"]
        extra["forwards"] = plan["forwards"]
        extra["plan"] = {k: plan[k] for k in ("rows", "forwards", "max_batch")}
        extra["timings"] = results.manifest["timings"]
        grid = results.metrics.get("ld/items", results["ld"])  # the mean keeps its items
        return grid.float(), results["ld"].float()

    return run, n_items


def measure_grid(name: str, data: Data, args: argparse.Namespace) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    runner, n_run = grid_runner(name, data, args, extra)
    entry: dict[str, Any] = {"rss_after_warmup_mb": rss_mb()}
    times: list[float] = []
    for _ in range(args.repeats if name != "nnsight_per_layer" else 1):
        start = time.perf_counter()
        value = runner()
        times.append(time.perf_counter() - start)
        print(f"  {name}: {times[-1]:.2f} s", file=sys.stderr, flush=True)
    grid, mean = value if isinstance(value, tuple) else (value, None)
    entry |= {"times_s": times, "seconds": statistics.median(times), "items_run": n_run}
    if n_run < data.shape[2]:  # --quick: scale up to every item
        entry.update(extrapolated=True, measured_s=entry["seconds"])
        entry["seconds"] *= data.shape[2] / n_run
    entry["grid"] = [
        [[None if math.isnan(v) else v for v in p] for p in lay] for lay in grid.tolist()
    ]
    if mean is not None and mean.dim() == 2:
        entry["mean_grid"] = mean.tolist()
    return entry | extra


def measure_stream(n_rows: int) -> dict[str, Any]:
    """``reduce: mean`` over ``n_rows`` inline rows on tiny-llama: seconds and memory."""
    import specsight
    from specsight.models.load.loader import load_model

    loaded = load_model(STREAM_MODEL, dtype="float32", device="cpu")
    specsight.run(warmup_spec(STREAM_MODEL, stream_rows(8), "{p}"), model=loaded)
    entry: dict[str, Any] = {"rows": n_rows, "rss_after_warmup_mb": rss_mb()}
    spec = specsight.load_spec(warmup_spec(STREAM_MODEL, stream_rows(n_rows), "{p}"))
    entry["rss_with_rows_mb"] = rss_mb()  # the validated spec holds every row
    start = time.perf_counter()
    results = specsight.run(spec, model=loaded)
    entry["seconds"] = time.perf_counter() - start
    entry["mean_ld"] = float(results["ld"])
    plan = results.manifest["plan"]
    entry["plan"] = {k: plan.get(k, 1) for k in ("rows", "forwards", "max_batch", "blocks")}
    entry["timings"] = results.manifest["timings"]  # compile_s, execute_s, total_s
    return entry


def source_fingerprint() -> str:
    """A short hash of specsight's Python source: another engineer may edit it between (or
    during) the methods' runs, and this shows which code each entry measured."""
    digest = hashlib.sha256()
    for path in sorted(SPECSIGHT_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(SPECSIGHT_DIR)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def child_main(args: argparse.Namespace) -> None:
    """Run one method in this process and write its JSON entry."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    entry: dict[str, Any] = {"method": args.method, "date": now()}
    entry["specsight_source"] = source_fingerprint()
    start = cpu_seconds()
    if args.method == "stream":
        entry |= measure_stream(args.rows)
    else:
        load_start = time.perf_counter()
        data = load_data(args.items)
        entry |= {"load_s": time.perf_counter() - load_start, "rss_after_load_mb": rss_mb()}
        entry |= measure_grid(args.method, data, args)
        n_layers, n_pos, n_items = data.shape
        entry["config"] = {"model": MODEL, "dtype": "float32", "device": "cpu"}
        entry["config"] |= {"n_layers": n_layers, "n_pos": n_pos, "n_items": n_items}
    entry["other_load_cores"] = other_load(start)
    entry["peak_rss_mb"] = peak_rss_mb()
    entry["torch_threads"] = torch.get_num_threads()
    if source_fingerprint() != entry["specsight_source"]:
        entry["specsight_source_changed"] = True  # edited while this method ran
    Path(args.json_out).write_text(json.dumps(entry) + "\n")


# --------------------------------------------------------------------------- orchestrator


def run_child(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one method (``stream_<N>`` for the stream of N rows) in a fresh interpreter."""
    name, _, rows = method.partition("_") if method.startswith("stream_") else (method, "", "")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "entry.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--method", name]
        cmd += ["--json-out", str(out), "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
        cmd += ["--quick-items", str(args.quick_items)] + (["--quick"] if args.quick else [])
        cmd += ["--items", str(args.items)] if args.items else []
        cmd += ["--rows", rows] if rows else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        print(f"running {method} ...", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(cmd, check=False, timeout=args.method_timeout)
        except subprocess.TimeoutExpired:
            raise MethodFailed(f"{method} ran past {args.method_timeout:g} s") from None
        if done.returncode != 0:
            raise MethodFailed(f"{method} exited with status {done.returncode}")
        return json.loads(out.read_text())


def parse_methods(text: str | None, stream_rows_: list[int]) -> list[str]:
    """Method names in run order; (b) first whenever a grid method runs."""
    streams = [f"stream_{n}" for n in stream_rows_]
    if text is None:
        return [*GRID_METHODS, *streams]
    names: list[str] = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        name = ALIASES.get(token, token)
        if name == "stream":
            names += streams
        elif name in GRID_METHODS or name.startswith("stream_"):
            names.append(name)
        else:
            raise SystemExit(f"unknown method {token!r}; choose from {GRID_METHODS} or stream")
    if any(n in GRID_METHODS for n in names) and REFERENCE not in names:
        names.insert(0, REFERENCE)
    return list(dict.fromkeys(names))


def compare(entries: dict[str, dict[str, Any]]) -> bool:
    """Record each grid's (and mean grid's) largest difference from (b); drop the full grids.
    False where one exceeds the tolerance."""
    ref = entries.get(REFERENCE, {}).get("grid")
    if ref is None:
        return True
    ref_grid = torch.tensor(ref)
    ok = True
    for name in GRID_METHODS:
        entry = entries.get(name)
        if not entry or "grid" not in entry:
            continue  # kept from an earlier run (--merge): its diffs are as recorded
        grid = torch.tensor([[[math.nan if v is None else v for v in p] for p in lay]
                             for lay in entry.pop("grid")])  # fmt: skip
        seen = ~grid.isnan()
        entry["max_abs_diff"] = float((grid - ref_grid)[seen].abs().max())
        if "mean_grid" not in entry and bool(seen.all()):
            entry["mean_grid"] = grid.mean(dim=2).tolist()
        if "mean_grid" in entry:
            diff = torch.tensor(entry["mean_grid"]) - ref_grid.mean(dim=2)
            entry["mean_max_abs_diff"] = float(diff.abs().max())
        worst = max(entry["max_abs_diff"], entry.get("mean_max_abs_diff", 0.0))
        if not worst <= TOLERANCE:
            ok = False
            print(f"FAILED: {name} differs from (b) by {worst:.3g} > {TOLERANCE}")
    return ok


def targets(entries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    ref, spec = entries.get(REFERENCE), entries.get("specsight")
    if not ref or not spec:
        return []
    ratio = spec["seconds"] / ref["seconds"]
    target = f"specsight time ≤ {TARGET_RATIO} × (b) on the CPU"
    return [
        {"target": target, "value": ratio, "limit": TARGET_RATIO, "pass": ratio <= TARGET_RATIO}
    ]


def label(name: str, entry: dict[str, Any]) -> str:
    letter = f" ({LETTERS[name]})" if name in LETTERS else ""
    return f"`{name}`{letter}{' †' if entry.get('extrapolated') else ''}"


def grid_table(entries: dict[str, dict[str, Any]]) -> list[str]:
    ref = entries[REFERENCE]
    lines = [
        "| method | seconds | × (b) | forwards | load s | RSS after warm-up MB | peak RSS MB "
        "| RSS × (b) | max abs diff (grid) | max abs diff (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in GRID_METHODS:
        if name not in entries:
            continue
        e = entries[name]
        mean_diff = e.get("mean_max_abs_diff")
        cells = [
            label(name, e),
            fmt(e["seconds"], 1),
            fmt(e["seconds"] / ref["seconds"]),
            str(e.get("forwards", "–")),
            fmt(e["load_s"], 1),
            fmt(e["rss_after_warmup_mb"], 0),
            fmt(e["peak_rss_mb"], 0),
            fmt(e["peak_rss_mb"] / ref["peak_rss_mb"]),
            f"{e['max_abs_diff']:.2e}",
            "–" if mean_diff is None else f"{mean_diff:.2e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def stream_table(entries: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| rows | seconds | of which compile s | rows/s | forwards | blocks | RSS after warm-up MB "
        "| RSS with the rows built MB | peak RSS MB | peak − with rows MB | per row kB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    streams = sorted(
        (e for e in entries.values() if e["method"] == "stream"), key=lambda e: e["rows"]
    )
    for e in streams:
        extra = e["peak_rss_mb"] - e["rss_with_rows_mb"]
        cells = [
            f"{e['rows']:,}",
            fmt(e["seconds"]),
            fmt(e.get("timings", {}).get("compile_s")),
            f"{e['rows'] / e['seconds']:,.0f}",
            str(e["plan"]["forwards"]),
            str(e["plan"].get("blocks", 1)),
            fmt(e["rss_after_warmup_mb"], 0),
            fmt(e["rss_with_rows_mb"], 0),
            fmt(e["peak_rss_mb"], 0),
            fmt(extra, 0),
            fmt(extra * 1024 / e["rows"], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    blocked = [e for e in streams if e["plan"].get("blocks", 1) > 1]
    if len(blocked) >= 2:
        first, last = blocked[0], blocked[-1]
        grow = (last["peak_rss_mb"] - last["rss_with_rows_mb"]) - (
            first["peak_rss_mb"] - first["rss_with_rows_mb"]
        )
        per_row = grow * 1024 / (last["rows"] - first["rows"])
        lines.append(
            f"\nFrom {first['rows']:,} to {last['rows']:,} rows (both in blocks) the run's own "
            f"peak (peak − with rows) grows by {grow:.0f} MB, {per_row:.2f} kB per row"
            + (": flat." if per_row < 0.1 else ": not flat.")
            + " No row's logits are kept (each forward's are reduced and dropped; holding the"
            " last position's would add vocabulary × 4 B per row, 196 kB on `smollm2-135m`),"
            " and a plan holds one block of items (at most 32,768 rows, a few kB each) at a"
            " time. What still grows is the run's per-item results: each item's value"
            " (`ld/items`) and its label on the `item` axis. Up to one block, the peak grows"
            " with the rows, as the block does."
        )
    return lines


DESCRIPTION = f"""\
For each of the 64 items of [`specs/data/ioi.jsonl`](../specs/data/ioi.jsonl), each decoder
layer L (30) and each position p (14) of the item's corrupt prompt, the clean prompt's layer-L
output at p replaces the corrupt one; the metric is logit(io) − logit(s) at the last position:
a [30, 14, 64] grid (26,880 patched rows, plus 64 clean runs) on `smollm2-135m`, float32, CPU.

```sh
python bench/dataset_patching.py            # everything; writes the table below
python bench/dataset_patching.py --quick    # nnsight on {QUICK_ITEMS} items, extrapolated (†)
python bench/dataset_patching.py --methods specsight --merge   # rerun specsight and (b)
```

| method | what it is |
| --- | --- |
| `hooks_batched` (b) | hand-written forward hooks, `torch.inference_mode`: one forward of the 64 clean prompts keeping every layer's output, then the rows (layer, pos, item) in chunks of 64 per forward, one hook per layer present in a chunk writing its rows with index tensors, `logits_to_keep=1`; **the reference** |
| `nnsight_per_layer` (d) | nnsight 0.8.1, per item: one trace saving every layer's output of the clean prompt, then one trace per layer with one `tracer.invoke` per position (14 rows), the logit difference computed inside the trace (64 × 31 traces) |
| `specsight` | `specsight.run(spec, model=loaded)`: `dataset: {{file: …}}`, invokes `clean` (`{{clean}}`) and `patched` (`{{corrupt}}`, `sweep: {{layer: all, pos: all}}`, `patch resid_post.{{layer}}` at `{{pos}}` from `clean`), metric `logit_diff` target `{{io}}` foil `{{s}}`; the grid is `results["ld"]`. Each item runs once untouched; a row patched at (L, p) then runs only layers ≥ L at positions ≥ p, in forwards shared by many items (prefix and causal position reuse) |
| `specsight_mean` | the same spec with `reduce: mean` (the mean [30, 14]; its per-item grid is `ld/items`) |

Each method runs in its own subprocess (peak RSS `ru_maxrss` is its own), loads the model (not
timed), warms up with one small forward, then times the whole grid including its clean runs.
Every grid must agree with (b) within 1e-4 (per item, and the mean over items), or the script
exits with status 1. Target (PASS/FAIL, not the exit status): specsight ≤ {TARGET_RATIO} × (b).

`stream`: `tiny-llama` (4 layers, d_model 64), an inline dataset of N rows ("When Mary and John
went to the store, John gave a drink to", io/s cycling through six single-token names: 30
distinct prompts), one
invoke `{{prompt: "{{p}}"}}`, metric `logit_diff` with `reduce: mean`; each N in its own process.
The validated spec itself holds the N rows, hence the "RSS with the rows built" column; the
"peak − with rows" column is what the run adds on top. Over 32,768 rows, the run compiles and
runs a block of items at a time (`blocks`) and joins the per-item values before reducing them.
"""


def report_markdown(report: dict[str, Any]) -> str:
    entries, machine = report["methods"], report["machine"]
    threads = {e.get("torch_threads") for e in entries.values()}
    lines = [
        f"{machine['cpu']}, {machine['cores_usable']} cores, torch threads: "
        f"{'/'.join(str(t) for t in sorted(threads, key=str))}; torch {machine['torch']}, "
        f"transformers {machine['transformers']}, nnsight {machine['nnsight']}, "
        f"specsight {machine['specsight']}; {machine['date']}.",
        "",
    ]
    busy = max((e.get("other_load_cores", 0.0) for e in entries.values()), default=0.0)
    if busy > BUSY_CORES:
        lines[0] += f" Other processes kept up to {busy:.1f} cores busy: timings are noisy."
    sources = {e["specsight_source"] for e in entries.values() if "specsight_source" in e}
    changed = [name for name, e in entries.items() if e.get("specsight_source_changed")]
    if len(sources) > 1 or changed:
        lines[0] += (
            f" specsight's source differed between the methods' runs ({len(sources)} versions"
            + (f"; edited during {', '.join(changed)}" if changed else "")
            + "): see `specsight_source` in the JSON."
        )
    if report.get("commands"):
        lines[0] += " Command: " + "; then ".join(f"`{c}`" for c in report["commands"]) + "."
    if REFERENCE in entries:
        lines += grid_table(entries)
        quick = [e for e in entries.values() if e.get("extrapolated")]
        if quick:
            lines.append(f"\n† measured on the first {quick[0]['items_run']} items, "
                         f"scaled to {quick[0]['config']['n_items']} (`--quick`).")  # fmt: skip
        lines.append("")
    if any(e["method"] == "stream" for e in entries.values()):
        lines += [*stream_table(entries), ""]
    if report["targets"]:
        lines += ["```"]
        lines += [
            f"{'PASS' if t['pass'] else 'FAIL'}: {t['target']} (got {t['value']:.3f}, "
            f"limit {t['limit']:.3f})"
            for t in report["targets"]
        ]
        lines += ["```"]
    for name, reason in report.get("failed", {}).items():
        lines.append(f"\nNot measured: {name}: {reason}.")
    return "\n".join(lines)


def command() -> str:
    """This run's command line, for the report."""
    return " ".join(["python bench/dataset_patching.py", *sys.argv[1:]])


def results_path(args: argparse.Namespace) -> Path:
    """The JSON report: ``dataset_patching_cpu.json``, or ``…_items<N>.json`` with ``--items``."""
    suffix = f"_items{args.items}" if args.items else ""
    return RESULTS_DIR / f"dataset_patching_cpu{suffix}.json"


def orchestrate(args: argparse.Namespace) -> int:
    path = results_path(args)
    stored = json.loads(path.read_text()) if path.exists() else {}
    keep = args.merge or args.report
    entries: dict[str, dict[str, Any]] = dict(stored.get("methods", {})) if keep else {}
    failed: dict[str, str] = dict(stored.get("failed", {})) if keep else {}
    methods = [] if args.report else parse_methods(args.methods, args.stream_rows)
    for method in methods:
        if args.wait_idle:
            wait_idle(args.wait_idle)
        try:
            entries[method] = run_child(method, args)
            failed.pop(method, None)
        except MethodFailed as exc:
            if not args.keep_going:
                raise SystemExit(f"FAILED: {exc}") from None
            print(f"FAILED: {exc}; going on", file=sys.stderr, flush=True)
            entries.pop(method, None)
            failed[method] = str(exc)
    if not entries:
        raise SystemExit("nothing measured")
    ok = compare(entries)
    report: dict[str, Any] = {
        "benchmark": "dataset_patching",
        "machine": stored["machine"] if args.report and stored else machine_info("cpu"),
        "reference": REFERENCE,
        "tolerance": TOLERANCE,
        "agree": ok,
        "methods": entries,
        "targets": targets(entries),
        "commands": [*(stored.get("commands", []) if keep else [])]
        + ([] if args.report else [command()]),
    }
    if failed:
        report["failed"] = failed
    markdown = report_markdown(report)
    print("\n" + markdown)
    write_report(path, report, None)
    print(f"\nwrote {path.relative_to(BENCH_DIR.parent)}")
    if not ok:
        print("FAILED: grids disagree with (b); README left unchanged", file=sys.stderr)
        return 1
    complete = REFERENCE in entries and "specsight" in entries and not args.items
    complete = complete and any(e["method"] == "stream" for e in entries.values())
    if args.readme or (args.readme is None and complete):
        block = f"{README_START}\n{DESCRIPTION}\n{markdown}\n{README_END}"
        replace_section(README_START, README_END, block, heading=HEADING)
        print("updated bench/README.md (dataset_patching:cpu)")
    return 0


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=(*GRID_METHODS, "stream"), help="run one (child process)")
    p.add_argument("--json-out", help="where --method writes its JSON entry")
    p.add_argument("--rows", type=int, default=1000, help="rows of --method stream")
    p.add_argument("--methods", help="comma list: b, d, specsight, specsight_mean, stream, "
                   "stream_<N> (default: all)")  # fmt: skip
    p.add_argument("--stream-rows", type=lambda s: [int(n) for n in s.split(",")],
                   default=list(STREAM_ROWS), help="row counts of stream (default 1000,10000,100000)")  # fmt: skip
    p.add_argument("--chunk", type=int, default=64, help="rows per forward in (b)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of (b) and specsight")
    p.add_argument("--quick", action="store_true", help="nnsight on the first items only (†)")
    p.add_argument("--quick-items", type=int, default=QUICK_ITEMS, help="items of --quick")
    p.add_argument("--items", type=int, help="self-test: the first N items only (inline rows; "
                   "results in dataset_patching_cpu_items<N>.json, no README)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each method, wait up to S s for the CPUs to be idle")  # fmt: skip
    p.add_argument("--keep-going", action="store_true", help="record a failed method, go on")
    p.add_argument("--method-timeout", type=float, metavar="S", help="kill a method after S s")
    p.add_argument("--merge", action="store_true", help="keep stored results of methods not rerun")
    p.add_argument("--report", action="store_true", help="run nothing: rebuild from the JSON")
    p.add_argument("--readme", action=argparse.BooleanOptionalAction,
                   help="write the section of bench/README.md (default: when the report holds "
                   "(b), specsight and a stream)")  # fmt: skip
    args = p.parse_args(argv)
    if args.method and not args.json_out:
        p.error("--method needs --json-out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.method:
        child_main(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
