"""The HTTP client of ``specsight serve`` (:class:`RemoteClient`): models and tokenizers,
submitting with an idempotency key, polling, cancelling, and downloading the exact
``results.safetensors`` bytes the server wrote, checked against the server's sha256 and each
tensor's sha256. Failures are :class:`~specsight.errors.RunError` with a hint, or a located
SpecError. Wire protocol: :mod:`specsight.remote.protocol`; the whole ``--remote`` run:
:mod:`specsight.remote.submit`.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import tokenizers
from pydantic import ValidationError

from ..errors import Issue, RunError, SpecError
from ..models import Tokenizer
from ..spec import SPEC_VERSION, LoadedDoc
from ..version import __version__
from . import protocol as P
from .protocol import ErrorBody, JobStatus, ModelEntry, ModelsResponse

if TYPE_CHECKING:
    from ..results import Results

__all__ = ["KEY_HINT", "RemoteClient", "error_from_body", "relocate", "results_from_bytes"]

KEY_HINT = "set SPECSIGHT_API_KEY or pass --api-key"
_MAX_RETRY_AFTER = 30.0  # seconds: a longer Retry-After is cut to this
StatusCallback = Callable[[JobStatus], None]


class _QueueFull(RunError):
    """HTTP 429 (queue full) or 503 (draining): retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


def _issue_from_wire(data: dict[str, Any]) -> Issue:
    parts = data.get("path_parts")
    path = tuple(p for p in parts if isinstance(p, str | int)) if isinstance(parts, list) else ()
    code, message = str(data.get("code") or "invalid-spec"), str(data.get("message") or "invalid")
    return Issue(code, message, path, *(data.get(k) for k in ("file", "line", "col", "hint")))


def error_from_body(body: ErrorBody, prefix: str = "") -> RunError | SpecError:
    """The exception standing for an error body (a 4xx answer or a failed job's error)."""
    if body.issues or body.error == "invalid-spec":
        issues = [_issue_from_wire(i) for i in body.issues]
        return SpecError(issues or [Issue(body.error, body.message, hint=body.hint)])
    message = body.message
    if body.estimate is not None and body.limit is not None and str(body.limit) not in message:
        message += f" (estimate {body.estimate:,}, limit {body.limit:,})"
    if body.error == "limit-exceeded" or body.estimate is not None:
        prefix = prefix or "the job is too large for the server: "
    return RunError(prefix + message, hint=body.hint)


def relocate(exc: SpecError, doc: LoadedDoc | None) -> SpecError:
    """The issues of a server's SpecError, located in the local spec file by their paths."""
    if doc is None:
        return exc
    issues = []
    for issue in exc.issues:
        line, col = doc.source.locate(issue.path)
        if line is None:
            line, col = issue.line, issue.col
        issues.append(Issue(issue.code, issue.message, issue.path, doc.file, line, col, issue.hint))
    return SpecError(issues)


class RemoteClient:
    """A client of one specsight server (API v1). Use as a context manager, or :meth:`close`.

    ``transport`` (e.g. ``httpx.MockTransport``) or ``client`` (e.g. FastAPI's TestClient, an
    ``httpx.Client``) replace the network for tests. ``retries`` bounds the retries of a request
    after a connection error; ``queue_retries`` those of a submit refused with 429.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        client: httpx.Client | None = None,
        retries: int = 2,
        queue_retries: int = 5,
    ):
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout
        self.retries, self.queue_retries = retries, queue_retries
        self._own = client is None
        self._http = client or httpx.Client(timeout=timeout, transport=transport)
        self._sleep: Callable[[float], None] = time.sleep
        self._models: ModelsResponse | None = None
        self._tokenizers: dict[str, Tokenizer] = {}

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport -------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried after connection errors; an error answer raises."""
        headers = kwargs.pop("headers", {})
        if self.api_key:
            headers[P.API_KEY_HEADER] = self.api_key
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, self.url + path, headers=headers, **kwargs)
                break
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise self._transport_error(exc) from None
                self._sleep(min(0.25 * 2**attempt, 2.0))
        if response.status_code not in (200, 202):
            raise self._http_error(response)
        return response

    def _transport_error(self, exc: httpx.TransportError) -> RunError:
        if isinstance(exc, httpx.ConnectError):
            return RunError(
                f"cannot reach {self.url}: is `specsight serve` running?", hint=f"{exc}"
            )
        if isinstance(exc, httpx.TimeoutException):
            return RunError(
                f"{self.url} did not answer within {self.timeout:g} s",
                hint="the server may be busy; try again later",
            )
        return RunError(f"lost the connection to {self.url}: {exc or type(exc).__name__}")

    def _http_error(self, response: httpx.Response) -> RunError | SpecError:
        code = response.status_code
        try:
            body = ErrorBody.model_validate(response.json())
        except (ValueError, ValidationError):
            text = response.text.strip()[:200] or response.reason_phrase
            body = ErrorBody(error=f"http-{code}", message=text)
        if code in (401, 403):
            what = "refused the API key" if self.api_key else "needs an API key"
            return RunError(f"the server at {self.url} {what}", hint=KEY_HINT)
        if code == 429 or (code == 503 and "Retry-After" in response.headers):
            retry = response.headers.get("Retry-After", "1")
            after = float(retry) if retry.replace(".", "", 1).isdigit() else 1.0
            return _QueueFull(body.message, min(max(after, 0.0), _MAX_RETRY_AFTER))
        if code in (413, 422):
            return error_from_body(body)
        if code == 404:
            return RunError(f"{self.url}: {body.message}", hint=body.hint)
        return RunError(f"the server answered {code}: {body.message}", hint=body.hint)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return self._request(method, path, **kwargs).json()
        except ValueError:
            hint = "is this a specsight server?"
            raise RunError(f"{self.url} did not answer with JSON", hint=hint) from None

    # --- models ----------------------------------------------------------------------------

    def models(self) -> ModelsResponse:
        """The server's models, limits and versions (checked against this client's)."""
        if self._models is not None:
            return self._models
        data = self._json("GET", "/v1/models")
        api = data.get("api_version", P.API_VERSION) if isinstance(data, dict) else None
        if api != P.API_VERSION:
            raise RunError(
                f"the server at {self.url} speaks API version {api}; "
                f"this client speaks version {P.API_VERSION}",
                hint=f"install the same specsight on both sides (this client is {__version__})",
            )
        try:
            listing = ModelsResponse.model_validate(data)
        except ValidationError as exc:
            raise RunError(
                f"unexpected model list from {self.url}: {exc}".splitlines()[0]
            ) from None
        if listing.spec_version != SPEC_VERSION:
            raise RunError(
                f"the server reads spec format version {listing.spec_version}; "
                f"this specsight writes version {SPEC_VERSION}",
                hint=f"server {listing.server_version}, client {__version__}: upgrade the older one",
            )
        self._models = listing
        return listing

    def model_entry(self, model_id: str) -> ModelEntry:
        """The server's entry for ``model_id``; a RunError naming the models it has otherwise."""
        entries = self.models().models
        for entry in entries:
            if entry.id == model_id:
                return entry
        names = ", ".join(e.id for e in entries) or "none"
        raise RunError(
            f"the server at {self.url} does not run model '{model_id}'", hint=f"it runs: {names}"
        )

    def tokenizer(self, model_id: str) -> Tokenizer:
        """The tokenizer of one of the server's models (downloaded once per client)."""
        if model_id not in self._tokenizers:
            response = self._request("GET", f"/v1/models/{model_id}/tokenizer")
            try:
                backend = tokenizers.Tokenizer.from_str(response.text)
            except Exception as exc:  # a tokenizers parse error has no specific class
                raise RunError(f"the server sent an unreadable tokenizer: {exc}") from None
            self._tokenizers[model_id] = Tokenizer(backend)
        return self._tokenizers[model_id]

    # --- jobs ------------------------------------------------------------------------------

    def submit(
        self,
        spec_data: dict[str, Any],
        *,
        spec_file: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobStatus:
        """Submit a job. The idempotency key is reused when the POST is retried, so a lost
        answer never starts a job twice; a full queue (429) is retried after Retry-After."""
        if spec_file is not None and len(spec_file) > 300:
            spec_file = "..." + spec_file[-297:]
        request = P.SubmitRequest(
            spec=spec_data,
            spec_file=spec_file,
            client_version=__version__,
            spec_version=SPEC_VERSION,
        )
        body = request.model_dump(mode="json")
        headers = {P.IDEMPOTENCY_HEADER: idempotency_key or uuid.uuid4().hex}
        for attempt in range(self.queue_retries + 1):
            try:
                return JobStatus.model_validate(
                    self._json("POST", "/v1/jobs", json=body, headers=headers)
                )
            except _QueueFull as exc:
                if attempt == self.queue_retries:
                    raise RunError(
                        f"the server is still busy after {attempt + 1} tries: {exc}",
                        hint="try again later, or ask the server's operator for a longer queue",
                    ) from None
                self._sleep(exc.retry_after)
        raise AssertionError("unreachable")

    def status(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._json("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a job (a finished one stays as it is)."""
        return JobStatus.model_validate(self._json("DELETE", f"/v1/jobs/{job_id}"))

    def wait(
        self,
        job_id: str,
        *,
        poll: float = 0.2,
        on_status: StatusCallback | None = None,
        timeout: float | None = None,
    ) -> JobStatus:
        """Poll until the job is finished (the delay grows from ``poll`` to 1 s); RunError when
        ``timeout`` seconds pass first (the job is left alone)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll
        while True:
            status = self.status(job_id)
            if on_status is not None:
                on_status(status)
            if status.state in P.TERMINAL_STATES:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise RunError(
                    f"remote job {job_id} did not finish within {timeout:g} s",
                    hint=f"it was {status.state}",
                )
            self._sleep(delay)
            delay = min(delay * 1.5, max(poll, 1.0))

    def download(
        self, job_id: str, status: JobStatus | None = None
    ) -> tuple[bytes, dict[str, Any]]:
        """The result bytes (checked against the header's and the status's sha256) and manifest."""
        status = status or self.status(job_id)
        if status.state != "succeeded":
            raise RunError(f"remote job {job_id} has no result: it is {status.state}")
        response = self._request("GET", f"/v1/jobs/{job_id}/result")
        data = response.content
        digest = hashlib.sha256(data).hexdigest()
        for source, expected in (
            (f"the {P.SHA256_HEADER} header", response.headers.get(P.SHA256_HEADER)),
            ("the job status", status.result_sha256),
        ):
            if expected != digest:
                raise RunError(
                    f"the result of job {job_id} is corrupt: its sha256 {digest[:12]}... "
                    f"does not match {source} ({str(expected)[:12]}...)",
                    hint="download it again; if this persists, report it to the server operator",
                )
        manifest = self._json("GET", f"/v1/jobs/{job_id}/manifest")
        if not isinstance(manifest, dict):
            raise RunError(f"the manifest of job {job_id} is not a JSON object")
        return data, manifest

    def fetch(self, job_id: str, status: JobStatus | None = None) -> Results:
        """Download a succeeded job's result, verify every checksum, and build its Results."""
        data, manifest = self.download(job_id, status)
        return results_from_bytes(data, manifest, job_id=job_id)


def results_from_bytes(data: bytes, manifest: dict[str, Any], *, job_id: str = "?") -> Results:
    """Results from safetensors bytes and a manifest, checking each tensor's sha256."""
    from safetensors.torch import load

    from ..results import Results, tensor_sha256

    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error type
        raise RunError(f"the result of job {job_id} is not a safetensors file: {exc}") from None
    manifest = dict(manifest)
    summary = manifest.pop("summary", None) or {}
    meta = manifest.get("tensors", {})
    if set(meta) != set(tensors):
        missing = sorted(set(meta) ^ set(tensors))
        raise RunError(f"the result of job {job_id} and its manifest disagree on {missing[:5]}")
    for name, tensor in tensors.items():
        if tensor_sha256(tensor) != meta[name].get("sha256"):
            raise RunError(
                f"tensor '{name}' of job {job_id} does not match its sha256 in the manifest",
                hint="download it again; if this persists, report it to the server operator",
            )
    items = sorted(tensors.items())
    metrics = {n: t for n, t in items if meta[n].get("kind") != "save"}
    saves = {n: t for n, t in items if meta[n].get("kind") == "save"}
    next_tokens = {
        inv: [[(tok, prob) for tok, prob in prompt] for prompt in per]
        for inv, per in summary.get("next_tokens", {}).items()
    }
    return Results(metrics, saves, manifest, next_tokens, summary.get("prompts", {}))
