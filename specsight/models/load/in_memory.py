"""Models already in memory: a Hugging Face model (or any module with a ``config``) and its
tokenizer, passed to ``specsight.run(spec, model=..., tokenizer=...)``, wrapped as a
:class:`~.loader.LoadedModel`, and checked against the model the spec names.

The check compares what can be known without weights about the spec's model (its family, layers,
widths, heads and vocabulary) with the model passed; a spec with ``model: in-memory`` names no
model and is not checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tokenizers
import torch

from ...errors import ModelLoadError, SpecError
from ...spec import Spec, doc_of, document_of
from ..catalog import IN_MEMORY
from ..info import ModelInfo
from ..tokenizer import LabelTokenizer, Tokenizer
from .introspect import hash_weights, model_info_from_module
from .loader import LoadedModel, load_ref_info

__all__ = ["IN_MEMORY", "wrap_model", "model_mismatch", "given_model", "modes_of"]

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_COMPARED = ("family", "n_layers", "d_model", "n_heads", "vocab_size")


def _tokenizer(tokenizer: Any) -> Tokenizer:
    """Our tokenizer from a Hugging Face fast tokenizer, a ``tokenizers.Tokenizer`` or ours."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return Tokenizer(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise ModelLoadError(
            f"cannot use a {type(tokenizer).__name__} as the tokenizer: it has no fast backend",
            hint="pass AutoTokenizer.from_pretrained(..., use_fast=True), or a tokenizers.Tokenizer",
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return Tokenizer(backend, pad_id=pad)


def wrap_model(model: torch.nn.Module, tokenizer: Any, *, model_id: str) -> LoadedModel:
    """``model`` (put in eval mode, gradients of its parameters off, as loading does) with its
    tokenizer, shape, weights hash, device and dtype, as the engine wants it."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ModelLoadError(
            f"run(model=...) takes a Hugging Face model or a LoadedModel, not "
            f"{type(model).__name__}",
            hint="e.g. AutoModelForCausalLM.from_pretrained(...) and its tokenizer",
        )
    first = next(model.parameters(), None)
    if first is None:
        raise ModelLoadError("the model passed to run() has no parameters")
    dtype = _DTYPES.get(first.dtype)
    if dtype is None:
        raise ModelLoadError(
            f"the model passed to run() holds {first.dtype} weights",
            hint="use float32, bfloat16 or float16 weights",
        )
    info = model_info_from_module(model, model_id, dtype)
    if info.inputs != "text":
        words: Tokenizer = LabelTokenizer(info.labels)
    elif tokenizer is None:
        raise ModelLoadError(
            "run(model=...) with a model that reads text needs its tokenizer",
            hint="pass tokenizer=AutoTokenizer.from_pretrained(...)",
        )
    else:
        words = _tokenizer(tokenizer)
    model.train(False)
    model.requires_grad_(False)
    sha = hash_weights(model)
    return LoadedModel(model, words, info, model_id, None, sha, str(first.device), dtype)


def model_mismatch(expected: ModelInfo, got: ModelInfo) -> str | None:
    """How the model passed differs from the one the spec names (None: it fits)."""
    differ = [
        f"{name} {getattr(got, name)} (the spec's model: {getattr(expected, name)})"
        for name in _COMPARED
        if getattr(got, name) != getattr(expected, name)
    ]
    return "; ".join(differ) or None


def modes_of(model: Any) -> Callable[[], None] | None:
    """A function putting a caller's own torch model back as it was (train/eval mode and
    which parameters want gradients); None for a LoadedModel, which specsight owns."""
    if isinstance(model, LoadedModel) or not isinstance(model, torch.nn.Module):
        return None
    training = {name: m.training for name, m in model.named_modules()}
    wants = {name: p.requires_grad for name, p in model.named_parameters()}

    def restore() -> None:
        for name, module in model.named_modules():
            module.training = training.get(name, module.training)
        for name, param in model.named_parameters():
            param.requires_grad_(wants.get(name, param.requires_grad))

    return restore


def given_model(spec: Spec, model: Any, tokenizer: Any) -> LoadedModel:
    """The model passed to ``run``, wrapped when it is a plain Hugging Face model, and checked
    against the spec's ``model:`` (what is known of it without weights; not checked when the
    spec says ``in-memory``, names a factory, or names a model that is not on this machine)."""
    in_memory = spec.model.id == IN_MEMORY
    if not isinstance(model, LoadedModel):
        name = type(model).__name__ if in_memory else spec.model.name
        model = wrap_model(model, tokenizer, model_id=name)
    elif tokenizer is not None:
        raise TypeError("tokenizer= goes with a Hugging Face model; a LoadedModel has its own")
    if in_memory or spec.model.factory is not None:
        return model
    try:
        found = doc_of(spec)
        expected, _ = load_ref_info(spec.model, base_dir=found.base_dir if found else None)
    except ModelLoadError:  # not here (ModelNotFoundError is one), or unreadable
        return model
    why = model_mismatch(expected, model.info)
    if why is not None:
        doc = document_of(spec)
        message = f"the model passed to run() is not '{spec.model.name}': {why}"
        hint = "pass the model the spec names, or write model: in-memory in the spec"
        raise SpecError(doc.source.issue("model-mismatch", message, ("model", "id"), hint=hint))
    return model
