"""Loading a Hugging Face model folder (a local folder or a hub-cache snapshot): its config,
the matching auto class (image classifiers as such, everything else as a causal LM), its weights
without progress bars, and its tokenizer with the pad token it names. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tokenizers
import torch

from ...errors import ModelLoadError
from ..tokenizer import Tokenizer
from .vision import image_info

__all__ = ["OFFLINE_HINT", "config_of", "auto_class", "from_pretrained", "folder_tokenizer"]

OFFLINE_HINT = (
    "download it on a machine with network access (hf download {id}) "
    "and point model.id to the folder"
)


def config_of(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


def auto_class(config: Any) -> Any:
    """Image classifiers (ViT) load as such; every other model as a causal LM."""
    import transformers

    if image_info(config) is not None:
        return transformers.AutoModelForImageClassification
    return transformers.AutoModelForCausalLM


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def from_pretrained(
    folder: Path,
    model_id: str,
    dtype: torch.dtype,
    attn_implementation: str | None,
    kind: str,
    placement: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The folder's model in ``dtype``, loaded straight onto its device(s): ``placement``
    holds from_pretrained's ``device_map`` (a device, or accelerate's placement) and, with a
    placement, ``max_memory`` and ``offload_folder``. ``kind`` ("hub", "dir", "builtin")
    shapes the hint."""
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    kwargs.update(placement or {})
    try:
        auto = auto_class(config_of(folder))
        with _no_progress_bars():
            return auto.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as exc:
        hint = OFFLINE_HINT.format(id=model_id) if kind == "hub" else "is it a model folder?"
        msg = f"cannot load the weights of '{model_id}' from {folder}: {exc}"
        raise ModelLoadError(msg, hint=hint) from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pad_id(folder: Path, backend: tokenizers.Tokenizer) -> int:
    """The tokenizer's pad token if any, else its eos token, else 0."""
    sources = [_read_json(folder / n) for n in ("tokenizer_config.json", "special_tokens_map.json")]
    model_cfg = _read_json(folder / "config.json")
    for kind in ("pad", "eos"):
        for source in sources:
            token = source.get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and backend.token_to_id(token) is not None:
                return int(backend.token_to_id(token))
        value = model_cfg.get(f"{kind}_token_id")
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and 0 <= value < backend.get_vocab_size(with_added_tokens=True):
            return value
    return 0


def folder_tokenizer(folder: Path, model_id: str) -> Tokenizer:
    """``tokenizer.json`` when the folder has one, else AutoTokenizer's fast backend."""
    if (folder / "tokenizer.json").is_file():
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        from transformers import AutoTokenizer

        try:
            auto = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            msg = f"cannot load the tokenizer of '{model_id}' from {folder}: {exc}"
            raise ModelLoadError(msg) from None
        backend = getattr(auto, "backend_tokenizer", None)
        if backend is None:
            msg = f"the tokenizer of '{model_id}' has no fast (tokenizers) version"
            raise ModelLoadError(msg, hint="add a tokenizer.json to the model folder")
    return Tokenizer(backend, pad_id=_pad_id(folder, backend))
