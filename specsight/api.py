"""The Python API: load a spec, compile it, run it. What the CLI calls, and what notebooks use.

    import specsight
    results = specsight.run("specs/ioi_patching.yaml")
    results["logit_diff"]            # tensor shaped [layer, pos]

``run`` accepts a path, a YAML/JSON string's loaded dict, or a :class:`~specsight.spec.Spec`.
"""

from __future__ import annotations

import os
import platform
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ._budget import activation_budget, batch_cap
from .compile import compile_plan as _compile
from .load import LoadedDoc, from_data, load_file
from .modelinfo import ModelInfo
from .plan import Plan
from .spec import Spec, validate_spec
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .models import LoadedModel
    from .results import Results

__all__ = ["load_spec", "compile_plan", "run", "doc_of"]

#: id(spec) -> (a weak reference to the spec, its document); an entry goes when its spec does,
#: so a later object that reuses the id never gets a stale document
_DOCS: dict[int, tuple[weakref.ref[Spec], LoadedDoc]] = {}


def doc_of(spec: Spec) -> LoadedDoc | None:
    """The loaded document a spec came from (for file positions in later errors)."""
    entry = _DOCS.get(id(spec))
    return entry[1] if entry is not None and entry[0]() is spec else None


def load_spec(source: str | os.PathLike[str] | dict[str, Any]) -> Spec:
    """Load and validate a spec from a file path or a dict. Raises SpecError."""
    doc = from_data(source) if isinstance(source, dict) else load_file(source)
    spec = validate_spec(doc)
    key = id(spec)
    _DOCS[key] = (weakref.ref(spec), doc)
    weakref.finalize(spec, _DOCS.pop, key, None)
    return spec


def compile_plan(
    spec: Spec,
    info: ModelInfo,
    tokenizer: Tokenizer,
    *,
    max_batch: int | None = None,
    device: str = "cpu",
    allow_files: bool = True,
    prefix_reuse: bool = True,
) -> Plan:
    """Compile a spec for a model described by ``info`` (no torch needed for CPU devices).

    ``max_batch`` None sizes forwards from the memory available on ``device``.
    """
    return _compile(
        spec,
        info,
        tokenizer,
        doc=doc_of(spec),
        max_batch=max_batch,
        memory_budget=None if max_batch else activation_budget(device),
        batch_cap=batch_cap(device),
        allow_files=allow_files,
        prefix_reuse=prefix_reuse,
    )


def _as_spec(source: Any) -> Spec:
    if isinstance(source, Spec):
        return source
    if isinstance(source, dict | str | os.PathLike):
        return load_spec(source)
    raise TypeError(f"run() takes a path, a dict or a Spec, not {type(source).__name__}")


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {
        "specsight": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run(
    source: str | os.PathLike[str] | dict[str, Any] | Spec,
    *,
    model: LoadedModel | None = None,
    out: str | os.PathLike[str] | None = None,
    max_batch: int | None = None,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    prefix_reuse: bool = True,
) -> Results:
    """Validate, compile and run a spec on this machine; optionally write ``out``."""
    from .engine import execute
    from .models import load_model_ref

    started = time.perf_counter()
    spec = _as_spec(source)
    doc = doc_of(spec)
    t0 = time.perf_counter()
    if model is None:
        model = load_model_ref(spec.model, device=device, base_dir=doc.base_dir if doc else None)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = _compile(
        spec,
        model.info,
        model.tokenizer,
        doc=doc,
        max_batch=max_batch,
        memory_budget=None if max_batch else activation_budget(model.device),
        batch_cap=batch_cap(model.device),
        prefix_reuse=prefix_reuse,
    )
    compile_s = time.perf_counter() - t0
    raw = execute(plan, model.model, pad_id=model.tokenizer.pad_id, progress=progress)
    timings = {"load_model_s": load_s, "compile_s": compile_s, **raw.timings}
    timings["total_s"] = time.perf_counter() - started
    results = results_from_raw(spec, doc, plan, model, raw, timings)
    if out is not None:
        results.save(out)
    return results


def results_from_raw(
    spec: Spec,
    doc: LoadedDoc | None,
    plan: Plan,
    model: LoadedModel,
    raw: Any,
    timings: dict[str, float],
) -> Results:
    """Results (tensors, manifest, decoded next tokens) from an engine output of ``plan``."""
    from .results import Results

    manifest = _manifest(spec, doc, plan, model, raw, timings)
    next_tokens: dict[str, list[list[tuple[str, float]]]] = {}
    for row_index, (ids, probs) in sorted(raw.next_tokens.items()):
        row = plan.rows[row_index]
        decoded = [(model.tokenizer.token_str(i), round(float(p), 6)) for i, p in zip(ids, probs)]
        next_tokens.setdefault(row.invoke, []).append(decoded)
    prompts = {
        name: plan.invoke_info.get(name, {}).get("inputs") or inv.prompts
        for name, inv in spec.invokes.items()
    }
    if raw.generated:
        manifest["generated"] = _generated(plan, raw.generated, model.tokenizer)
    results = Results(raw.metrics, raw.saves, manifest, next_tokens, prompts)
    if plan.expectations:
        from .expect import evaluate

        results.expectations = evaluate(plan.expectations, results)
        manifest["expectations"] = [o.to_dict() for o in results.expectations]
    return results


def _generated(
    plan: Plan, generated: dict[int, list[int]], tokenizer: Tokenizer
) -> dict[str, list[dict[str, Any]]]:
    """Per generating invoke, per prompt: the new token ids and their decoded text."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row_index, ids in sorted(generated.items()):
        row = plan.rows[row_index]
        text = tokenizer.backend.decode(ids, skip_special_tokens=True)
        out.setdefault(row.invoke, []).append({"ids": ids, "text": text})
    return out


def _tensor_meta(plan: Plan, raw: Any, tokenizer: Tokenizer) -> dict[str, dict[str, Any]]:
    from .results import tensor_sha256

    meta: dict[str, dict[str, Any]] = {}
    for metric in plan.metrics:
        axes = list(metric.axes)
        values = {a: plan.axis_values.get(metric.invoke, {}).get(a) for a in axes}
        labels = {
            a: plan.axis_labels.get(metric.invoke, {}).get(a)
            for a in axes
            if plan.axis_labels.get(metric.invoke, {}).get(a)
        }
        tensor = raw.metrics[metric.name]
        suffix = []
        if metric.kind == "top_k":
            suffix = ["k"]
        elif metric.kind in ("logits", "logprob", "prob") and not metric.squeeze_token:
            suffix = ["token"]
        elif metric.kind == "logit_lens":
            suffix = ["site"]
            values["site"] = list(metric.sites)
        elif metric.kind == "attribution":
            suffix = ["site", "pos"]
            values["site"] = list(metric.sites)
            values["pos"] = list(range(tensor.shape[-1]))
        entry: dict[str, Any] = {
            "kind": "metric",
            "metric_kind": metric.kind,
            "invoke": metric.invoke,
            "axes": axes + suffix,
            "axis_values": values,
            "axis_labels": labels,
            "token_strs": list(metric.token_strs),
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).replace("torch.", ""),
            "sha256": tensor_sha256(tensor),
        }
        companions = {"top_k": ["ids"], "logit_lens": ["ids", "probs"]}.get(metric.kind, [])
        if companions:
            ids = raw.metrics[f"{metric.name}/ids"]
            probs = tensor if metric.kind == "top_k" else raw.metrics[f"{metric.name}/probs"]
            flat_ids = ids.reshape(-1, ids.shape[-1])
            flat_probs = probs.reshape(-1, probs.shape[-1])
            if flat_ids.shape[0] <= 64:
                entry["decoded"] = [
                    [
                        (tokenizer.token_str(int(t)), round(float(p), 6))
                        for t, p in zip(flat_ids[i], flat_probs[i])
                    ]
                    for i in range(flat_ids.shape[0])
                ]
        for companion in companions:
            extra = raw.metrics[f"{metric.name}/{companion}"]
            meta[f"{metric.name}/{companion}"] = {
                **{k: v for k, v in entry.items() if k != "decoded"},
                "axes": entry["axes"] + (["k"] if metric.kind == "logit_lens" else []),
                "companion_of": metric.name,
                "shape": list(extra.shape),
                "dtype": str(extra.dtype).replace("torch.", ""),
                "sha256": tensor_sha256(extra),
            }
        meta[metric.name] = entry
    for save in plan.saves:
        tensor = raw.saves[save.name]
        meta[save.name] = {
            "kind": "save",
            "invoke": save.invoke,
            "site": save.site,
            "axes": list(save.axes) + ["position", "hidden"],
            "axis_values": {a: plan.axis_values.get(save.invoke, {}).get(a) for a in save.axes},
            "padded_with_nan": len(set(save.n_positions)) > 1,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).replace("torch.", ""),
            "sha256": tensor_sha256(tensor),
        }
    for name, tensor in raw.saves.items():
        if name.endswith("/generated_ids") and name not in meta:
            meta[name] = {
                "kind": "save",
                "invoke": name.rsplit("/", 1)[0],
                "axes": ["prompt", "new_token"],
                "shape": list(tensor.shape),
                "dtype": str(tensor.dtype).replace("torch.", ""),
                "sha256": tensor_sha256(tensor),
            }
    return meta


def _manifest(
    spec: Spec,
    doc: LoadedDoc | None,
    plan: Plan,
    model: LoadedModel,
    raw: Any,
    timings: dict[str, float],
) -> dict[str, Any]:
    return {
        "format": "specsight-manifest-1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": {
            "name": spec.name,
            "file": doc.file if doc else None,
            "sha256": plan.spec_sha256,
            "content": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        },
        "model": {
            "id": model.model_id,
            "revision": model.revision,
            "weights_sha256": model.weights_sha256,
            "architecture": model.info.architecture,
            "family": model.info.family,
            "inputs": model.info.inputs,
            "dtype": model.dtype,
            "device": model.device,
            "seed": spec.model.seed,
        },
        "plan": {
            "rows": len(plan.rows),
            "forwards": len(plan.forwards),
            "max_batch": plan.max_batch,
            "hooks": len(plan.hooks()),
            "memory_estimate": plan.memory_estimate,
        },
        "versions": _versions(),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "tensors": _tensor_meta(plan, raw, model.tokenizer),
    }
