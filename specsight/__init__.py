"""specsight: declarative intervention experiments on PyTorch / Hugging Face models.

Importing this package does not import torch; running a spec does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .api import compile_plan, load_spec, run
from .errors import Issue, ModelLoadError, RunError, SpecError, SpecsightError
from .models import ModelInfo
from .plan import Plan
from .spec import Spec
from .version import __version__

if TYPE_CHECKING:
    from .results import Results

__all__ = [
    "__version__",
    "load_spec",
    "compile_plan",
    "run",
    "Results",
    "Spec",
    "Plan",
    "ModelInfo",
    "Issue",
    "SpecsightError",
    "SpecError",
    "RunError",
    "ModelLoadError",
]


def __getattr__(name: str) -> Any:
    if name == "Results":  # lazy: results imports torch
        from .results import Results

        return Results
    raise AttributeError(f"module 'specsight' has no attribute '{name}'")
