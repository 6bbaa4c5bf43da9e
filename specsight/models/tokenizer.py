"""A small torch-free tokenizer wrapper around the `tokenizers` library.

The compiler resolves positions and metric tokens with it; the engine only ever sees token ids.
Models without text inputs get a :class:`LabelTokenizer` (their class labels).
"""

from __future__ import annotations

import os
from pathlib import Path

import tokenizers

__all__ = ["Tokenizer", "LabelTokenizer"]


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
