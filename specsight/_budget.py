"""How much memory a run may use for activations, and the matching cap on rows per forward.

CPU: half of the memory the OS reports available. CUDA: 80% of the device's free memory
(torch is imported only for CUDA devices, so ``specsight plan`` stays light on CPU).
"""

from __future__ import annotations

import os

__all__ = ["activation_budget", "batch_cap"]

CPU_BATCH_CAP = 64  # on CPU, throughput stops improving past ~64 rows (bench/README.md)
GPU_BATCH_CAP = 256


def _available_cpu_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def activation_budget(device: str, weights_bytes: int = 0) -> int:
    """Bytes of activations one forward may use on ``device`` ('cpu', 'cuda:0', ...)."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        return int(free * 0.8)
    return max(256 << 20, int(_available_cpu_bytes() * 0.5) - weights_bytes)


def batch_cap(device: str) -> int:
    return GPU_BATCH_CAP if device.startswith("cuda") else CPU_BATCH_CAP
