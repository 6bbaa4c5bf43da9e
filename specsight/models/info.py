"""ModelInfo: everything the compiler needs to know about a model, as plain data.

A ModelInfo is built once from a loaded (or meta-device) model by
:func:`specsight.models.load.model_info_from_module` and can be stored as JSON, so compiling a
spec never needs torch or the weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    """Shape and structure of one model."""

    model_id: str
    architecture: str
    family: str | None
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    vocab_size: int
    d_mlp: int | None = None
    max_positions: int | None = None
    dtype: str = "float32"
    #: parameter count (None when unknown)
    n_params: int | None = None
    #: every named submodule, in registration order, as (name, class name)
    modules: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    #: what invokes give the model: "text" (prompts), "image" (image files, e.g. ViT) or
    #: "tensor" (tensor files, models built by a factory)
    inputs: str = "text"
    #: image models: how an image file becomes pixel values (size [h, w], channels, resample,
    #: rescale_factor, image_mean, image_std) and the sequence length (patches + class token)
    image: dict[str, Any] | None = None
    #: classifiers: the class labels, by index (metric targets may name them)
    labels: tuple[str, ...] | None = None
    #: the attention implementation the model runs with unless a spec asks for another
    #: ("eager", "sdpa", ...; None when unknown)
    attn_implementation: str | None = None

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.modules)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["modules"] = [list(pair) for pair in self.modules]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        data = dict(data)
        data["modules"] = tuple((str(n), str(t)) for n, t in data.get("modules", ()))
        if data.get("labels") is not None:
            data["labels"] = tuple(str(label) for label in data["labels"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        return cls.from_dict(json.loads(text))
