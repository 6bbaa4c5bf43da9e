"""Building a run's :class:`~.results.Results` from the engine's raw output: tensors named and
shaped, decoded next tokens and generated text, the expectations' verdicts, and the manifest
(spec and weight hashes, model, plan summary, versions, timings, each tensor's sha256, axes and
labels) that makes a run checkable and rerunnable.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from typing import Any

from ..engine import EngineOutput
from ..models import Tokenizer
from ..models.load import LoadedModel
from ..plan import Plan
from ..spec import LoadedDoc, Spec
from ..version import __version__
from .results import Results, tensor_sha256

__all__ = ["results_from_raw"]


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "specsight": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def results_from_raw(
    spec: Spec,
    doc: LoadedDoc | None,
    plan: Plan,
    model: LoadedModel,
    raw: EngineOutput,
    timings: dict[str, float],
) -> Results:
    """Results (tensors, manifest, decoded next tokens) from an engine output of ``plan``."""
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
        results.judge(plan.expectations)
    return results


def _generated(
    plan: Plan, generated: dict[int, list[int]], tokenizer: Tokenizer
) -> dict[str, list[dict[str, Any]]]:
    """Per generating invoke, per prompt: the new token ids and their decoded text."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row_index, ids in sorted(generated.items()):
        row = plan.rows[row_index]
        text = tokenizer.backend.decode(ids, skip_special_tokens=True)
        entry: dict[str, Any] = {"ids": ids, "text": text, "prompt": row.prompt_index}
        axes = plan.invoke_info.get(row.invoke, {}).get("axes", [])
        if axes:  # the sweep cell: its value on each axis
            sizes = [len(plan.axis_values[row.invoke][a]) for a in axes]
            index, cell = row.cell, {}
            for axis, size in reversed(list(zip(axes, sizes))):
                cell[axis] = plan.axis_values[row.invoke][axis][index % size]
                index //= size
            entry["cell"] = dict(reversed(list(cell.items())))
        out.setdefault(row.invoke, []).append(entry)
    return out


def _tensor_meta(plan: Plan, raw: EngineOutput, tokenizer: Tokenizer) -> dict[str, dict[str, Any]]:
    meta: dict[str, dict[str, Any]] = {}
    for metric in plan.metrics:
        axes = list(metric.axes)
        values = {a: plan.axis_values.get(metric.invoke, {}).get(a) for a in axes}
        axes = list(metric.result_axes)
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
        if metric.kind == "recovery":  # what "strongest cells" measures from
            entry["baseline"] = 0.0
        if metric.reduce:
            _reduce_meta(meta, metric, entry, raw)
        if metric.baseline is not None:
            entry["baseline_metric"] = metric.baseline
            _companion(meta, metric.name, "effect", entry, entry["axes"], raw)
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
            "axes": list(save.axes) + list(save.value_axes),
            "axis_values": {
                **{a: plan.axis_values.get(save.invoke, {}).get(a) for a in save.axes},
                **save.value_axis_values,
            },
            "padded_with_nan": len(set(save.n_positions)) > 1,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).replace("torch.", ""),
            "sha256": tensor_sha256(tensor),
        }
    for name, tensor in raw.saves.items():
        if name.endswith("/generated_ids") and name not in meta:
            invoke = name.rsplit("/", 1)[0]
            swept = list(plan.invoke_info.get(invoke, {}).get("axes", []))
            over = invoke in plan.item_invokes
            meta[name] = {
                "kind": "save",
                "invoke": invoke,
                "axes": [*swept, "item" if over else "prompt", "new_token"],
                "axis_values": {a: plan.axis_values.get(invoke, {}).get(a) for a in swept},
                "shape": list(tensor.shape),
                "dtype": str(tensor.dtype).replace("torch.", ""),
                "sha256": tensor_sha256(tensor),
            }
    return meta


def _reduce_meta(
    meta: dict[str, dict[str, Any]], metric: Any, entry: dict[str, Any], raw: EngineOutput
) -> None:
    """The entries of a reduced metric's companions (stderr, interval, per-item values)."""
    reduce = metric.reduce
    entry["reduce"] = {k: reduce[k] for k in ("over", "size", "stat", "ci", "level", "of")}
    suffix = entry["axes"][len(metric.result_axes) :]
    for companion in ("stderr", "ci_low", "ci_high", "items"):
        axes = list(metric.axes) + suffix if companion == "items" else entry["axes"]
        _companion(meta, metric.name, companion, entry, axes, raw)


def _companion(
    meta: dict[str, dict[str, Any]],
    name: str,
    companion: str,
    entry: dict[str, Any],
    axes: list[str],
    raw: EngineOutput,
) -> None:
    """The manifest entry of ``<name>/<companion>`` (when the run made it)."""
    key = f"{name}/{companion}"
    if key not in raw.metrics:
        return
    tensor = raw.metrics[key]
    skip = ("decoded", "reduce", "baseline", "baseline_metric")
    meta[key] = {
        **{k: v for k, v in entry.items() if k not in skip},
        "axes": axes,
        "companion_of": name,
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).replace("torch.", ""),
        "sha256": tensor_sha256(tensor),
    }


def _content(spec: Spec) -> dict[str, Any]:
    """The spec as JSON data, as written (no defaults filled in); inline dataset rows (plain
    values already) are shared, not copied: 100k inline rows are not held twice."""
    rows = spec.dataset.rows if spec.dataset is not None else None
    skip = {"dataset": {"rows"}} if rows is not None else None
    # as written: defaults left out, so that the content validates again as it did (a
    # default position of -1 is a mistake once written out for an image classifier)
    content = spec.model_dump(
        mode="json", by_alias=True, exclude_none=True, exclude_unset=True, exclude=skip
    )
    if rows is not None:
        content["dataset"]["rows"] = rows
    return content


def _manifest(
    spec: Spec,
    doc: LoadedDoc | None,
    plan: Plan,
    model: LoadedModel,
    raw: EngineOutput,
    timings: dict[str, float],
) -> dict[str, Any]:
    return {
        "format": "specsight-manifest-1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": {
            "name": spec.name,
            "file": doc.file if doc else None,
            "sha256": plan.spec_sha256,
            "content": _content(spec),
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
            **({"placement": model.placement} if model.placement else {}),
        },
        "plan": {
            "rows": len(plan.rows),
            "forwards": len(plan.forwards),
            "max_batch": plan.max_batch,
            "hooks": len(plan.hooks()),
            "memory_estimate": plan.memory_estimate,
            **raw.counts,  # a run in blocks: rows and forwards of every block, and how many
        },
        "dataset": plan.dataset,
        "versions": _versions(),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "tensors": _tensor_meta(plan, raw, model.tokenizer),
    }
