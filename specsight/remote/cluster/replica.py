"""One replica of a served model on a Ray cluster: the body of the model's Ray Serve deployment.

A replica loads its model once, opens the shared PostgreSQL job store and runs a
:class:`~specsight.remote.worker.Worker` that claims only its model's queued jobs: several jobs
claimed together share forwards, as on a single server. The store is the source of truth, so
a replica that dies loses nothing: its jobs' leases lapse (or its liveness lock goes with its
connection) and another replica claims them again, at most ``max_attempts`` times.

A job of at least ``shard_rows`` rows whose plan can be split (:func:`~specsight.plan.shardable`)
is split into row shards: the replica that claimed it sends each shard through the deployment's
handle (Ray Serve routes them over the replicas), merges what comes back and records the result,
equal bit for bit to a run in one process. A shard whose replica died is sent again.

Ray moves only job ids, forward indices and safetensors bytes between processes; each replica
compiles the job's spec from the store itself.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ...engine import Executor, merge_shards, module_widths, shard_from_bytes, shard_to_bytes
from ...errors import RunError
from ...models.load import load_model
from ...plan import shard_forwards, shardable
from ...results import results_from_raw
from .. import admission
from ..config import ModelEntry
from ..jobs import open_job_store
from ..protocol import Limits
from ..telemetry import log_handler
from ..worker import Worker
from .metrics import ReplicaMetrics
from .status import DEPLOYMENT, ReplicaStates

if TYPE_CHECKING:
    from ...models.load import LoadedModel
    from ...results import Results
    from ..records import JobRecord

__all__ = ["ModelReplica", "ShardingWorker", "hold"]

log = logging.getLogger("specsight.serve")
_SHARD_TRIES = 3  # sends of one shard (a replica died under it) before the job fails
_POLL_S = 0.2


class ShardingWorker(Worker):
    """A replica's worker: one engine run at a time on its model (``run_lock``, shared with the
    shards other replicas send here; the lease is kept while waiting for it), and each large
    shardable job run alone, split across the replicas."""

    def __init__(
        self,
        *args: Any,
        run_lock: threading.Lock,
        shard_rows: int,
        replicas: Callable[[], int],
        handle: Callable[[], Any],
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.run_lock, self.shard_rows = run_lock, shard_rows
        self._replicas, self._handle = replicas, handle

    def _run_group(
        self, group: list[tuple[JobRecord, admission.PreparedJob]], model: LoadedModel
    ) -> None:
        """A large shardable job is a group of its own: its own time limit, cancel and
        failure, and its numbers those of a run in one process."""
        big = [item for item in group if self._splits(item[1])]
        if not big or len(group) == 1:
            super()._run_group(group, model)
            return
        for item in big:
            super()._run_group([item], model)
        rest = [item for item in group if not self._splits(item[1])]
        if rest:
            super()._run_group(rest, model)

    def _run_batch(
        self,
        ids: list[str],
        jobs: list[admission.PreparedJob],
        model: LoadedModel,
        progress: Callable[[int, int], None],
        checkpoint: Callable[[], None],
    ) -> list[Results]:
        if len(jobs) == 1 and self._splits(jobs[0]):
            parts = self._replicas()
            if parts > 1:
                return [self._sharded(ids[0], jobs[0], model, parts, progress, checkpoint)]
            log.info("job %s runs here in one piece: no other replica runs", ids[0],
                     extra={"job_id": ids[0]})  # fmt: skip
        hold(self.run_lock, checkpoint)
        try:
            return super()._run_batch(ids, jobs, model, progress, checkpoint)
        finally:
            self.run_lock.release()

    def _splits(self, job: admission.PreparedJob) -> bool:
        return len(job.plan.rows) >= self.shard_rows and shardable(job.plan) is None

    def _sharded(
        self,
        job_id: str,
        job: admission.PreparedJob,
        model: LoadedModel,
        parts: int,
        progress: Callable[[int, int], None],
        checkpoint: Callable[[], None],
    ) -> Results:
        """Send the job's shards through the deployment, wait (heartbeats, cancel and the time
        limit checked meanwhile), merge. A shard whose replica died is sent again; one that
        failed fails the job with the shard's own error."""
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        started = time.perf_counter()
        shards = shard_forwards(job.plan, parts)
        rows = [sum(len(job.plan.forwards[f].rows) for f in s) for s in shards]
        handle = self._handle()

        def send(i: int) -> Any:
            return handle.run_shard.remote(job_id, list(shards[i]), self.id)

        sent = {i: send(i) for i in range(len(shards))}
        tries = dict.fromkeys(sent, 1)
        outputs: dict[int, Any] = {}
        try:
            while sent:
                checkpoint()
                for i, response in list(sent.items()):
                    try:
                        answer = response.result(timeout_s=_POLL_S / max(1, len(sent)))
                    except TimeoutError:
                        continue
                    except (RayActorError, ActorUnavailableError) as exc:
                        if tries[i] >= _SHARD_TRIES:
                            raise RunError(f"shard {i} of the job lost its replica {tries[i]} "
                                           f"times ({type(exc).__name__})") from None  # fmt: skip
                        log.warning("shard %d of job %s: replica lost; sent again", i, job_id,
                                    extra={"job_id": job_id})  # fmt: skip
                        tries[i] += 1
                        sent[i] = send(i)
                        continue
                    except RayTaskError as exc:  # the shard's own error, without Ray's trace
                        raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
                    if answer["weights"] != model.weights_sha256:
                        raise RunError(
                            "the replicas of this model run different weights "
                            f"({answer['weights'][:12]} and {model.weights_sha256[:12]})",
                            hint="redeploy so that every replica loads the same checkpoint",
                        )
                    outputs[i] = shard_from_bytes(answer["data"])
                    del sent[i]
                    progress(sum(rows[j] for j in outputs), sum(rows))
        finally:
            for response in sent.values():
                response.cancel()
        raw = merge_shards(job.plan, [outputs[i] for i in range(len(shards))])
        timings = {"load_model_s": 0.0, "compile_s": 0.0, **raw.timings}
        timings.update(total_s=time.perf_counter() - started, batched_jobs=1.0,
                       shards=float(len(shards)))  # fmt: skip
        return results_from_raw(job.spec, job.doc, job.plan, model, raw, timings)


def hold(lock: threading.Lock, checkpoint: Callable[[], None]) -> None:
    """Acquire ``lock``, calling ``checkpoint`` (heartbeats, cancel, time limit) while waiting:
    a job waiting for its turn keeps its lease."""
    while not lock.acquire(timeout=_POLL_S):
        checkpoint()


class ModelReplica:
    """A replica: its model, the shared store, and a worker claiming the model's jobs.

    Ray Serve calls :meth:`check_health` and :meth:`record_autoscaling_stats` periodically;
    the ingress calls :meth:`describe` once and :meth:`wake` after each submit."""

    def __init__(
        self, entry: dict[str, Any], db: str, limits: dict[str, Any], retention_s: float,
        app: str, grace_s: float = 30.0, log_level: str = "info",
        log_format: str = "text",
    ):  # fmt: skip
        _log_to_stderr(log_level, log_format)
        self.entry = ModelEntry.model_validate(entry)
        self.app, self.grace_s = app, grace_s
        self.loaded = load_model(
            self.entry.id, dtype=self.entry.dtype, device=self.entry.device,
            device_map=self.entry.device_map, max_memory=self.entry.max_memory,
        )  # fmt: skip
        self.loaded.saes = admission.checked_saes(self.entry.saes)
        self.loaded.module_widths = module_widths(
            self.loaded.model, pad_id=self.loaded.tokenizer.pad_id
        )
        self.limits = Limits(**limits)
        self.store = open_job_store(db, retention_s=retention_s)
        self._prepared: OrderedDict[str, admission.PreparedJob] = OrderedDict()
        self._prepared_lock = threading.Lock()
        self._shard_thread = ThreadPoolExecutor(1, thread_name_prefix="shard")
        self._states = ReplicaStates({self.app: self.app})
        self.worker = ShardingWorker(
            {self.loaded.model_id: self.loaded}, self.store, self.limits,
            batch_jobs=self.entry.batch_jobs, idle_s=0.25, model=self.loaded.model_id,
            run_lock=threading.Lock(), shard_rows=self.entry.shard_rows,
            replicas=self._running_replicas, handle=self._own_handle,
            metrics=ReplicaMetrics(self.loaded.model_id),
        )  # fmt: skip
        self.worker.start()
        log.info("replica of %s ready (%s, %s)", self.loaded.model_id, self.loaded.device,
                 self.loaded.dtype, extra={"model": self.loaded.model_id})  # fmt: skip

    # --- what the ingress and Ray Serve call -----------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What an ingress needs to check and compile specs for this model (JSON data)."""
        loaded = self.loaded
        widths = [[m, io, w] for (m, io), w in sorted((loaded.module_widths or {}).items())]
        return {
            "model_id": loaded.model_id,
            "pid": os.getpid(),
            "revision": loaded.revision,
            "device": str(loaded.device),
            "dtype": loaded.dtype,
            "weights_sha256": loaded.weights_sha256,
            "module_widths": widths,
        }

    async def wake(self) -> None:
        """A job of this model was queued: claim now rather than at the next poll."""
        self.worker.wake.set()

    async def check_health(self) -> None:
        """Ray Serve restarts a replica whose worker thread stopped."""
        if not self.worker.is_alive():
            raise RuntimeError("the replica's worker thread stopped")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The queued and running jobs of this model, for the autoscaling policy."""
        return {"jobs": float(self.store.active_jobs(self.loaded.model_id))}

    async def run_shard(self, job_id: str, forwards: list[int], claimer: str) -> dict[str, Any]:
        """Run some forwards of a job the worker ``claimer`` holds: ``{"weights": this
        replica's weights identity, "data": safetensors bytes}``. One shard at a time, on a
        thread of its own (Ray Serve's calls keep theirs); a cancelled call stops the shard
        at its next forward."""
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        work = functools.partial(self._run_shard, job_id, tuple(forwards), claimer, stop)
        try:
            data = await loop.run_in_executor(self._shard_thread, work)
        except asyncio.CancelledError:
            stop.set()
            raise
        return {"weights": self.loaded.weights_sha256, "data": data}

    def __del__(self) -> None:  # Ray Serve's graceful replica shutdown
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop(self.grace_s)
            self.store.close()

    # --- inside -----------------------------------------------------------------------------

    def _run_shard(
        self, job_id: str, forwards: tuple[int, ...], claimer: str, stop: threading.Event
    ) -> bytes:
        job = self._prepare(job_id)
        last = [0.0]

        def checkpoint() -> None:
            """The shard is abandoned, or its job no longer runs under its claimer."""
            now = time.monotonic()
            if stop.is_set():
                raise RunError(f"the shard of job {job_id} was abandoned")
            if now - last[0] >= 0.5:
                last[0] = now
                record = self.store.record(job_id)
                if record is None or record.state != "running" or record.worker != claimer:
                    raise RunError(f"job {job_id} no longer runs under {claimer}")
                if record.cancel_requested:
                    raise RunError(f"job {job_id} was cancelled")

        hold(self.worker.run_lock, checkpoint)
        try:
            executor = Executor(
                self.loaded.model, pad_id=self.loaded.tokenizer.pad_id, checkpoint=checkpoint
            )
            out = executor.run_shard(job.plan, forwards)
        finally:
            self.worker.run_lock.release()
        return shard_to_bytes(out)

    def _prepare(self, job_id: str) -> admission.PreparedJob:
        """The job compiled from its stored spec (the last few kept: a job's shards reuse it)."""
        with self._prepared_lock:
            if job_id in self._prepared:
                self._prepared.move_to_end(job_id)
                return self._prepared[job_id]
        record = self.store.record(job_id)
        if record is None or record.state != "running":
            raise RunError(f"job {job_id} is not running")
        spec = json.loads(record.spec_json)
        job = admission.prepare_job(spec, self.loaded, self.limits, spec_file=record.spec_file)
        with self._prepared_lock:
            self._prepared[job_id] = job
            while len(self._prepared) > 4:
                self._prepared.popitem(last=False)
        return job

    def _own_handle(self) -> Any:
        from ray import serve

        return serve.get_deployment_handle(DEPLOYMENT, self.app)

    def _running_replicas(self) -> int:
        """This deployment's running replicas (1 when Ray Serve cannot say)."""
        return self._states()[self.app].get("RUNNING", 1)


def _log_to_stderr(level: str, log_format: str) -> None:
    """specsight's log lines on the replica's stderr, which Ray forwards to the ingress's
    output (and keeps in its worker log files): plain, or one JSON object per line."""
    logger = logging.getLogger("specsight")
    logger.handlers = [log_handler(log_format)]
    logger.setLevel(level.upper())
    logger.propagate = False
