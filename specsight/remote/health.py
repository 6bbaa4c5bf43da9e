"""The server's health routes: ``/healthz`` (the process lives), ``/readyz`` (ready for jobs,
or 503 while draining, with its worker down or, in a cluster, a model without a running
replica) and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from .intake import error_response
from .protocol import ErrorBody
from .telemetry import METRICS_CONTENT_TYPE

__all__ = ["health_router"]


def _state(request: Request) -> Any:
    return request.app.state.server


def health_router() -> APIRouter:
    """``/healthz``, ``/readyz`` and ``/metrics`` (no key needed: they hold no job's data)."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz", summary="200 while the process lives")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz",
        summary="200 when ready for jobs; 503 while draining, or with no worker or replica",
        responses={503: {"model": ErrorBody, "description": "draining, or no worker"}},
    )
    def readyz(request: Request) -> Any:
        state = _state(request)
        what = state.not_ready_reason()
        replicas = state.replica_states() if state.replica_states is not None else None
        if what is None:
            body: dict[str, Any] = {"status": "ready", "queued": state.store.queued_count()}
            if replicas is not None:
                body["replicas"] = replicas
            return body
        message = f"not ready: {what}"
        if what == "no-replica" and replicas is not None:
            down = {m: s for m, s in replicas.items() if s and not s.get("RUNNING")}
            message += "; replicas of " + ", ".join(f"{m} {s}" for m, s in down.items())
        return error_response(503, ErrorBody(error=what, message=message))

    @router.get(
        "/metrics",
        summary="Prometheus metrics: jobs by state, queue depth, batch sizes, latencies",
        response_class=PlainTextResponse,
    )
    def metrics(request: Request) -> Response:
        state = _state(request)
        assert state.metrics is not None
        return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return router
