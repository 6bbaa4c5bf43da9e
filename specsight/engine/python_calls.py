"""The Python functions a local run was given (``specsight.run(spec, functions=...)``), held
for the run's duration in a context variable (a server thread never has any), and calling them
on a metric's logits or an op's values with their results checked."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ..errors import RunError

__all__ = ["call_metric", "call_op", "given_functions"]

_FUNCTIONS: contextvars.ContextVar[Mapping[str, Callable[..., Any]] | None] = (
    contextvars.ContextVar("specsight_functions", default=None)
)


@contextlib.contextmanager
def given_functions(functions: Mapping[str, Callable[..., Any]] | None) -> Iterator[None]:
    """Make ``functions`` (name -> callable) what ``python`` metrics and ops call meanwhile."""
    token = _FUNCTIONS.set(dict(functions or {}))
    try:
        yield
    finally:
        _FUNCTIONS.reset(token)


def _call(fn: str, values: torch.Tensor, what: str) -> Any:
    function = (_FUNCTIONS.get() or {}).get(fn)
    if function is None:
        raise RunError(
            f"{what} calls the Python function '{fn}', which this run was not given",
            hint=f"specsight.run(spec, functions={{'{fn}': ...}}) (local runs only)",
        )
    try:
        return function(values)
    except Exception as exc:  # the user's code: say where, keep its traceback chained
        raise RunError(f"{what}: the Python function '{fn}' raised {exc!r}") from exc


def call_metric(fn: str, logits: torch.Tensor, metric: str) -> torch.Tensor:
    """``fn(logits)`` ([n, vocab] in; a site's values [n, width] for a metric with a site) as
    one float value per row: [n]."""
    what = f"metric '{metric}'"
    out = _call(fn, logits, what)
    values = torch.as_tensor(out, dtype=torch.float32, device=logits.device)
    if tuple(values.shape) != (logits.shape[0],):
        raise RunError(
            f"{what}: the Python function '{fn}' returned shape {list(values.shape)} for "
            f"{logits.shape[0]} rows; it must return one value per row ([{logits.shape[0]}])",
            hint="reduce over the vocabulary: e.g. return -(p * p.log()).sum(-1)",
        )
    return values


def call_op(fn: str, values: torch.Tensor, origin: str) -> torch.Tensor:
    """``fn(values)`` ([n, width] in) in their shape, dtype and device."""
    what = origin or "a python op"
    out = _call(fn, values, what)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(values.shape):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RunError(
            f"{what}: the Python function '{fn}' returned {shape} for values of shape "
            f"{list(values.shape)}; it must return a tensor of their shape",
        )
    return out.to(values.device, values.dtype)
