"""The ``specsight`` command line (click): :data:`main` is the command group.

Commands by module: ``run`` and ``validate`` (:mod:`.run`); ``plan``, ``schema``, ``sites`` and
``models`` (:mod:`.info`); ``check``, ``diff`` and ``rerun`` (:mod:`.check`); ``report``
(:mod:`.report`); ``serve`` and ``hash-key`` (:mod:`.serve`); ``examples`` and ``init`` (:mod:`.start`). Shared error handling and ``--json`` live in :mod:`.app`.
"""

from . import check, info, report, run, serve, start  # noqa: F401 - importing a module registers its commands
from .app import main

__all__ = ["main"]
