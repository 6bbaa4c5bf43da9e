"""Building a run's :class:`~.results.Results` from the engine's raw output: tensors named and
shaped, decoded next tokens and generated text, the expectations' verdicts, and the manifest
(spec and weight hashes, model, plan summary, versions, timings, each tensor's sha256, axes and
labels) that makes a run checkable and rerunnable.
"""

from __future__ import annotations

import hashlib
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..engine import EngineOutput
from ..models import Tokenizer
from ..models.load import LoadedModel
from ..plan import Metric, Plan
from ..plan.codec import to_data
from ..spec import LoadedDoc, Spec
from ..version import __version__
from .draws import record_draws
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
    prompts = {name: _inputs(plan, name) or inv.prompts for name, inv in spec.invokes.items()}
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
        info = plan.invokes[row.invoke]
        if info.axes:  # the sweep cell: its value on each axis
            index, cell = row.cell, {}
            for axis, size in reversed(list(zip(info.axes, info.grid))):
                cell[axis] = info.axis_values[axis][index % size]
                index //= size
            entry["cell"] = dict(reversed(list(cell.items())))
        out.setdefault(row.invoke, []).append(entry)
    return out


def _tensor_meta(plan: Plan, raw: EngineOutput, tokenizer: Tokenizer) -> dict[str, dict[str, Any]]:
    meta: dict[str, dict[str, Any]] = {}
    for metric in plan.metrics:
        _metric_meta(meta, plan, metric, raw, tokenizer)
    for save in plan.saves:
        info = plan.invokes[save.invoke]
        tensor = raw.saves[save.name]
        meta[save.name] = {
            "kind": "save",
            "invoke": save.invoke,
            "site": save.site,
            "axes": list(save.axes) + list(save.value_axes),
            "axis_values": {
                **{a: _listed(info.axis_values.get(a)) for a in save.axes},
                **{a: list(v) for a, v in save.value_axis_values.items()},
            },
            "padded_with_nan": len(set(save.n_positions)) > 1,
            **(
                {"row_positions": [list(p) for p in save.row_positions]}
                if save.row_positions
                else {}
            ),
            **_pattern_tokens(plan, save, tokenizer),
            **_tensor_fields(tensor),
        }
    for name, tensor in raw.saves.items():
        if name.endswith("/generated_ids") and name not in meta:
            invoke = name.rsplit("/", 1)[0]
            info = plan.invokes[invoke]
            over = invoke in plan.item_invokes
            meta[name] = {
                "kind": "save",
                "invoke": invoke,
                "axes": [*info.axes, "item" if over else "prompt", "new_token"],
                "axis_values": {a: _listed(info.axis_values.get(a)) for a in info.axes},
                **_tensor_fields(tensor),
            }
    return meta


def _pattern_tokens(plan: Plan, save: Any, tokenizer: Tokenizer) -> dict[str, Any]:
    """An attention pattern's prompts as token strings (the report labels its axes with them):
    each prompt of the saving invoke, up to 64 of them."""
    if "query" not in save.value_axes or not getattr(tokenizer, "has_text", True):
        return {}
    rows = {r.prompt_index: r.tokens for r in plan.rows if r.invoke == save.invoke}
    prompts = [rows[i] for i in sorted(rows)[:64]]
    return {"prompt_tokens": [tokenizer.token_strs(list(tokens)) for tokens in prompts]}


def _listed(values: Any) -> list[Any] | None:
    return None if values is None else list(values)


def _tensor_fields(tensor: Any) -> dict[str, Any]:
    return {
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).replace("torch.", ""),
        "sha256": tensor_sha256(tensor),
    }


def _metric_meta(
    meta: dict[str, dict[str, Any]],
    plan: Plan,
    metric: Metric,
    raw: EngineOutput,
    tokenizer: Tokenizer,
) -> None:
    """The manifest entries of a metric and its companions, as its kind describes them."""
    info = plan.invokes[metric.invoke]
    values = {a: _listed(info.axis_values.get(a)) for a in metric.axes}
    axes = list(metric.result_axes)
    labels = {a: list(info.axis_labels[a]) for a in axes if info.axis_labels.get(a)}
    tensor = raw.metrics[metric.name]
    suffix = [*metric.suffix(), *metric.trailing]
    for axis in metric.suffix():
        values[axis] = metric.suffix_values(axis)
    tokens = getattr(metric, "tokens", None)
    entry: dict[str, Any] = {
        "kind": "metric",
        "metric_kind": metric.kind,
        "view": metric.view,
        "signed": metric.signed,
        "invoke": metric.invoke,
        "axes": axes + suffix,
        "axis_values": values,
        "axis_labels": labels,
        "token_strs": list(tokens.labels) if tokens is not None else [],
        **metric.manifest_extra(),
        **_tensor_fields(tensor),
    }
    if metric.label() is not None:
        entry["label"] = metric.label()
    if metric.ranks_tokens:
        _decoded(entry, metric, raw, tokenizer)
    if metric.center is not None:  # what "strongest cells" measures from
        entry["baseline"] = metric.center
    if metric.reduce is not None:
        _reduce_meta(meta, metric, entry, raw)
    baseline = getattr(metric, "baseline", None)
    if baseline is not None:
        entry["baseline_metric"] = baseline
        _companion(meta, metric.name, "effect", entry, entry["axes"], raw)
    for companion in metric.companions:
        extra = raw.metrics[f"{metric.name}/{companion}"]
        axes = metric.companion_axes(companion, entry["axes"])
        meta[f"{metric.name}/{companion}"] = {
            **{k: v for k, v in entry.items() if k not in ("decoded", "reduce")},
            "axes": axes,
            "companion_of": metric.name,
            **_tensor_fields(extra),
        }
        if companion in metric.reduced_companions and metric.reduce is not None:
            items = list(metric.axes) + axes[len(metric.result_axes) :]
            _companion(meta, f"{metric.name}/{companion}", "items", entry, items, raw)
    meta[metric.name] = entry


def _decoded(
    entry: dict[str, Any], metric: Metric, raw: EngineOutput, tokenizer: Tokenizer
) -> None:
    """The top tokens of each cell, decoded (for up to 64 cells)."""
    ids = raw.metrics[f"{metric.name}/ids"]
    probs = (
        raw.metrics[f"{metric.name}/probs"]
        if "probs" in metric.companions
        else raw.metrics[metric.name]
    )
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


def _reduce_meta(
    meta: dict[str, dict[str, Any]], metric: Any, entry: dict[str, Any], raw: EngineOutput
) -> None:
    """The entries of a reduced metric's companions (stderr, interval, per-item values)."""
    reduce = metric.reduce
    entry["reduce"] = {
        "over": reduce.over,
        "size": reduce.size,
        "stat": reduce.stat,
        "ci": "bootstrap" if reduce.ci else None,
        "level": reduce.level,
        "of": metric.reduces,
    }
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
        **_tensor_fields(tensor),
    }


def _inputs(plan: Plan, invoke: str) -> list[str] | None:
    """What results show as an invoke's inputs, when not its prompts (image and tensor files,
    a dataset's rendered prompts)."""
    info = plan.invokes.get(invoke)
    return list(info.inputs) if info is not None and info.inputs else None


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
        "dataset": None if plan.dataset is None else to_data(plan.dataset),
        **({"draws": draws} if (draws := record_draws(spec, plan, raw.spreads)) else {}),
        **({"saes": _saes(plan)} if plan.saes else {}),
        "versions": _versions(),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "tensors": _tensor_meta(plan, raw, model.tokenizer),
    }


def _saes(plan: Plan) -> dict[str, Any]:
    """What a run records of each SAE: where it reads (and writes), its shape, its id, and the
    sha256 of its weights file (the folder itself is not recorded: a server's stays private)."""
    out = {}
    for name, info in plan.saes.items():
        weights = Path(info.folder) / "sae_weights.safetensors"
        entry = {
            "id": info.id,
            "architecture": info.architecture,
            "site": info.site,
            "d_in": info.d_in,
            "d_sae": info.d_sae,
            "weights_sha256": _sha256(weights) if weights.is_file() else None,
        }
        if info.transcoder:
            entry.update(site_out=info.out_site, d_out=info.d_out, keep_error=info.keep_error)
        out[str(name)] = entry
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
