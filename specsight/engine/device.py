"""Where a model runs: the device and dtype of its parameters, and a CUDA device's free memory
(what a run's activation budget is sized from)."""

from __future__ import annotations

import torch

from ..models.load import execution_device

__all__ = ["device_free_bytes", "model_device", "model_dtype"]


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model takes its inputs: for a model placed by accelerate (``device_map``) its
    first module's device, else the device of its first parameter (CPU without any)."""
    if getattr(model, "hf_device_map", None):
        return torch.device(execution_device(model))
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first parameter (float32 for a model without any)."""
    return next((p.dtype for p in model.parameters()), torch.float32)


def device_free_bytes(device: str) -> int:
    """Free memory on a CUDA device ('cuda', 'cuda:1')."""
    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    free, _total = torch.cuda.mem_get_info(index)
    return int(free)
