"""What Ray Serve says of a config's deployments: their replicas by state. The ingress's
``/readyz`` and ``/metrics`` and each replica deciding whether to split a job ask often, so
the answer is read from Ray Serve at most once a second."""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["DEPLOYMENT", "ReplicaStates"]

log = logging.getLogger("specsight.serve")
#: the name of a model's deployment inside its Ray Serve application
DEPLOYMENT = "replica"
_TTL_S = 1.0


class ReplicaStates:
    """``states()``: {key: {replica state: count}} of the applications ``apps`` ({key:
    application}); ``{}`` for a deployment autoscaled to zero replicas, MISSING or UNREACHABLE
    when Ray Serve does not know the deployment or cannot be asked."""

    def __init__(self, apps: dict[str, str]) -> None:
        self.apps = apps
        self._lock = threading.Lock()
        self._read: tuple[float, dict[str, dict[str, int]]] = (0.0, {})

    def __call__(self) -> dict[str, dict[str, int]]:
        with self._lock:
            asked, states = self._read
            if asked and time.monotonic() - asked < _TTL_S:
                return states
            from ray import serve

            try:
                status = serve.status().applications
                states = {
                    key: dict(status[app].deployments[DEPLOYMENT].replica_states)
                    if app in status and DEPLOYMENT in status[app].deployments
                    else {"MISSING": 1}
                    for key, app in self.apps.items()
                }
            except Exception:  # the Serve controller unreachable: no replica known to run
                log.warning("Ray Serve's status could not be read", exc_info=True)
                states = {key: {"UNREACHABLE": 1} for key in self.apps}
            self._read = (time.monotonic(), states)
            return states
