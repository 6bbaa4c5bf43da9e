"""Tiny random models for tests and trying things out: seeded configs and a small BPE tokenizer.

The tokenizer is a byte-level BPE (1024 tokens) trained on a fixed corpus, so words such as
" Mary", " John" and " Paris" are single tokens; training is deterministic and takes ~50 ms.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import tokenizers
import torch

from ..catalog import TINY_MODELS
from ..tokenizer import Tokenizer

__all__ = ["TINY_MODELS", "build_tiny", "tiny_tokenizer"]

#: the classes of tiny-vit
TINY_VIT_LABELS = ("cat", "dog", "bird", "fish", "horse")
_TINY_EOT = "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """Train the tiny byte-level BPE tokenizer on the fixed corpus (deterministic; ~50 ms)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    corpus_file = Path(__file__).parent / "tiny_corpus.json"
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=[_TINY_EOT], initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(json.loads(corpus_file.read_text(encoding="utf-8")), trainer)
    return backend.to_str()


def tiny_tokenizer() -> Tokenizer:
    backend = tokenizers.Tokenizer.from_str(_tiny_tokenizer_json())
    return Tokenizer(backend, pad_id=backend.token_to_id(_TINY_EOT))


def _tiny_config(name: str) -> Any:
    import transformers

    backend = tokenizers.Tokenizer.from_str(_tiny_tokenizer_json())
    vocab, eot = backend.get_vocab_size(with_added_tokens=True), backend.token_to_id(_TINY_EOT)
    if name == "tiny-gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_positions=128, n_embd=64, n_layer=4, n_head=4, n_inner=128,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
            bos_token_id=eot, eos_token_id=eot,
        )  # fmt: skip
    if name == "tiny-gpt-neo":
        return transformers.GPTNeoConfig(
            vocab_size=vocab, max_position_embeddings=128, hidden_size=64, num_layers=4,
            num_heads=4, intermediate_size=128, attention_types=[[["global", "local"], 2]],
            window_size=8, bos_token_id=eot, eos_token_id=eot,
        )  # fmt: skip
    if name == "tiny-vit":
        return transformers.ViTConfig(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
            image_size=32, patch_size=8, num_channels=3,
            id2label=dict(enumerate(TINY_VIT_LABELS)),
        )  # fmt: skip
    if name == "tiny-mamba":
        return transformers.MambaConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=4, state_size=8, expand=2,
            conv_kernel=4, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        )  # fmt: skip
    shape = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=128, bos_token_id=eot, eos_token_id=eot,
    )  # fmt: skip
    if name == "tiny-gpt-neox":
        return transformers.GPTNeoXConfig(**shape, use_parallel_residual=True)
    extra: dict[str, Any] = {
        "tiny-mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
        "tiny-qwen3": {"head_dim": 16},
        "tiny-gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "pad_token_id": eot},
        "tiny-phi3": {"pad_token_id": eot},
        "tiny-olmo2": {"pad_token_id": eot},
    }.get(name, {})
    config_class = {
        "tiny-llama": transformers.LlamaConfig,
        "tiny-mistral": transformers.MistralConfig,
        "tiny-qwen2": transformers.Qwen2Config,
        "tiny-mixtral": transformers.MixtralConfig,
        "tiny-qwen3": transformers.Qwen3Config,
        "tiny-gemma2": transformers.Gemma2Config,
        "tiny-phi3": transformers.Phi3Config,
        "tiny-olmo2": transformers.Olmo2Config,
    }[name]
    return config_class(**shape, num_key_value_heads=2, **extra)


def build_tiny(name: str, *, seed: int, attn_implementation: str | None) -> torch.nn.Module:
    """The same seed gives bit-identical weights; the global RNG is left untouched."""
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    config = _tiny_config(name)
    auto = AutoModelForImageClassification if name == "tiny-vit" else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return auto.from_config(config, **kwargs)
