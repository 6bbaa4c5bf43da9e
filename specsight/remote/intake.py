"""The HTTP edge of ``specsight serve``: what ``POST /v1/jobs`` checks before a job is queued,
and how every answer that is not a success is shaped.

Checks, in order: the body size (before any parsing), strict JSON, the
:class:`~.protocol.SubmitRequest` fields, the spec version, the model, the sweep size, then
validation, compilation and limits (:func:`~.admission.prepare_job`). Each failure is an
:class:`ApiError` carrying an :class:`~.protocol.ErrorBody`, as is every other error answer
(:func:`install_error_handlers`). Nothing here touches a model's weights, reads a file or
evaluates anything from the request.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request

from ..compile.dataset_files import SURROGATE_HINT, lone_surrogate
from ..errors import Issue, SpecError, SpecsightError, did_you_mean
from ..spec import SPEC_VERSION, from_data, validate_spec
from ..version import __version__
from . import admission
from .protocol import ErrorBody, Limits, SubmitRequest

if TYPE_CHECKING:
    from ..models.load import LoadedModel

__all__ = [
    "ApiError",
    "error_response",
    "install_error_handlers",
    "openapi_schema",
    "parse_submit",
    "prepare",
    "read_body",
    "validation_issues",
]

log = logging.getLogger("specsight.serve")
_SEEDS = range(-(2**63), 2**64)  # what torch.manual_seed takes


class ApiError(Exception):
    """An error answer: HTTP status, :class:`ErrorBody` and extra headers."""

    def __init__(self, status: int, error: str, message: str, **extra: Any):
        self.headers: dict[str, str] = extra.pop("headers", None) or {}
        self.status, self.body = status, ErrorBody(error=error, message=message, **extra)
        super().__init__(message)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; 413 as soon as it is known to exceed ``limit`` bytes (a declared
    ``Content-Length`` is refused before anything is read)."""

    def too_large(size: int | None) -> ApiError:
        what = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        hint = "send fewer prompts or shorter vectors per job, or split the spec"
        message = f"the request has {what}; the server takes at most {limit}"
        return ApiError(413, "request-too-large", message, hint=hint, estimate=size, limit=limit)

    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared))
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large(None)
    except ClientDisconnect:  # gone, or closed by the body deadline: nobody reads an answer
        message = "the request body did not arrive"
        raise ApiError(408, "body-timeout", message, hint="send the body at once") from None
    return bytes(body)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def validation_issues(errors: Any) -> list[dict[str, Any]]:
    """Pydantic / FastAPI errors as located issue dicts (``code``, ``message``, ``path``)."""
    out = []
    for err in errors:
        path = tuple(p if isinstance(p, int) else str(p) for p in err.get("loc", ()))
        out.append(Issue(str(err.get("type", "invalid")), str(err.get("msg", "")), path).to_dict())
    return out


def parse_submit(body: bytes) -> SubmitRequest:
    """Strict JSON (no NaN/Infinity) holding a SubmitRequest of the current spec version."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # refuses lone surrogates
    except UnicodeEncodeError:
        raise _lone_surrogate(data) from None
    except (ValueError, RecursionError) as exc:
        message = f"the body is not valid JSON: {str(exc)[:200]}"
        raise ApiError(422, "invalid-json", message, hint="send a JSON SubmitRequest") from None
    try:
        req = SubmitRequest.model_validate(data)
    except ValidationError as exc:
        issues = validation_issues(exc.errors())
        message = "the body is not a SubmitRequest"
        raise ApiError(422, "invalid-request", message, issues=issues) from None
    if req.spec_version != SPEC_VERSION:
        message = f"this server speaks spec version {SPEC_VERSION}, not {req.spec_version}"
        raise ApiError(422, "unsupported-spec-version", message, hint="upgrade the older side")
    return req


def _lone_surrogate(data: Any) -> ApiError:
    """A 422 naming where in the spec (or the body) a string holds a lone UTF-16 surrogate."""
    for path, text, _ in admission.strings_in(data):
        found = lone_surrogate(text)
        if found is not None:
            where = path[1:] if path[:1] == ("spec",) else path
            message = (
                f"a string holds a lone surrogate {found}; text must be whole Unicode characters"
            )
            issue = Issue("lone-surrogate", message, where, hint=SURROGATE_HINT)
            return ApiError(422, "invalid-spec", message, issues=[issue.to_dict()])
    return ApiError(422, "invalid-json", "the body holds a lone surrogate", hint=SURROGATE_HINT)


def _model_for(
    models: dict[str, LoadedModel], spec: dict[str, Any], spec_file: str | None
) -> LoadedModel:
    """The loaded model the spec names; a located ``unknown-model`` issue for one not served."""
    ref = spec.get("model")
    model_id = ref.get("id") if isinstance(ref, dict) else ref
    if isinstance(model_id, str) and model_id not in models:
        issues: list[Issue] = []
        try:  # report the spec's other problems along with the model
            validate_spec(from_data(spec, file=spec_file))
        except SpecError as exc:
            issues = [i for i in exc.issues if i.path[:1] != ("model",)]
        hint = did_you_mean(model_id, models) or f"this server runs: {', '.join(sorted(models))}"
        message = f"this server does not run '{model_id}'"
        issues.insert(0, Issue("unknown-model", message, ("model",), spec_file, hint=hint))
        raise SpecError(issues)
    # a missing or malformed `model` is reported by validation, against any model
    model = models.get(model_id) if isinstance(model_id, str) else None
    model = model or next(iter(models.values()))
    seed = spec.get("seed")
    if isinstance(seed, int) and seed not in _SEEDS:
        message = f"seed {seed} is out of range"
        hint = "use a seed between 0 and 2**63 - 1"
        raise SpecError(Issue("bad-value", message, ("seed",), spec_file, hint=hint))
    if isinstance(ref, dict) and ref.get("dtype", model.dtype) != model.dtype:
        message = f"this server runs '{model.model_id}' in {model.dtype}, not {ref['dtype']}"
        hint = f"remove model.dtype or write {model.dtype}"
        raise SpecError(Issue("dtype-mismatch", message, ("model", "dtype"), spec_file, hint=hint))
    return model


def prepare(
    models: dict[str, LoadedModel], req: SubmitRequest, limits: Limits
) -> tuple[LoadedModel, admission.PreparedJob]:
    """Model, validation, compilation and limits: 422 (located issues) or 413 (limits)."""
    try:
        admission.check_text_bytes(req.spec, limits)  # before even the model's check validates
        model = _model_for(models, req.spec, req.spec_file)
        return model, admission.prepare_job(req.spec, model, limits, spec_file=req.spec_file)
    except SpecError as exc:
        issues = [i.to_dict() for i in exc.issues]
        raise ApiError(422, "invalid-spec", exc.render(), issues=issues) from None
    except admission.LimitError as exc:
        raise ApiError(413, **exc.to_dict()) from None
    except SpecsightError as exc:
        raise ApiError(422, "invalid-spec", str(exc)) from None
    except RecursionError:
        raise ApiError(422, "invalid-spec", "the spec is nested too deeply") from None
    except MemoryError:
        raise ApiError(413, "limit-exceeded", "the job is too large to compile") from None
    except Exception as exc:  # a malformed spec that validation let through: say so, log it
        log.exception("compiling a submitted spec failed unexpectedly")
        message = f"the spec could not be compiled: {type(exc).__name__}: {str(exc)[:300]}"
        hint = "check the values the message names; if the spec looks right, report a bug"
        raise ApiError(422, "invalid-spec", message, hint=hint) from None


# --- answers -------------------------------------------------------------------------------


def error_response(
    status: int, body: ErrorBody, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.body, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        body = ErrorBody(
            error="invalid-request",
            message="the request is invalid",
            issues=validation_issues(exc.errors()),
        )
        return error_response(422, body)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not-found", 405: "method-not-allowed"}
        body = ErrorBody(error=codes.get(exc.status_code, "http-error"), message=str(exc.detail))
        return error_response(exc.status_code, body, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        body = ErrorBody(
            error="internal-error",
            message="internal server error",
            hint="this is a bug in specsight serve; the operator has the log",
        )
        return error_response(500, body)


def openapi_schema(app: FastAPI, models: dict[str, LoadedModel]) -> dict[str, Any]:
    """FastAPI's schema, plus SubmitRequest (read by hand, see ``submit``) whose ``spec`` is
    the spec v1 JSON Schema: clients and fuzzers see what a spec looks like."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    from ..spec import json_schema

    doc = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    spec = json.loads(json.dumps(json_schema()).replace('"#/$defs/', '"#/components/schemas/'))
    for name, sub in spec.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    served = sorted(models)  # the model ids this server accepts
    spec["properties"]["model"]["anyOf"][0]["enum"] = served
    schemas["ModelRef"]["properties"]["id"]["enum"] = served
    dtypes = sorted({m.dtype for m in models.values()})
    schemas["ModelRef"]["properties"]["dtype"]["enum"] = dtypes
    schemas["Spec"] = {k: v for k, v in spec.items() if k not in ("$schema", "$id")}
    submit = SubmitRequest.model_json_schema()
    submit["properties"]["spec"] = {"$ref": "#/components/schemas/Spec"}
    submit["properties"]["spec_version"]["enum"] = [SPEC_VERSION]
    schemas["SubmitRequest"] = submit
    if served:  # a request that runs, for readers of the document and for fuzzers' first case
        body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
        body["example"] = {
            "spec": {
                "specsight": SPEC_VERSION,
                "model": served[0],
                "invokes": {"a": {"prompt": "The Eiffel Tower is in the city of"}},
                "metrics": {"top": {"kind": "top_k", "invoke": "a", "k": 5}},
            },
            "spec_version": SPEC_VERSION,
            "client_version": __version__,
        }
    app.openapi_schema = doc
    return doc
