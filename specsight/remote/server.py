"""``specsight serve``: a FastAPI server that runs submitted specs on models loaded once.

The endpoints are those of :mod:`specsight.remote.protocol`. A submitted spec is checked in
full (size, JSON, fields, spec version, model, validation, compilation, limits) before it is
queued and answered 202; a worker thread (:mod:`specsight.remote.worker`) then runs queued jobs
of the same model together. Every error body is an :class:`~.protocol.ErrorBody`.

Nothing on the request path reads a file named by a request, unpickles or evaluates anything:
specs are data, compiled with file vectors refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader

from ..compile.dataset import MAX_DATASET_BYTES, MAX_FIELD_CHARS, MAX_LINE_BYTES, MAX_ROWS
from ..engine import module_widths
from ..sites import canonical_names
from ..spec import METRIC_KINDS, OP_NAMES, SPEC_VERSION
from ..version import __version__
from .admission import sae_configs
from .auth import KeyRing
from .fairness import IntakeBusy
from .health import health_router
from .intake import (
    ApiError,
    install_error_handlers,
    openapi_schema,
    parse_submit,
    prepare,
    read_body,
)
from .jobs import JobStoreBase, QueueFull
from .protocol import (
    API_KEY_HEADER,
    IDEMPOTENCY_HEADER,
    SHA256_HEADER,
    ConnectionLimits,
    DatasetFileLimits,
    ErrorBody,
    JobStatus,
    Limits,
    LimitsResponse,
    ModelEntry,
    ModelsResponse,
)
from .state import ServerState
from .telemetry import ServerMetrics
from .worker import Worker

if TYPE_CHECKING:
    from ..models.load import LoadedModel

__all__ = ["ApiError", "ServerState", "create_app"]

log = logging.getLogger("specsight.serve")
_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="an API key")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        401: "missing or unknown API key",
        404: "unknown job or model (or another key's job)",
        422: "invalid request",
    }.items()
}
_JSON_SCHEMA = {"type": "object", "additionalProperties": True}


def _state(request: Request) -> ServerState:
    return request.app.state.server


def require_owner(request: Request, key: str | None = Security(_api_key)) -> str:
    """The owner of the request's API key; 401 without a valid one."""
    owner = _state(request).keys.authenticate(key)
    if owner is None:
        raise ApiError(
            401,
            "unauthorized",
            "missing or unknown API key",
            hint=f"send a valid key in the {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": "ApiKey"},
        )
    return owner


# --- the app ----------------------------------------------------------------------------------


def create_app(
    models: dict[str, LoadedModel],
    *,
    store: JobStoreBase,
    keys: KeyRing,
    limits: Limits | None = None,
    batch_jobs: int = 16,
    start_worker: bool = True,
    grace_s: float = 30.0,
    idle_s: float = 0.05,
    notify: Callable[[str], None] | None = None,
    replica_states: Callable[[], dict[str, dict[str, int]]] | None = None,
) -> FastAPI:
    """The API over ``models`` (``{model id: LoadedModel}``), with jobs in ``store``.

    With ``start_worker`` the app's lifespan starts the worker thread and, at shutdown, drains
    it (``grace_s``). The store is not closed here: its owner (e.g. :func:`serve`) does that.
    An ingress of a cluster runs no worker: ``notify(model id)`` follows each new job and
    ``replica_states()`` tells ``/readyz`` and ``/metrics`` about the replicas."""
    if not models:
        raise ValueError("create_app needs at least one model")
    limits = limits or Limits()
    for loaded in models.values():  # result sizes of raw module paths need their widths
        if loaded.module_widths is None:
            loaded.module_widths = module_widths(loaded.model, pad_id=loaded.tokenizer.pad_id)
    metrics = ServerMetrics(store.counts, replica_states)
    worker = Worker(models, store, limits, batch_jobs=batch_jobs, idle_s=idle_s, metrics=metrics)
    state = ServerState(dict(models), store, keys, limits, worker, start_worker, grace_s)
    state.metrics, state.notify, state.replica_states = metrics, notify, replica_states

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_worker:
            worker.start()
        try:
            yield
        finally:
            state.begin_drain()
            given_back = await run_in_threadpool(worker.stop, grace_s)
            if given_back:
                log.warning("requeued after the grace period: %s", given_back)

    app = FastAPI(
        title="specsight",
        version=__version__,
        description="Run specsight specs on the server's models (API v1).",
        lifespan=lifespan,
    )
    app.state.server = state
    install_error_handlers(app)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        return response

    app.include_router(health_router())
    app.include_router(_api_router())
    app.openapi = lambda: openapi_schema(app, app.state.server.models)  # type: ignore[method-assign]
    return app


def _api_router() -> APIRouter:
    # The dependency on the router guards every /v1 route, present and future.
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_owner)], responses=_ERRORS)

    @router.post(
        "/jobs",
        status_code=202,
        response_model=JobStatus,
        summary="Submit a job (202; 200 for a repeated Idempotency-Key)",
        responses={
            200: {"model": JobStatus, "description": "the job of a repeated Idempotency-Key"},
            413: {"model": ErrorBody, "description": "request or job too large"},
            429: {
                "model": ErrorBody,
                "description": "queue full, or this key's intake; see Retry-After",
            },
            503: {"model": ErrorBody, "description": "the server is draining, or its intake full"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/SubmitRequest"}}
                },
            }
        },
    )
    async def submit(
        request: Request,
        owner: str = Depends(require_owner),
        idempotency_key: str | None = Header(None, alias=IDEMPOTENCY_HEADER, max_length=200),
    ) -> Any:
        state = _state(request)
        body = await read_body(request, state.limits.max_request_bytes)
        req = parse_submit(body)
        if state.draining.is_set():
            raise ApiError(
                503,
                "draining",
                "the server is shutting down",
                hint="submit again shortly",
                headers={"Retry-After": "5"},
            )
        try:  # one key's large specs delay only its own (see FairIntake)
            model, job = await state.intake.run(owner, prepare, state.models, req, state.limits)
        except IntakeBusy as exc:
            code = 429 if exc.per_key else 503
            raise ApiError(code, "busy", str(exc), headers={"Retry-After": "2"}) from None
        spec_json = json.dumps(req.spec, ensure_ascii=False)  # key order kept: it orders the plan
        try:
            record, created = await run_in_threadpool(
                lambda: state.store.submit(
                    owner=owner,
                    model=model.model_id,
                    spec_json=spec_json,
                    spec_file=req.spec_file,
                    idempotency_key=idempotency_key,
                    result_estimate=job.result_bytes,
                    max_queue=state.limits.max_queue,
                    max_per_owner=state.limits.max_queue_per_key,
                )
            )
        except QueueFull as exc:
            raise ApiError(
                429,
                "queue-full",
                str(exc),
                hint="retry after Retry-After seconds",
                estimate=exc.queued,
                limit=exc.limit,
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        if not created and (record.spec_json, record.model) != (spec_json, model.model_id):
            message = f"{IDEMPOTENCY_HEADER} '{idempotency_key}' was used for another spec"
            raise ApiError(422, "idempotency-key-reused", message, hint="use a fresh key")
        state.worker.wake.set()
        if created and state.notify is not None:
            state.notify(model.model_id)
        status = await run_in_threadpool(state.store.status, record.id, owner)
        return JSONResponse(status.model_dump(mode="json"), status_code=202 if created else 200)

    def status_of(request: Request, job_id: str, owner: str) -> JobStatus:
        status = _state(request).store.status(job_id, owner)
        if status is None:
            raise ApiError(404, "not-found", f"no job '{job_id}' for this key")
        return status

    @router.get("/jobs/{job_id}", response_model=JobStatus, summary="A job's status")
    def get_job(request: Request, job_id: str, owner: str = Depends(require_owner)) -> Any:
        return status_of(request, job_id, owner)

    def finished_result(request: Request, job_id: str, owner: str) -> tuple[Path, str, str]:
        store = _state(request).store
        found = store.result(job_id, owner)
        if found is None:
            state = status_of(request, job_id, owner).state  # 404 when unknown
            if state == "succeeded":
                days = store.retention_s / 86400
                raise ApiError(
                    410,
                    "result-deleted",
                    f"the result of job '{job_id}' was deleted {days:g} days after the job ended",
                    hint="run the spec again",
                )
            raise ApiError(
                409,
                "not-ready",
                f"job '{job_id}' is {state}, not succeeded",
                hint="poll GET /v1/jobs/{id} until it succeeded",
            )
        return found

    not_ready = {
        409: {"model": ErrorBody, "description": "the job has not succeeded"},
        410: {"model": ErrorBody, "description": "the result was deleted (retention period)"},
    }

    @router.get(
        "/jobs/{job_id}/result",
        summary="The results.safetensors bytes of a succeeded job",
        response_class=Response,
        responses={
            200: {
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
                "description": f"safetensors bytes; their sha256 in {SHA256_HEADER}",
            },
            **not_ready,
        },
    )
    def get_result(request: Request, job_id: str, owner: str = Depends(require_owner)) -> Any:
        path, _, digest = finished_result(request, job_id, owner)
        # streamed from disk: a download does not hold the result in memory
        return FileResponse(
            path, media_type="application/octet-stream", headers={SHA256_HEADER: digest}
        )

    @router.get(
        "/jobs/{job_id}/manifest",
        summary="The manifest.json of a succeeded job",
        response_class=Response,
        responses={200: {"content": {"application/json": {"schema": _JSON_SCHEMA}}}, **not_ready},
    )
    def get_manifest(request: Request, job_id: str, owner: str = Depends(require_owner)) -> Any:
        _, manifest, _ = finished_result(request, job_id, owner)
        return Response(manifest, media_type="application/json")

    @router.delete("/jobs/{job_id}", response_model=JobStatus, summary="Cancel a job")
    def cancel_job(request: Request, job_id: str, owner: str = Depends(require_owner)) -> Any:
        status = _state(request).store.cancel(job_id, owner)
        if status is None:
            raise ApiError(404, "not-found", f"no job '{job_id}' for this key")
        return status

    @router.get("/models", response_model=ModelsResponse, summary="The models served here")
    def list_models(request: Request) -> Any:
        state = _state(request)
        entries = [
            ModelEntry(
                id=model_id,
                info=model.info.to_dict(),
                dtype=model.dtype,
                device=str(model.device),
                weights_sha256=model.weights_sha256,
                ops=list(OP_NAMES),
                metrics=list(METRIC_KINDS),
                canonical_sites=canonical_names(model.info),
                saes=sae_configs(model.saes),
            )
            for model_id, model in state.models.items()
        ]
        return ModelsResponse(
            server_version=__version__,
            spec_version=SPEC_VERSION,
            limits=state.limits,
            models=entries,
        )

    @router.get(
        "/limits",
        response_model=LimitsResponse,
        summary="What this server accepts: job limits, dataset files, connections, intake",
    )
    def get_limits(request: Request) -> Any:
        state = _state(request)
        files = DatasetFileLimits(
            max_rows=MAX_ROWS,
            max_dataset_bytes=MAX_DATASET_BYTES,
            max_line_bytes=MAX_LINE_BYTES,
            max_field_chars=MAX_FIELD_CHARS,
        )
        return LimitsResponse(
            server_version=__version__,
            limits=state.limits,
            dataset_files=files,
            connections=state.connections or ConnectionLimits(),
            intake=state.intake.limits,
        )

    @router.get(
        "/models/{model_id:path}/tokenizer",
        summary="A model's tokenizer.json (compile against it client-side)",
        response_class=Response,
        responses={200: {"content": {"application/json": {"schema": _JSON_SCHEMA}}}},
    )
    def get_tokenizer(request: Request, model_id: str) -> Any:
        model = _state(request).models.get(model_id)
        if model is None:
            raise ApiError(
                404,
                "not-found",
                f"this server does not run '{model_id}'",
                hint="see GET /v1/models",
            )
        return Response(model.tokenizer.backend.to_str(), media_type="application/json")

    return router
