"""Diagnostic: where the fixed cost of a single ``specsight.run`` forward goes on a GPU.

One clean forward of ``llama8b-random`` (bf16) saving every layer output, timed four ways
(median of 20 after warm-ups): hand-written hooks; ``specsight.run`` on a dict (load, validate,
compile, execute, results); ``specsight.run`` on a loaded Spec; the engine alone
(``execute`` of a compiled plan). Then a torch.profiler table of one ``specsight.run``, sorted by
CPU time, to show synchronising calls (cudaMemcpy, cudaStreamSynchronize) inside the forward.

    python bench/gpu_overhead.py            # needs CUDA; prints, writes nothing
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_patching import hooks_save_all, load_setup, save_all_spec, sync  # noqa: E402

import specsight  # noqa: E402
from specsight.api import compile_plan  # noqa: E402
from specsight.engine import execute  # noqa: E402


def median_ms(setup, fn, reps: int = 20) -> float:
    times = []
    for _ in range(reps):
        sync(setup)
        start = time.perf_counter()
        fn()
        sync(setup)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    model = sys.argv[2] if len(sys.argv) > 2 else "llama8b-random"
    setup = load_setup(model, device)
    data = save_all_spec(setup)
    spec = specsight.load_spec(data)
    plan = compile_plan(spec, setup.loaded.info, setup.loaded.tokenizer, device=setup.device)
    ways = {
        "hand-written hooks": lambda: hooks_save_all(setup),
        "specsight.run(dict)": lambda: specsight.run(data, model=setup.loaded),
        "specsight.run(Spec)": lambda: specsight.run(spec, model=setup.loaded),
        "engine only (execute)": lambda: execute(plan, setup.model),
    }
    for fn in ways.values():
        for _ in range(3):
            fn()
    for name, fn in ways.items():
        print(f"{name:24s} {median_ms(setup, fn):8.2f} ms", flush=True)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        specsight.run(spec, model=setup.loaded)
        sync(setup)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    names = ("cudaMemcpyAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item")
    for event in prof.key_averages():
        if event.key in names:
            print(f"{event.key}: {event.count} calls, {event.cpu_time_total / 1000:.2f} ms CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
