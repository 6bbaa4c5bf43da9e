"""Where a model runs: the device and dtype of its parameters, and a CUDA device's free memory
(what a run's activation budget is sized from)."""

from __future__ import annotations

import torch

__all__ = ["device_free_bytes", "model_device", "model_dtype"]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first parameter (float32 for a model without any)."""
    return next((p.dtype for p in model.parameters()), torch.float32)


def device_free_bytes(device: str) -> int:
    """Free memory on a CUDA device ('cuda', 'cuda:1')."""
    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    free, _total = torch.cuda.mem_get_info(index)
    return int(free)
