"""``specsight run SPEC --remote URL``: :func:`run_remote` compiles the spec here against the
server's ModelInfo and tokenizer (spec mistakes show with file:line:col before anything is sent),
inlines vectors from files beside the spec, submits it, waits (Ctrl-C cancels the job), and
returns the same Results, and writes the same ``--out`` files, as a local run.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any

from ..compile import DEFAULT_MAX_BATCH, Budget, compile_plan, dataset_rows
from ..compile.saes import SaeSource
from ..errors import Issue, RunError, SpecError, format_path
from ..models import ModelInfo
from ..plan import Plan
from ..plan.codec import to_data
from ..plan.metrics import Faithfulness
from ..plan.ops import AddVector, ProjectOut, SetVector
from ..results import Results, check_out_dir
from ..spec import (
    AddOp,
    FileVector,
    LoadedDoc,
    ProjectOutOp,
    SetOp,
    Spec,
    doc_of,
    document_of,
    load_spec,
)
from .admission import refuse_local_only
from .client import RemoteClient, StatusCallback, error_from_body, relocate, results_from_bytes
from .protocol import ErrorBody

__all__ = ["inline_file_vectors", "run_remote"]


def inline_file_vectors(spec: Spec, doc: LoadedDoc | None, plan: Plan) -> dict[str, Any]:
    """The spec's data with every ``{file: ...}`` vector replaced by its values, as compiled
    into ``plan``, and the dataset by the rows it uses (a server reads no files). A file named by a sweep variable that gives
    different vectors per cell cannot be inlined: a located SpecError."""
    dump = {"mode": "json", "by_alias": True, "exclude_none": True}
    data = copy.deepcopy(doc.data) if doc is not None else spec.model_dump(**dump)
    keys: dict[str, set[Any]] = {}
    for op in plan.ops:
        if isinstance(op, AddVector | SetVector):
            keys.setdefault(op.origin, set()).add(op.vector)
        elif isinstance(op, ProjectOut):
            keys.setdefault(op.origin, set()).add(op.vectors)
    issues = []
    for name, invoke in spec.invokes.items():
        for index, op in enumerate(invoke.ops):
            attr = {AddOp: "vector", SetOp: "value", ProjectOutOp: "vectors"}.get(type(op), "")
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
            key = found.pop()
            if isinstance(key, tuple):  # project_out: one vector per row of the file
                values: list[Any] = [list(plan.vectors[k]) for k in key]
            else:
                values = list(plan.vectors[key])
            ops = data["invokes"][name]["ops"]
            if isinstance(ops[index], dict) and attr in ops[index]:
                ops[index][attr] = values
            else:
                ops[index] = {**op.model_dump(**dump), attr: values}
    if issues:
        raise SpecError(issues)
    _inline_circuit_files(spec, plan, data)
    rows = dataset_rows(spec, doc or document_of(spec))
    if rows is not None:  # the rows a sample keeps, in order: the server's items are ours
        data["dataset"] = {"rows": rows}
    return data


def _inline_circuit_files(spec: Spec, plan: Plan, data: dict[str, Any]) -> None:
    """A circuit read from a file, sent as the edges the local compile read from it."""
    compiled = {str(m.name): m for m in plan.metrics if isinstance(m, Faithfulness)}
    for name, metric in spec.metrics.items():
        circuit = getattr(metric, "circuit", None)
        if circuit is None or circuit.file is None or name not in compiled:
            continue
        record = compiled[name]
        ups, downs = record.graph.up_names(), record.graph.down_names()
        edges = [f"{ups[u]}->{downs[d]}" for u, d in record.edges]
        data["metrics"][name]["circuit"] = {"edges": edges}


def run_remote(
    source: str | os.PathLike[str] | dict[str, Any] | Spec,
    url: str,
    *,
    api_key: str | None = None,
    out: str | os.PathLike[str] | None = None,
    force: bool = False,
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
    if out is not None:
        check_out_dir(Path(out), document_of(spec).sha256, force=force)
    remote = client or RemoteClient(url, api_key)
    try:
        entry = remote.model_entry(spec.model.id)
        info = ModelInfo.from_dict(entry.info)
        tokenizer = remote.tokenizer(entry.id)
        budget = Budget(max_batch=DEFAULT_MAX_BATCH)
        saes = {sae_id: SaeSource(None, cfg) for sae_id, cfg in entry.saes.items()}
        plan = compile_plan(
            spec, info, tokenizer, doc=doc, budget=budget, allow_files=True, saes=saes
        )
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
            error = error_from_body(body, prefix=f"remote job {job.id} failed: ")
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
        if plan.dataset is not None:  # where the rows came from, not the inline copy sent
            results.manifest["dataset"] = to_data(plan.dataset)
            results.record_items((data.get("dataset") or {}).get("rows"))
        if plan.expectations:  # judged here, so each verdict points into the local spec file
            results.judge(plan.expectations)
    finally:
        if client is None:
            remote.close()
    if out is not None:
        results.save(out, force=force, results_bytes=result_bytes)
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
