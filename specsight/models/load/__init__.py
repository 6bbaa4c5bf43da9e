"""Loading models (torch): by id (the built-in ``smollm2-135m``, ``tiny-<family>``, folders and
the local hub cache; nothing is downloaded) or from a spec's ``model:`` entry (factories too),
with their tokenizer, :class:`~specsight.models.ModelInfo` and weights hash; a model already in
memory is wrapped and checked against the spec (:mod:`.in_memory`)."""

from ..catalog import BUILTIN_MODELS, TINY_MODELS, cache_dir
from .in_memory import IN_MEMORY, model_mismatch, wrap_model
from .introspect import hash_weights, model_info_from_module
from .loader import (
    LoadedModel,
    accelerate_placement,
    compute_device,
    execution_device,
    list_models,
    load_model,
    load_model_info,
    load_model_ref,
    load_ref_info,
    resolve_device,
)

__all__ = [
    "IN_MEMORY",
    "BUILTIN_MODELS",
    "TINY_MODELS",
    "LoadedModel",
    "accelerate_placement",
    "compute_device",
    "execution_device",
    "cache_dir",
    "hash_weights",
    "list_models",
    "load_model",
    "load_model_info",
    "load_model_ref",
    "load_ref_info",
    "model_info_from_module",
    "model_mismatch",
    "wrap_model",
    "resolve_device",
]
