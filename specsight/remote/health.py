"""The server's health routes: ``/healthz`` (the process lives), ``/readyz`` (ready for jobs,
or 503 while draining or with its worker down) and ``/metrics`` (Prometheus text)."""

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
        summary="200 when ready for jobs; 503 while loading or draining",
        responses={503: {"model": ErrorBody, "description": "draining"}},
    )
    def readyz(request: Request) -> Any:
        state = _state(request)
        if state.ready():
            return {"status": "ready", "queued": state.store.queued_count()}
        what = "draining" if state.draining.is_set() else "worker-down"
        return error_response(503, ErrorBody(error=what, message=f"not ready: {what}"))

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
