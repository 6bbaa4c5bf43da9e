"""Dequantizing a Llama-architecture GGUF file into a Hugging Face folder (float32 safetensors).

Used once per machine for the built-in model; the result is cached by :mod:`specsight.models`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import ModelLoadError

__all__ = ["gguf_to_folder"]


def _unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the row order llama.cpp gives q/k projections for its rotary layout."""
    per_head = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, per_head, 2, -1).transpose(1, 2).reshape(weight.shape)


_GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}  # fmt: skip


def gguf_to_folder(gguf_file: Path, out: Path) -> None:
    """Dequantize a Llama GGUF into an HF folder: config, float32 safetensors, tokenizer."""
    import gguf
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    reader = gguf.GGUFReader(str(gguf_file))

    def meta(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return field.contents() if field is not None else default

    arch = meta("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{gguf_file.name} holds a '{arch}' model, not a llama one")
    n_heads, n_kv = meta(f"{arch}.attention.head_count"), meta(f"{arch}.attention.head_count_kv")
    tensors: dict[str, torch.Tensor] = {}
    for item in reader.tensors:
        parts = item.name.split(".")  # blk.5.attn_q.weight / token_embd.weight
        block = parts[0] == "blk"
        name = (
            f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}" if block else _GGUF_NAMES[parts[0]]
        )
        shape = tuple(int(n) for n in reversed(item.shape.tolist()))
        array = gguf.quants.dequantize(item.data, item.tensor_type).reshape(shape)
        weight = torch.from_numpy(array.astype("float32"))  # a writable copy
        if block and parts[2] in ("attn_q", "attn_k"):
            weight = _unpermute(weight, n_heads if parts[2] == "attn_q" else n_kv).contiguous()
        tensors[f"{name}.{parts[-1]}"] = weight
    d_model = meta(f"{arch}.embedding_length")
    config = LlamaConfig(
        vocab_size=tensors["model.embed_tokens.weight"].shape[0],
        hidden_size=d_model,
        intermediate_size=meta(f"{arch}.feed_forward_length"),
        num_hidden_layers=meta(f"{arch}.block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=d_model // n_heads,
        max_position_embeddings=meta(f"{arch}.context_length", 2048),
        rms_norm_eps=meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta(f"{arch}.rope.freq_base", 10000.0),
        tie_word_embeddings="lm_head.weight" not in tensors,
        bos_token_id=meta("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta("tokenizer.ggml.padding_token_id"),
    )
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer.save_pretrained(str(out))
    if not (out / "tokenizer.json").is_file():
        raise ModelLoadError(f"no tokenizer.json could be made from {gguf_file.name}")
