"""The op kinds of a plan: one record class per kind, holding what the op needs and how it
acts on its site's tensor when the engine runs it (through :class:`OpEnv`, so the plan never
imports torch).

Kinds that batch (``batchable``) apply to every row of a forward at once, as one indexed write
(``prepare`` then ``write``); the others apply op by op (``apply``).
"""

from .ablate import Mean, Noise, ProjectOut
from .copy import AddSaved, Patch, SetSaved
from .edit import AddVector, Scale, SetVector, Zero
from .env import At, Group, OpEnv
from .keep import Capture, Grad, Save
from .path import PathPatch, Sender
from .python import CallPython

__all__ = [
    "At",
    "Group",
    "OpEnv",
    "Save",
    "Grad",
    "Capture",
    "Zero",
    "Scale",
    "AddVector",
    "SetVector",
    "Patch",
    "AddSaved",
    "SetSaved",
    "Mean",
    "Noise",
    "ProjectOut",
    "PathPatch",
    "Sender",
    "CallPython",
]
