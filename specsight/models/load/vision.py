"""Image models (ViT-like classifiers): how pixels are prepared and how long their sequence is.

Read from the model's config and, for a model folder, its ``preprocessor_config.json``; stored
in :attr:`ModelInfo.image` so the compiler (which imports no torch) can prepare image files the
way the model's own image processor does.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..info import ModelInfo

__all__ = ["image_info", "with_processor"]


#: how image processors of ViT-like models prepare pixels unless the folder says otherwise
_IMAGE_DEFAULTS = {
    "resample": "bilinear",
    "rescale_factor": 1 / 255,
    "image_mean": [0.5],  # one value for every channel
    "image_std": [0.5],
}


def image_info(config: Any) -> dict[str, Any] | None:
    """The pixel preparation and sequence length of a patch-based image model, else None."""
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if size is None or patch is None or getattr(config, "vocab_size", None) is not None:
        return None
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return {
        "size": [int(height), int(width)],
        "channels": int(getattr(config, "num_channels", 3)),
        **_IMAGE_DEFAULTS,
        "grid": [height // patch_h, width // patch_w],  # [patch rows, patches per row]
        "seq_len": (height // patch_h) * (width // patch_w) + 1,
    }


def with_processor(info: ModelInfo, folder: Path | None) -> ModelInfo:
    """Image models: the folder's ``preprocessor_config.json`` overrides the default pixel
    preparation (mean, std, rescale factor, size)."""
    if info.image is None or folder is None or not (folder / "preprocessor_config.json").is_file():
        return info
    config = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    image = dict(info.image)
    for key in ("image_mean", "image_std", "rescale_factor"):
        if config.get(key) is not None:
            image[key] = config[key]
    if not config.get("do_rescale", True):
        image["rescale_factor"] = 1.0
    if not config.get("do_normalize", True):
        image["image_mean"], image["image_std"] = [0.0], [1.0]
    size = config.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        image["size"] = [int(size["height"]), int(size["width"])]
    resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(config.get("resample", 2))
    image["resample"] = resample or "bilinear"
    return replace(info, image=image)
