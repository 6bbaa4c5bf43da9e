"""The job worker of ``specsight serve``: one thread that claims queued jobs and runs them.

Queued jobs of the same model are claimed together and run through
:func:`~specsight.remote.batching.run_jobs` in shared forwards. A job that fails is failed alone:
when a batch fails as a whole, its jobs are run again one by one (logged as a warning and
counted in ``/metrics`` as ``specsight_batch_fallbacks``). A cancelled job stops at the
next forward or decode step, and so does a job past its time limit; a draining server stops claiming, lets the running batch finish within a grace
period and otherwise gives its jobs back to the queue.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import RunError, SpecError, SpecsightError
from . import admission, batching
from .protocol import ErrorBody, Limits

if TYPE_CHECKING:
    from ..models.load import LoadedModel
    from ..results import Results
    from .jobs import JobStoreBase
    from .records import JobRecord
    from .telemetry import ServerMetrics

__all__ = ["Worker", "error_body"]

log = logging.getLogger("specsight.serve")
_MESSAGE_MAX = 4000
_WRITE_EVERY_S = 0.25  # progress and heartbeat writes at most this often (each is an fsync)


class _Stop(BaseException):
    """Raised from the progress callback to leave the engine; not an ``Exception``, so that
    no error handling on the way mistakes it for a failing job."""


class _Cancelled(_Stop):
    """A job of the running batch was cancelled by its owner (or is no longer ours)."""


class _Aborted(_Stop):
    """The server is shutting down and the grace period is over."""


def error_body(exc: BaseException) -> ErrorBody:
    """The ErrorBody a failed job reports for ``exc``."""
    if isinstance(exc, SpecError):
        issues = [i.to_dict() for i in exc.issues]
        return ErrorBody(error="invalid-spec", message=exc.render(), issues=issues)
    if isinstance(exc, admission.LimitError):
        return ErrorBody(**exc.to_dict())
    if isinstance(exc, RunError):
        message, hint = exc.message[:_MESSAGE_MAX], exc.hint
        code = "out-of-memory" if "out of memory" in message else "run-error"
        return ErrorBody(error=code, message=message, hint=hint)
    if isinstance(exc, SpecsightError):
        return ErrorBody(error="run-error", message=str(exc)[:_MESSAGE_MAX])
    if type(exc).__name__ == "OutOfMemoryError":
        hint = "the job needs more memory than the server has free; sweep fewer cells per job"
        return ErrorBody(error="out-of-memory", message=str(exc)[:_MESSAGE_MAX], hint=hint)
    message = f"{type(exc).__name__}: {exc}"[:_MESSAGE_MAX]
    return ErrorBody(error="internal-error", message=message, hint="report this to the operator")


class Worker:
    """Claims and runs jobs in a daemon thread; :meth:`run_once` runs one batch synchronously."""

    def __init__(
        self,
        models: dict[str, LoadedModel],
        store: JobStoreBase,
        limits: Limits,
        *,
        batch_jobs: int = 16,
        idle_s: float = 0.05,
        expire_every_s: float = 5.0,
        metrics: ServerMetrics | None = None,
        model: str | None = None,
    ):
        self.models, self.store, self.limits = models, store, limits
        #: claim only this model's jobs (a replica of one model; None: every model's)
        self.model = model
        self.metrics = metrics
        self.batch_jobs = max(1, batch_jobs)
        self.idle_s, self.expire_every_s = idle_s, expire_every_s
        self.id = f"worker-{secrets.token_hex(4)}"
        self.wake = threading.Event()  # set by submit: a job may be waiting
        self._stop = threading.Event()  # stop claiming
        self._abort = threading.Event()  # leave the running batch at the next forward
        self._lock = threading.Lock()
        self._running: list[str] = []
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.id, daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def stop(self, grace_s: float = 30.0) -> list[str]:
        """Stop claiming; wait up to ``grace_s`` for the running batch, then give its jobs
        back to the queue. Returns the ids of the jobs given back."""
        self._stop.set()
        self.wake.set()
        if self._thread is None:
            return []
        self._thread.join(grace_s)
        if not self._thread.is_alive():
            return []
        self._abort.set()  # the engine leaves at its next forward
        self._thread.join(min(2.0, grace_s))
        given_back = [job for job in self.running if self.store.requeue(job, self.id)]
        if given_back:
            log.warning("grace period over: %d job(s) back in the queue", len(given_back))
        return given_back

    def _loop(self) -> None:
        next_expiry = 0.0
        while not self._stop.is_set():
            ran = 0
            try:
                if time.monotonic() >= next_expiry:
                    next_expiry = time.monotonic() + self.expire_every_s
                    self.store.expire_leases()
                    self.store.expire_results()
                ran = self.run_once()
            except Exception:  # the store or a bug: keep serving, but say so
                log.exception("worker error")
                time.sleep(max(self.idle_s, 0.5))
            if not ran:
                self.wake.wait(self.idle_s)
                self.wake.clear()

    # --- one batch ----------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim up to ``batch_jobs`` queued jobs of one model and run them; the count."""
        if self._stop.is_set():
            return 0
        records = self.store.claim(self.id, model=self.model, limit=self.batch_jobs)
        if not records:
            return 0
        with self._lock:
            self._running = [r.id for r in records]
        try:
            self._run_records(records)
        except _Aborted:
            for rec in records:
                self.store.requeue(rec.id, self.id)
        finally:
            with self._lock:
                self._running = []
        return len(records)

    def _run_records(self, records: list[JobRecord]) -> None:
        model = self.models.get(records[0].model)
        prepared: list[tuple[JobRecord, admission.PreparedJob]] = []
        for rec in records:
            try:
                if model is None:
                    raise RunError(f"this server no longer runs model '{rec.model}'")
                spec = json.loads(rec.spec_json)
                job = admission.prepare_job(spec, model, self.limits, spec_file=rec.spec_file)
            except Exception as exc:
                self._fail(rec, exc)
                continue
            prepared.append((rec, job))
        if model is None:
            return
        # one merged run uses one seed and one determinism setting: group jobs by them
        groups: dict[tuple[int, bool], list[tuple[JobRecord, admission.PreparedJob]]] = {}
        for rec, job in prepared:
            groups.setdefault((job.plan.seed, job.plan.deterministic), []).append((rec, job))
        for group in groups.values():
            self._run_group(group, model)

    def _run_group(
        self, group: list[tuple[JobRecord, admission.PreparedJob]], model: LoadedModel
    ) -> None:
        pending = list(group)
        while pending:
            try:
                results = self._execute(pending, model)
            except _Cancelled:
                keep = []
                for rec, job in pending:
                    if self.store.cancel_requested(rec.id):
                        if self.store.acknowledge_cancel(rec.id, self.id):
                            self._finished(rec, "cancelled")
                    else:
                        keep.append((rec, job))
                pending = keep
                continue
            except Exception as exc:
                if len(pending) == 1:
                    self._fail(pending[0][0], exc)
                else:  # run them one by one to find the job that failed: the others succeed
                    ids = [rec.id for rec, _ in pending]
                    log.warning(
                        "a batch of %d jobs failed (%s); running them one by one", len(pending),
                        str(exc).split("\n")[0], extra={"job_ids": ids, "worker": self.id},
                    )  # fmt: skip
                    if self.metrics is not None:
                        self.metrics.fallback("failure")
                    for item in pending:
                        self._run_group([item], model)
                return
            for (rec, _), result in zip(pending, results):
                self._deliver(rec, result)
            return

    def _execute(
        self, group: list[tuple[JobRecord, admission.PreparedJob]], model: LoadedModel
    ) -> list[Results]:
        ids = [rec.id for rec, _ in group]
        rows = [len(job.plan.rows) for _, job in group]
        limit = self.limits.max_job_seconds
        deadline = time.monotonic() + limit
        last = {"write": 0.0, "check": 0.0}

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if done >= total or now - last["write"] >= _WRITE_EVERY_S:
                last["write"] = now
                for job_id, n in zip(ids, rows):
                    share = n if done >= total else min(n, round(done / max(total, 1) * n))
                    self.store.progress(job_id, share, n)

        def checkpoint() -> None:
            """Before every forward and decode step: shutdown, time limit, cancel, lease."""
            if self._abort.is_set():
                raise _Aborted()
            now = time.monotonic()
            if now > deadline:
                hint = "sweep fewer cells or generate fewer tokens per job"
                raise admission.LimitError(
                    "run time (s)", int(now - deadline + limit), int(limit), hint
                )
            if now - last["check"] >= _WRITE_EVERY_S:
                last["check"] = now
                for job_id in ids:
                    self.store.heartbeat(job_id, self.id)
                if any(self.store.cancel_requested(job_id) for job_id in ids):
                    raise _Cancelled()

        started = time.perf_counter()
        try:
            jobs = [job for _, job in group]
            results = self._run_batch(ids, jobs, model, progress, checkpoint)
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc):
                _empty_cache()
            raise
        seconds = time.perf_counter() - started
        log.info(
            "ran %d job(s) in %.2fs: %s", len(ids), seconds, ids,
            extra={"job_ids": ids, "worker": self.id},
        )  # fmt: skip
        if self.metrics is not None:
            self.metrics.batch(len(ids), sum(rows), seconds)
        return results

    def _run_batch(
        self,
        ids: list[str],
        jobs: list[admission.PreparedJob],
        model: LoadedModel,
        progress: Callable[[int, int], None],
        checkpoint: Callable[[], None],
    ) -> list[Results]:
        """Run one batch of prepared jobs (``ids``: their job ids); a replica of a cluster
        overrides this to split a large sweep across replicas."""
        return batching.run_jobs(jobs, model, progress=progress, checkpoint=checkpoint)

    def _deliver(self, rec: JobRecord, result: Results) -> None:
        try:
            data, manifest = result.payload()
        except Exception as exc:
            self._fail(rec, exc)
            return
        digest = hashlib.sha256(data).hexdigest()
        if self.store.succeed(rec.id, self.id, result=data, manifest_json=manifest, sha256=digest):
            self._finished(rec, "succeeded")

    def _fail(self, rec: JobRecord, exc: BaseException) -> None:
        body = error_body(exc)
        if body.error == "internal-error":
            log.error("job %s failed", rec.id, exc_info=exc, extra={"job_id": rec.id})
        if self.store.fail(rec.id, self.id, body):
            ended = self.store.record(rec.id)  # a pending cancel wins over the failure
            self._finished(rec, ended.state if ended is not None else "failed")

    def _finished(self, rec: JobRecord, outcome: str) -> None:
        log.info("job %s %s", rec.id, outcome, extra={"job_id": rec.id, "worker": self.id})
        if self.metrics is not None:
            self.metrics.finished(rec.created, outcome)


def _empty_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass
