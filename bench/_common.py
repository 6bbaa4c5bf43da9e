"""Helpers the benchmark scripts share: the CPU's name, writing one README section, and Llamas
with random weights (and SmolLM2's tokenizer) for machines without a downloaded model."""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent / "README.md"


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def replace_section(start: str, end: str, block: str, *, heading: str = "") -> None:
    """Replace the README text from marker ``start`` to marker ``end`` (both part of ``block``),
    or append ``heading`` and ``block`` when the markers are missing. Nothing else changes; the
    file is read right before writing because other benchmarks write their own sections."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + heading + block + "\n"
    README.write_text(text)


# --------------------------------------------------------------------------- random Llamas

#: Llamas with random weights for benchmarks without a downloaded model (SmolLM2's tokenizer)
RANDOM_LLAMAS: dict[str, dict[str, int]] = {
    "llama-small-random": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 49152,
    },
    "llama8b-random": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
}
#: a folder with SmolLM2's tokenizer.json, tokenizer_config.json and config.json; without it
#: the tokenizer comes from the built-in model (converted on first use)
TOKENIZER_ENV = "SPECSIGHT_BENCH_TOKENIZER"


def tokenizer_dir() -> Path:
    """The folder holding SmolLM2's tokenizer files (for ``AutoTokenizer.from_pretrained``)."""
    env = os.environ.get(TOKENIZER_ENV)
    if env:
        return Path(env).expanduser().resolve()
    from specsight.models.load import cache_dir, load_model_info

    load_model_info("smollm2-135m")  # converts the built-in model when it is not cached yet
    return cache_dir() / "models" / "smollm2-135m"


def smollm2_tokenizer() -> Any:
    """specsight's Tokenizer of SmolLM2: from ``$SPECSIGHT_BENCH_TOKENIZER`` when set."""
    from specsight.models.load import load_model_info

    env = os.environ.get(TOKENIZER_ENV)
    # a folder id reads its config.json on the meta device and its tokenizer.json: no weights
    _, tokenizer = load_model_info(str(tokenizer_dir()) if env else "smollm2-135m")
    return tokenizer


def _skip_transformers_init() -> Any:
    """transformers' ``no_init_weights`` (its module moved between versions), else a no-op."""
    import contextlib
    import importlib

    for name in ("transformers.initialization", "transformers.modeling_utils"):
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(name).no_init_weights()
    return contextlib.nullcontext()


def random_llama(name: str, device: str, dtype: Any = None) -> Any:
    """A specsight ``LoadedModel``: Llama ``name`` of :data:`RANDOM_LLAMAS` with random weights.

    The model is built directly on ``device`` (bf16 on CUDA, float32 on CPU unless ``dtype``)
    without transformers' and torch's own initialisation; then, in parameter order, every matrix
    gets N(0, 0.02) from a generator seeded with 0 on that device and every vector (the RMSNorm
    weights) ones: the same weights in every process on the same kind of device.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from specsight.models.load import LoadedModel, model_info_from_module

    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    tokenizer = smollm2_tokenizer()  # ids < 49152 fit every vocabulary here
    config = LlamaConfig(**RANDOM_LLAMAS[name])
    with torch.device(device), _skip_transformers_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            else:
                param.fill_(1.0)
    model.train(False)
    model.requires_grad_(False)
    embed = model.get_input_embeddings().weight
    sample = embed[:1024].float()
    if not bool(torch.isfinite(sample).all()) or float(sample.std()) < 0.01:
        raise SystemExit(f"{name}: the random initialisation failed")
    info = model_info_from_module(model, name, dtype_name)
    device_name = str(embed.device)
    return LoadedModel(model, tokenizer, info, name, None, "random-seed-0", device_name, dtype_name)


def cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, busy CPU seconds of the whole machine, CPU seconds of this process)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    own = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy, own.ru_utime + own.ru_stime


def other_load(start: tuple[float, float, float]) -> float:
    """Cores that other processes kept busy on average since ``start`` (contention)."""
    wall, busy, own = (b - a for a, b in zip(start, cpu_seconds()))
    return max(0.0, (busy - own) / wall) if wall > 0 else 0.0
