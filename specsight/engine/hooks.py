"""Hooks and output structure: the one place that knows how modules return hidden states.

A site always means the hidden-state tensor, whether a module returns a tensor, a tuple or a
ModelOutput; :class:`HookScope` owns every hook handle and removes them all on exit.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..errors import RunError

__all__ = ["HookScope", "hidden_of", "input_hidden", "replace_hidden", "module_table"]


# --- output structure: one place that knows tensors, tuples and ModelOutputs -----------------


def hidden_of(value: Any) -> torch.Tensor:
    """The hidden-state tensor inside a module's output or input."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "to_tuple"):
        return hidden_of(value.to_tuple())
    raise RunError(f"cannot find a hidden-state tensor in a value of type {type(value).__name__}")


def replace_hidden(value: Any, hidden: torch.Tensor) -> Any:
    """The same structure with its hidden-state tensor replaced."""
    if isinstance(value, torch.Tensor):
        return hidden
    if isinstance(value, tuple):
        return (hidden, *value[1:])
    if isinstance(value, list):
        return [hidden, *value[1:]]
    if hasattr(value, "to_tuple"):
        first = next(iter(value.keys()))
        value[first] = hidden
        return value
    raise RunError(f"cannot replace the hidden state in a value of type {type(value).__name__}")


# --- hooks ---------------------------------------------------------------------------------


def _input_key(name: str, args: tuple, kwargs: dict) -> str | None:
    """Where a module call's hidden-state input is: None for the first positional argument,
    else its keyword (``hidden_states``, else the first tensor keyword)."""
    if args:
        return None
    if "hidden_states" in kwargs:
        return "hidden_states"
    key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
    if key is None:
        raise RunError(f"module '{name}' was called without a tensor input")
    return key


def input_hidden(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """A module call's hidden-state input, found as hooks find it."""
    key = _input_key(name, args, kwargs)
    return hidden_of(args[0]) if key is None else kwargs[key]


def _with_input(
    name: str, args: tuple, kwargs: dict, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> tuple[tuple, dict] | None:
    """``fn`` on a module call's hidden-state input (:func:`input_hidden`); the call's
    arguments with the input replaced when ``fn`` returns a tensor, else None (unchanged)."""
    key = _input_key(name, args, kwargs)
    if key is None:
        new = fn(hidden_of(args[0]))
        return None if new is None else ((replace_hidden(args[0], new), *args[1:]), kwargs)
    new = fn(kwargs[key])
    return None if new is None else (args, {**kwargs, key: new})


_MODULE_TABLES: weakref.WeakKeyDictionary[
    torch.nn.Module, tuple[int, dict[str, torch.nn.Module]]
] = weakref.WeakKeyDictionary()


def module_table(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """name -> module, cached per model (walking a large model's tree costs milliseconds);
    rebuilt when the number of modules changes."""
    count = sum(1 for _ in model.modules())
    cached = _MODULE_TABLES.get(model)
    if cached is None or cached[0] != count:
        cached = (count, dict(model.named_modules()))
        _MODULE_TABLES[model] = cached
    return cached[1]


class HookScope:
    """Owns every hook a run puts on the model (and on the tensors it computes); every handle
    is removed when the scope exits, whatever happens. Nothing else of the model is changed."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._modules = module_table(model)
        self.handles: list[Any] = []

    def module(self, name: str) -> torch.nn.Module:
        if name not in self._modules:
            raise RunError(
                f"the model has no module '{name}'", hint="the plan was compiled for another model"
            )
        return self._modules[name]

    def add(self, name: str, io: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Call ``fn(hidden)`` at a module's input or output; a returned tensor replaces it
        (a pattern site's ``fn`` only reads)."""
        module = self.module(name)
        if io == "pattern":  # read-only: ``fn`` gets the whole output (attention weights inside)

            def read(_mod: Any, _args: Any, output: Any) -> None:
                fn(output)

            self.handles.append(module.register_forward_hook(read))
        elif io == "output":

            def post(_mod: Any, _args: Any, output: Any) -> Any:
                new = fn(hidden_of(output))
                return None if new is None else replace_hidden(output, new)

            self.handles.append(module.register_forward_hook(post))
        else:

            def pre(_mod: Any, args: tuple, kwargs: dict) -> Any:
                return _with_input(name, args, kwargs, fn)

            self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    def add_expander(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """A pre-hook that runs before every other hook of the module and may replace its
        hidden-state input (positional or ``hidden_states=``) with ``fn(hidden)``."""
        module = self.module(name)

        def pre(_mod: Any, args: tuple, kwargs: dict) -> Any:
            return _with_input(name, args, kwargs, fn)

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))

    def on_call(self, module: torch.nn.Module, fn: Callable[[tuple, dict], None]) -> None:
        """Call ``fn(args, kwargs)`` before every call of ``module``, ahead of its other hooks
        (generation counts the model's calls: one per decode step)."""

        def pre(_mod: Any, args: tuple, kwargs: dict) -> None:
            fn(args, kwargs)

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))

    def on_output(self, module: torch.nn.Module, fn: Callable[[Any], None]) -> None:
        """Call ``fn(output)`` after every call of ``module`` (the output stays as it is)."""

        def post(_mod: Any, _args: Any, output: Any) -> None:
            fn(output)

        self.handles.append(module.register_forward_hook(post))

    def replace_output(self, module: torch.nn.Module, fn: Callable[[Any], Any]) -> None:
        """Replace ``module``'s output by ``fn(output)``, ahead of its other hooks (gradients
        start from the embedding's output made a leaf)."""

        def post(_mod: Any, _args: Any, output: Any) -> Any:
            return fn(output)

        self.handles.append(module.register_forward_hook(post, prepend=True))

    def on_grad(self, tensor: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn(gradient)`` when the backward pass reaches ``tensor``."""
        self.handles.append(tensor.register_hook(fn))

    def __enter__(self) -> HookScope:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        while self.handles:
            self.handles.pop().remove()
