"""specsight: declarative intervention experiments on PyTorch / Hugging Face models.

Importing this package does not import torch; running a spec does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .api import compile_plan, load_spec, run
from .errors import Issue, ModelLoadError, RunError, SpecError, SpecsightError
from .modelinfo import ModelInfo
from .plan import Plan
from .spec import Spec

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
