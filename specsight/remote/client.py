"""The client of ``specsight serve``, behind ``specsight run SPEC --remote URL``.

:func:`run_remote` compiles the spec here against the server's ModelInfo and tokenizer (spec
mistakes show with file:line:col before anything is sent), inlines vectors from files beside the
spec, submits it with an idempotency key, polls, and downloads the exact ``results.safetensors``
bytes the server wrote, checked against the server's sha256 and each tensor's sha256. Failures
are :class:`~specsight.errors.RunError` with a hint, or a located SpecError. Wire protocol:
:mod:`specsight.remote.protocol`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import tokenizers
from pydantic import ValidationError

from .. import __version__
from ..api import compile_plan, doc_of, load_spec
from ..compile import DEFAULT_MAX_BATCH
from ..errors import Issue, RunError, SpecError, format_path
from ..load import LoadedDoc
from ..modelinfo import ModelInfo
from ..plan import Plan
from ..spec import SPEC_VERSION, AddOp, FileVector, SetOp, Spec
from ..tokenizer import Tokenizer
from . import protocol as P
from .protocol import ErrorBody, JobStatus, ModelEntry, ModelsResponse
from .runner import refuse_local_only

if TYPE_CHECKING:
    from ..results import Results

__all__ = ["RemoteClient", "run_remote", "KEY_HINT"]

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


def _error_from_body(body: ErrorBody, prefix: str = "") -> RunError | SpecError:
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
            return _error_from_body(body)
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


def inline_file_vectors(spec: Spec, doc: LoadedDoc | None, plan: Plan) -> dict[str, Any]:
    """The spec's data with every ``{file: ...}`` vector replaced by its values, as compiled
    into ``plan`` (a server reads no files). A file named by a sweep variable that gives
    different vectors per cell cannot be inlined: a located SpecError."""
    dump = {"mode": "json", "by_alias": True, "exclude_none": True}
    data = copy.deepcopy(doc.data) if doc is not None else spec.model_dump(**dump)
    keys: dict[str, set[str]] = {}
    for op in plan.ops:
        if op.vector is not None:
            keys.setdefault(op.origin, set()).add(op.vector)
    issues = []
    for name, invoke in spec.invokes.items():
        for index, op in enumerate(invoke.ops):
            attr = "vector" if isinstance(op, AddOp) else "value" if isinstance(op, SetOp) else ""
            if not attr or not isinstance(getattr(op, attr), FileVector):
                continue
            path = ("invokes", name, "ops", index)
            found = keys.get(format_path(path), set())
            if len(found) != 1:
                message = "a vector file that differs per sweep cell cannot be sent to a server"
                where = path + (attr, "file")
                line, col = doc.source.locate(where) if doc else (None, None)
                file = doc.file if doc else None
                hint = "use one file, or run locally"
                issues.append(Issue("remote-file-vector", message, where, file, line, col, hint))
                continue
            values = list(plan.vectors[found.pop()])
            ops = data["invokes"][name]["ops"]
            if isinstance(ops[index], dict) and attr in ops[index]:
                ops[index][attr] = values
            else:
                ops[index] = {**op.model_dump(**dump), attr: values}
    if issues:
        raise SpecError(issues)
    return data


def run_remote(
    source: str | os.PathLike[str] | dict[str, Any] | Spec,
    url: str,
    *,
    api_key: str | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: StatusCallback | None = None,
    client: RemoteClient | None = None,
    poll: float = 0.2,
    timeout: float | None = None,
) -> Results:
    """Run a spec on a specsight server; the same Results (and ``out`` files) as a local run.

    Ctrl-C while waiting cancels the remote job and re-raises KeyboardInterrupt; so does a
    ``timeout`` (seconds) passing, with a RunError."""
    spec = source if isinstance(source, Spec) else load_spec(source)
    doc = doc_of(spec)
    refuse_local_only(spec, doc)
    remote = client or RemoteClient(url, api_key)
    try:
        entry = remote.model_entry(spec.model.id)
        info = ModelInfo.from_dict(entry.info)
        tokenizer = remote.tokenizer(entry.id)
        plan = compile_plan(spec, info, tokenizer, max_batch=DEFAULT_MAX_BATCH, allow_files=True)
        data = inline_file_vectors(spec, doc, plan)
        try:
            job = remote.submit(data, spec_file=doc.file if doc else None)
        except SpecError as exc:
            raise relocate(exc, doc) from None
        try:
            final = remote.wait(job.id, poll=poll, on_status=progress, timeout=timeout)
        except (KeyboardInterrupt, RunError) as exc:
            _cancel_quietly(remote, job.id)
            if isinstance(exc, KeyboardInterrupt):
                raise KeyboardInterrupt(f"cancelled remote job {job.id}") from None
            raise
        if final.state == "cancelled":
            raise RunError(f"remote job {job.id} was cancelled on the server")
        if final.state == "failed":
            body = final.error or ErrorBody(error="failed", message="no reason given")
            error = _error_from_body(body, prefix=f"remote job {job.id} failed: ")
            raise relocate(error, doc) if isinstance(error, SpecError) else error
        result_bytes, manifest = remote.download(job.id, final)
        results = results_from_bytes(result_bytes, manifest, job_id=job.id)
        _local_order(results, spec, plan)
        results.manifest["remote"] = {
            "url": remote.url,
            "job_id": job.id,
            "server_version": remote.models().server_version,
            "spec_file_sha256": doc.sha256 if doc else None,
        }
    finally:
        if client is None:
            remote.close()
    if out is not None:
        _write(Path(out), result_bytes, results)
    return results


def _local_order(results: Results, spec: Spec, plan: Plan) -> None:
    """Tensors, next tokens and prompts in a local run's order (the summary's order)."""

    def ranked(items: dict[str, Any], names: list[str]) -> dict[str, Any]:
        rank: dict[str, int] = {}
        for i, name in enumerate(names):
            rank.setdefault(name, i)
        return dict(sorted(items.items(), key=lambda kv: rank.get(kv[0], len(rank))))

    suffixes = ("", "/ids", "/probs")
    results.metrics = ranked(results.metrics, [m.name + s for m in plan.metrics for s in suffixes])
    results.saves = ranked(results.saves, [s.name for s in plan.saves])
    results.next_tokens = ranked(results.next_tokens, [row.invoke for row in plan.rows])
    results.prompts = ranked(results.prompts, list(spec.invokes))


def _cancel_quietly(remote: RemoteClient, job_id: str) -> None:
    with contextlib.suppress(Exception):  # best effort: the job may be gone, the server down
        remote.cancel(job_id)


def _write(folder: Path, result_bytes: bytes, results: Results) -> None:
    """The files of a local run, with results.safetensors exactly the server's bytes."""
    from ..results import RESULTS_FILE

    results.save(folder)
    tmp = folder / (RESULTS_FILE + ".tmp")
    tmp.write_bytes(result_bytes)
    os.replace(tmp, folder / RESULTS_FILE)
