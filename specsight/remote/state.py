"""What the routes of ``specsight serve`` share (``app.state.server``): the models, the job
store, keys, limits, the worker (or, in a cluster, how to reach the replicas) and the draining
flag that ``/readyz`` reports."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .auth import KeyRing
from .fairness import FairIntake
from .jobs import JobStoreBase
from .protocol import ConnectionLimits, Limits
from .telemetry import ServerMetrics
from .worker import Worker

if TYPE_CHECKING:
    from ..models.load import LoadedModel

__all__ = ["ServerState"]

log = logging.getLogger("specsight.serve")


@dataclass
class ServerState:
    """What the routes share (``app.state.server``)."""

    models: dict[str, LoadedModel]
    store: JobStoreBase
    keys: KeyRing
    limits: Limits
    worker: Worker
    start_worker: bool
    grace_s: float
    draining: threading.Event = field(default_factory=threading.Event)
    #: threads that check and compile submitted specs: their own, not the event loop's
    #: shared pool, so a burst of submits never starves status polls and downloads; shared
    #: fairly between keys
    intake: FairIntake = field(default_factory=FairIntake)
    #: the connection deadlines and caps uvicorn runs with (set by ``server_config``)
    connections: ConnectionLimits | None = None
    #: Prometheus metrics (``GET /metrics``)
    metrics: ServerMetrics | None = None
    #: called with a model id after each new job (a cluster wakes one of its replicas)
    notify: Callable[[str], None] | None = None
    #: a cluster's replicas: {model id: {replica state: count}} (None: the worker thread runs
    #: the jobs in this process)
    replica_states: Callable[[], dict[str, dict[str, int]]] | None = None

    def begin_drain(self) -> None:
        """Answer 503 on /readyz and refuse new jobs from now on."""
        if not self.draining.is_set():
            log.info("draining: no new jobs; finishing the running batch")
        self.draining.set()

    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """Why the server takes no jobs now (None: ready)."""
        if self.draining.is_set():
            return "draining"
        if self.start_worker and not self.worker.is_alive():
            return "worker-down"
        if self.replica_states is not None:
            states = self.replica_states()
            # none running, but some starting or failed ({}: scaled to zero on purpose)
            if any(by_state and not by_state.get("RUNNING") for by_state in states.values()):
                return "no-replica"
        return None
