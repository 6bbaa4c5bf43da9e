"""What a loaded torch model is: its :class:`ModelInfo` read off the module tree and config
(works on the meta device too), and the sha256 of its weights."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ...errors import ModelLoadError
from ...sites import detect_family
from ..info import ModelInfo
from .vision import image_info

__all__ = ["hash_weights", "model_info_from_module"]


def hash_weights(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: name, dtype, shape and raw bytes, in name order
    (a tensor offloaded to the meta device counts by name, dtype and shape only)."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update(f"{name}|{dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.device.type == "meta":  # offloaded by accelerate: no bytes in memory
            digest.update(b"meta\n")
            continue
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def model_info_from_module(model: torch.nn.Module, model_id: str, dtype: str) -> ModelInfo:
    """Read a :class:`ModelInfo` off a model (real or on the meta device) and its config."""
    config = model.config  # type: ignore[attr-defined]
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def pick(*keys: str, default: Any = None) -> Any:
        for key in keys:
            value = getattr(config, key, None)
            if value is not None:
                return value
        return default

    image = image_info(config)
    d_model = pick("hidden_size", "n_embd", "d_model")
    # models without attention (state-space models such as Mamba) have no heads: 0
    n_heads = pick("num_attention_heads", "n_head", "num_heads", default=0)
    n_layers = pick("num_hidden_layers", "n_layer", "num_layers")
    vocab = pick("vocab_size")
    labels = None
    if image is not None:  # an image classifier: its "vocabulary" is its classes
        labels = tuple(str(config.id2label[i]) for i in range(len(config.id2label)))
        vocab = len(labels)
    if None in (d_model, n_layers, vocab):
        raise ModelLoadError(
            f"cannot read the shape of '{model_id}' from its config ({type(config).__name__})"
        )
    architecture = type(model).__name__
    modules = tuple((name, type(mod).__name__) for name, mod in model.named_modules() if name)
    return ModelInfo(
        model_id=model_id,
        architecture=architecture,
        family=detect_family(architecture, [name for name, _ in modules]),
        n_layers=int(n_layers),
        d_model=int(d_model),
        n_heads=int(n_heads),
        n_kv_heads=int(pick("num_key_value_heads", "n_kv_heads", default=n_heads)),
        d_head=int(pick("head_dim", default=d_model // n_heads if n_heads else 0)),
        vocab_size=int(vocab),
        d_mlp=int(pick("intermediate_size", "n_inner", default=4 * d_model)),
        max_positions=pick("max_position_embeddings", "n_positions", "n_ctx"),
        dtype=dtype,
        n_params=sum(p.numel() for p in model.parameters()),  # tied weights count once
        modules=modules,
        inputs="text" if image is None else "image",
        image=image,
        labels=labels,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
    )
