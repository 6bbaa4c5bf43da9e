"""A job as a job store keeps it (:class:`JobRecord`, with its wire view), and the refusal a
full queue gives (:class:`QueueFull`)."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import ErrorBody, JobState, JobStatus, Progress

__all__ = ["JobRecord", "QueueFull"]


class QueueFull(Exception):
    """The queue, or one key's share of it, is full (HTTP 429 with ``Retry-After``)."""

    def __init__(self, queued: int, limit: int, retry_after: int, *, whose: str = "the"):
        self.queued, self.limit, self.retry_after = queued, limit, retry_after
        super().__init__(f"{whose} job queue is full ({queued} queued, limit {limit})")


@dataclass(frozen=True)
class JobRecord:
    """One job as stored. ``seq`` orders the queue (insertion order)."""

    id: str
    owner: str
    model: str
    state: JobState
    spec_json: str
    spec_file: str | None
    attempts: int
    created: float
    started: float | None
    finished: float | None
    progress_done: int
    progress_total: int
    error: ErrorBody | None
    result_sha256: str | None
    cancel_requested: bool
    worker: str | None
    lease_until: float | None
    result_estimate: int = 0
    seq: int = 0

    @classmethod
    def from_row(cls, row: tuple) -> JobRecord:
        """A record from a database row (columns in the stores' column order)."""
        vals = list(row)
        vals[12] = ErrorBody.model_validate_json(vals[12]) if vals[12] else None
        vals[14] = bool(vals[14])
        return cls(*vals)

    def to_status(self, queue_position: int | None = None) -> JobStatus:
        """The wire view; ``queue_position`` only means something for a queued job."""
        return JobStatus(
            id=self.id,
            state=self.state,
            model=self.model,
            queue_position=queue_position if self.state == "queued" else None,
            progress=Progress(done=self.progress_done, total=self.progress_total),
            attempts=self.attempts,
            created=self.created,
            started=self.started,
            finished=self.finished,
            error=self.error,
            result_sha256=self.result_sha256,
        )
