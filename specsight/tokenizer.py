"""A small torch-free tokenizer wrapper around the `tokenizers` library.

The compiler resolves positions and metric tokens with it; the engine only ever sees token ids.
Models without text inputs get a :class:`LabelTokenizer` (their class labels); model folders
are read by :func:`folder_tokenizer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tokenizers

from .errors import ModelLoadError

__all__ = ["Tokenizer", "LabelTokenizer", "folder_tokenizer"]


class Tokenizer:
    """Encodes prompts (with the model's special tokens) and single target tokens."""

    #: whether inputs are text whose tokens position selectors can search
    has_text = True

    def __init__(self, backend: tokenizers.Tokenizer, *, pad_id: int | None = None):
        self._tok = backend
        self.pad_id = pad_id if pad_id is not None else 0

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, pad_id: int | None = None) -> Tokenizer:
        return cls(tokenizers.Tokenizer.from_file(str(path)), pad_id=pad_id)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, with whatever special tokens the model adds (e.g. BOS)."""
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of a piece of text without special tokens (metric targets, selectors)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def token_str(self, token_id: int) -> str:
        """The text of one token as it would appear in decoded output (`' Mary'`)."""
        return self._tok.decode([int(token_id)], skip_special_tokens=False)

    def token_strs(self, ids: list[int]) -> list[str]:
        return [self.token_str(i) for i in ids]

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))


class LabelTokenizer(Tokenizer):
    """The "vocabulary" of a model without text inputs: its class labels (a ViT classifier's
    ``id2label``) or, with no labels, the output indices themselves.

    Metric targets name a class by its label (``token: "cat"``) or index; positions cannot
    search for tokens, since the inputs are pixels or tensors.
    """

    has_text = False

    def __init__(self, labels: list[str] | tuple[str, ...] | None = None):
        self.labels = list(labels) if labels else []
        self._index = {label: i for i, label in enumerate(self.labels)}
        self.pad_id = 0

    @property
    def backend(self) -> tokenizers.Tokenizer:
        raise TypeError("a model without text inputs has no tokenizer")

    @property
    def vocab_size(self) -> int:
        return len(self.labels)

    def encode(self, text: str) -> list[int]:
        raise TypeError("a model without text inputs cannot encode prompts")

    def encode_plain(self, text: str) -> list[int]:
        """The class with this label: one id, or none when no class has it."""
        if text in self._index:
            return [self._index[text]]
        stripped = text.strip()
        return [int(stripped)] if stripped.isdigit() and not self.labels else []

    def token_str(self, token_id: int) -> str:
        token_id = int(token_id)
        return self.labels[token_id] if 0 <= token_id < len(self.labels) else str(token_id)

    def save(self, path: str | os.PathLike[str]) -> None:
        raise TypeError("a model without text inputs has no tokenizer to save")


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
