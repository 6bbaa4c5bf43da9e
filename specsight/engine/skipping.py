"""Layers a forward does not run: a forward that reads its untouched runs from layer S on needs
nothing of the layers below S (layer S's input is put in by the runner's expander), so it runs
a stand-in of the model instead of the model: a shallow copy of the modules on the path to the
layer stack, whose stack holds stand-ins below S (each answers with its input, in the structure
the layer returns) and the model's own layers from S on.

The user's model is not changed: the copies are new objects that share every module, parameter
and hook with it (a hook on a shared module fires as it does in the model), and nothing of the
model is replaced, not even for the duration of a forward.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .hooks import input_hidden, replace_hidden

__all__ = ["StandIns"]


class _StandIn(torch.nn.Module):
    """A layer a forward skips: it answers with its hidden-state input, in the structure of
    ``template`` (an output of the layer it stands in for)."""

    def __init__(self, index: int, template: Any):
        super().__init__()
        self.index, self.template = index, template

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = input_hidden(f"layer {self.index}", args, kwargs)
        return hidden if self.template is None else replace_hidden(self.template, hidden)


class StandIns:
    """Stand-ins of a model whose layers below some layer are skipped, one per layer, made
    once; ``templates`` (layer -> an output of it) give the layers' output structure."""

    def __init__(self, model: torch.nn.Module, layers_path: str):
        self.model, self.path = model, layers_path.split(".")
        self.templates: dict[int, Any] = {}
        self._made: dict[int, torch.nn.Module] = {}

    def below(self, skip: int) -> torch.nn.Module:
        """The model with its layers below ``skip`` answering with their input."""
        if skip not in self._made:
            self._made[skip] = self._make(skip)
        return self._made[skip]

    def _make(self, skip: int) -> torch.nn.Module:
        chain = [self.model]
        for part in self.path[:-1]:
            chain.append(getattr(chain[-1], part))
        layers = list(getattr(chain[-1], self.path[-1]))
        stand_ins = [_StandIn(i, self.templates.get(i)) for i in range(skip)]
        child: torch.nn.Module = torch.nn.ModuleList(stand_ins + layers[skip:])
        for module, name in reversed(list(zip(chain, self.path))):
            copied = copy.copy(module)  # shares parameters, buffers and hooks with the model
            copied._modules = {**module._modules, name: child}
            child = copied
        return child
