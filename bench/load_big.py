"""Loading a checkpoint from disk (issue 15): specsight's ``load_model`` against plain
``AutoModelForCausalLM.from_pretrained(device_map=...)``, time and peak RSS, first load (every
checkpoint file hashed for the weights identity) and cached load (hashes read from the cache).

The checkpoint is a Llama with random weights and 1B-scale dimensions (hidden 2048, 22 layers,
1.2B parameters), saved by this script as bfloat16 safetensors shards of 500 MB. Each method
runs in its own process (peak RSS ``ru_maxrss`` is its own), with the files in the page cache
(read once before each method), so that disk speed does not decide.

    python bench/load_big.py                 # builds the checkpoint once, writes the table
    python bench/load_big.py --folder DIR    # where the checkpoint lives (default /tmp/...)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, replace_section, tokenizer_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "load_big_cpu.json"
CONFIG = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 49152,
}
METHODS = {
    "plain": "AutoModelForCausalLM.from_pretrained(folder, dtype=bfloat16, device_map='cpu')",
    "plain_tokenizer": "the same and AutoTokenizer.from_pretrained(folder): what specsight "
    "loads (model and tokenizer)",
    "specsight_first": "specsight load_model(folder, dtype='bfloat16', device='cpu'), empty "
    "hash cache: every file hashed (in a thread)",
    "specsight_cached": "the same, hashes in the cache (path, size, mtime): nothing hashed",
    "tensor_hash": "before this change: plain from_pretrained, then sha256 of every tensor",
}
START, END = "<!-- load_big:start -->", "<!-- load_big:end -->"


def build(folder: Path) -> None:
    """The random bfloat16 Llama, saved in shards, with SmolLM2's tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (folder / "config.json").exists():
        return
    config = LlamaConfig(**CONFIG)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(str(folder), max_shard_size="500MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir() / name, folder / name)


def child(method: str, folder: Path, cache: Path) -> dict[str, Any]:
    """Load once the way ``method`` says; seconds and peak RSS of this process."""
    import os

    os.environ["SPECSIGHT_CACHE"] = str(cache)
    import torch
    from transformers import AutoModelForCausalLM

    from specsight.models.load import hash_weights, load_model
    from specsight.models.load.identity import HashStats

    start = time.perf_counter()  # imports done: the load alone is timed
    extra: dict[str, Any] = {}
    if method in ("plain", "plain_tokenizer", "tensor_hash"):
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.bfloat16, device_map="cpu"
        )
        if method == "plain_tokenizer":
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(folder))
        if method == "tensor_hash":
            hash_weights(model)
        seconds = time.perf_counter() - start
    else:
        loaded = load_model(str(folder), dtype="bfloat16", device="cpu")
        model = loaded.model
        seconds = time.perf_counter() - start
        extra["weights_sha256"] = loaded.weights_sha256  # waits for the hashing thread
        extra["identity_ready_s"] = time.perf_counter() - start
        extra |= {"hashed_bytes": HashStats.hashed_bytes, "from_cache": HashStats.from_cache}
    params = sum(p.numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "seconds": seconds, "peak_rss_mb": peak, "params": params, **extra}


def _warm(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def orchestrate(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    build(folder)
    checkpoint_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    entries: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as cache:
        for method in METHODS:
            _warm(folder)
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    method,
                    "--folder",
                    str(folder),
                    "--cache",
                    cache,
                ],  # fmt: skip
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            entries[method] = json.loads(out.strip().splitlines()[-1])
            print(method, entries[method], file=sys.stderr)
    report = {
        "benchmark": "load_big",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "device": "cpu"},
        "config": CONFIG,
        "checkpoint_bytes": checkpoint_bytes,
        "methods": entries,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    replace_section(START, END, f"{START}\n{markdown(report)}\n{END}", heading="## Loading\n\n")
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    entries, plain = report["methods"], report["methods"]["plain"]
    n = plain["params"]
    lines = [
        "### `load_big.py`",
        "",
        f"A Llama with random weights, {n / 1e9:.2f}B parameters (hidden 2048, 22 layers), "
        f"bfloat16 safetensors shards of 500 MB ({report['checkpoint_bytes'] / 2**30:.2f} GiB), "
        "loaded on the CPU; each method in its own process, the files in the page cache. "
        f"{report['machine']['cpu']}, {report['date']}. Results: "
        "[`results/load_big_cpu.json`](results/load_big_cpu.json). Target: specsight ≤ 1.1 × "
        "plain in time and in peak RSS, first and cached load.",
        "",
        "",
        "specsight's load returns the model while the checkpoint's files are still being hashed "
        '(a thread; the identity is read when the manifest is written): "identity ready" is '
        "when that hashing has finished.",
        "",
        "| method | what | seconds | × plain | identity ready s | peak RSS MB | × plain |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, what in METHODS.items():
        e = entries[name]
        ready = f"{e['identity_ready_s']:.2f}" if "identity_ready_s" in e else "–"
        lines.append(
            f"| `{name}` | {what} | {e['seconds']:.2f} | {e['seconds'] / plain['seconds']:.2f} "
            f"| {ready} | {e['peak_rss_mb']:.0f} | {e['peak_rss_mb'] / plain['peak_rss_mb']:.2f} |"
        )
    verdicts = []
    for base in ("plain", "plain_tokenizer"):
        ref = entries[base]
        for name in ("specsight_first", "specsight_cached"):
            e = entries[name]
            t, r = e["seconds"] / ref["seconds"], e["peak_rss_mb"] / ref["peak_rss_mb"]
            ok = "PASS" if t <= 1.1 and r <= 1.1 else "FAIL"
            verdicts.append(f"{ok}: {name} {t:.2f} × time, {r:.2f} × RSS of {base} (limit 1.10)")
    return "\n".join(lines + ["", "```", *verdicts, "```"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "specsight-llama1b"))
    parser.add_argument("--child", choices=list(METHODS))
    parser.add_argument("--cache")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.folder), Path(args.cache))))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
