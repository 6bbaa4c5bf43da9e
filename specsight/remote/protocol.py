"""The wire protocol between ``specsight run --remote`` and ``specsight serve`` (API v1).

Everything crossing the wire is JSON described here, except a job's result, which is the same
``results.safetensors`` bytes a local run writes (``GET /v1/jobs/{id}/result``, with its sha256 in
the ``X-Specsight-Sha256`` header) plus the manifest (``GET /v1/jobs/{id}/manifest``).

Endpoints (all under ``/v1`` need the ``X-API-Key`` header; ``/healthz`` and ``/readyz`` do not):

- ``POST /v1/jobs`` body :class:`SubmitRequest`, optional ``Idempotency-Key`` header
  -> 202 :class:`JobStatus` (or 200 with the existing job for a repeated idempotency key);
  401 bad key, 413 request/limit too large (:class:`ErrorBody` with ``estimate`` and ``limit``),
  422 invalid spec (``issues`` located in the spec), 429 queue full (``Retry-After``).
- ``GET /v1/jobs/{id}`` -> :class:`JobStatus`; 404 for unknown jobs and other keys' jobs.
- ``GET /v1/jobs/{id}/result`` -> safetensors bytes (409 until the job succeeded).
- ``GET /v1/jobs/{id}/manifest`` -> the manifest JSON (409 until the job succeeded).
- ``DELETE /v1/jobs/{id}`` -> :class:`JobStatus` (cancelled, or already finished).
- ``GET /v1/models`` -> :class:`ModelsResponse`; ``GET /v1/models/{id}/tokenizer`` -> tokenizer.json.
- ``GET /v1/limits`` -> :class:`LimitsResponse`: the job limits, the local dataset-file limits,
  the connection deadlines and caps, and the intake slots.
- ``GET /healthz`` -> 200 while the process lives; ``GET /readyz`` -> 200 ready, 503 loading/draining.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "API_VERSION",
    "API_KEY_HEADER",
    "IDEMPOTENCY_HEADER",
    "SHA256_HEADER",
    "JobState",
    "TERMINAL_STATES",
    "SubmitRequest",
    "JobStatus",
    "ErrorBody",
    "Limits",
    "ModelEntry",
    "ModelsResponse",
    "ConnectionLimits",
    "DatasetFileLimits",
    "IntakeLimits",
    "LimitsResponse",
]

API_VERSION = 1
API_KEY_HEADER = "X-API-Key"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SHA256_HEADER = "X-Specsight-Sha256"

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubmitRequest(_Wire):
    """A job: the spec as data (vectors inline; files are refused) and the client's versions."""

    spec: dict[str, Any] = Field(description="the spec, as loaded from its YAML/JSON file")
    spec_file: str | None = Field(
        None, max_length=300, description="the file name, for error messages only"
    )
    client_version: str = Field(max_length=50)
    spec_version: int = Field(1, description="the spec format version the client speaks")


class Progress(_Wire):
    done: int = 0
    total: int = 0


class JobStatus(_Wire):
    id: str
    state: JobState
    model: str
    queue_position: int | None = Field(None, description="0 = next to run; None unless queued")
    progress: Progress = Field(default_factory=Progress)
    attempts: int = 0
    created: float
    started: float | None = None
    finished: float | None = None
    error: ErrorBody | None = None
    result_sha256: str | None = None


class ErrorBody(_Wire):
    """Every 4xx/5xx body. ``issues`` are located spec issues (see specsight.errors.Issue)."""

    error: str = Field(description="a short machine-readable code, e.g. 'invalid-spec'")
    message: str
    hint: str | None = None
    issues: list[dict[str, Any]] = Field(default_factory=list)
    estimate: int | None = None
    limit: int | None = None


class Limits(_Wire):
    """What one job may ask for; checked before any model work."""

    max_request_bytes: int = 2_000_000
    max_rows: int = 20_000
    max_cells: int = 20_000
    max_prompt_tokens: int = 2048
    #: UTF-8 bytes of one prompt, or of any other text of the spec (a token, a dataset field,
    #: a template with a row's values in), checked before anything is tokenized
    max_prompt_bytes: int = 65_536
    max_total_tokens: int = 2_000_000
    max_new_tokens: int = 256
    max_result_bytes: int = 512_000_000
    max_vector_values: int = 65_536
    #: rows an inline dataset may have (the client sends only the rows a sample keeps)
    max_dataset_rows: int = 100_000
    max_queue: int = 64
    #: one key's queued jobs at most: the others keep room in the queue
    max_queue_per_key: int = 16
    #: a job (or a batch of jobs) running longer than this fails, or runs again alone
    max_job_seconds: float = 600.0


class ModelEntry(_Wire):
    id: str
    info: dict[str, Any] = Field(description="ModelInfo as JSON: compile against it client-side")
    dtype: str
    device: str
    weights_sha256: str
    ops: list[str]
    metrics: list[str]
    canonical_sites: list[str]
    saes: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="the SAEs specs may name by id on this model: id -> its config "
        "(architecture, d_in, d_sae, ...)",
    )


class ModelsResponse(_Wire):
    server_version: str
    api_version: int = API_VERSION
    spec_version: int
    limits: Limits
    models: list[ModelEntry]


class ConnectionLimits(_Wire):
    """What one connection may cost the server: deadlines for a request's headers and body,
    and how many connections it keeps open (checked as they are accepted)."""

    header_timeout_s: float = Field(10.0, gt=0, description="seconds to send a request's headers")
    body_timeout_s: float = Field(
        30.0, gt=0, description="seconds to send a request's body, from the end of its headers"
    )
    body_min_bytes_per_s: int = Field(
        1024, ge=0, description="bytes a second a body must average over each window"
    )
    body_window_s: float = Field(5.0, gt=0, description="the window of the body's byte rate")
    keep_alive_s: float = Field(5.0, gt=0, description="an idle kept-alive connection's life")
    max_connections: int | None = Field(
        None, ge=8, description="open connections at most (None: the open-file limit less 64)"
    )
    max_connections_per_address: int = Field(
        64, ge=1, description="connections of one client address without a valid key, at most"
    )


class DatasetFileLimits(_Wire):
    """The limits on a dataset file read by a local run (a server takes inline rows only)."""

    max_rows: int
    max_dataset_bytes: int
    max_line_bytes: int
    max_field_chars: int


class IntakeLimits(_Wire):
    """The threads that check and compile submitted specs, and how keys share them."""

    slots: int = Field(2, ge=1, description="specs checked at once")
    slots_per_key: int = Field(1, ge=1, description="one key's specs checked at once")
    waiting: int = Field(32, ge=0, description="submits waiting for a slot before 503")
    waiting_per_key: int = Field(8, ge=0, description="one key's waiting submits before 429")


class LimitsResponse(_Wire):
    server_version: str
    api_version: int = API_VERSION
    limits: Limits
    dataset_files: DatasetFileLimits
    connections: ConnectionLimits
    intake: IntakeLimits


JobStatus.model_rebuild()
