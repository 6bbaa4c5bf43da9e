"""One self-contained HTML page per run (``report.html``): the spec with its source lines, model
and manifest facts, each metric as an interactive SVG heatmap (two axes) or line plot (one axis)
whose tooltip gives every axis label and the exact value (an edge attribution also as a graph),
the expectations' verdicts, next tokens and generated text.

The page opens offline: its script and style (``report_assets/``) are inlined, the tensors are
embedded as JSON, and a content security policy forbids fetching anything. Every text from the
run (spec, prompts, tokens, generated text) is escaped.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import SpecsightError
from ..spec import load_text
from .attention_view import attention_sections
from .circuit_graph import edge_graph_svg
from .colours import colour_scale
from .labels import axis_labels
from .strongest import strongest_cells
from .summary import RunView, _over

__all__ = ["REPORT_FILE", "render_report", "write_report"]

REPORT_FILE = "report.html"

#: cells of one metric embedded in the page at most (a larger tensor shows one slice)
_MAX_CELLS = 50_000
#: prompts (next tokens, generated text) shown per invoke, spec lines and dataset rows shown
_MAX_PROMPTS, _MAX_SPEC_LINES, _MAX_ROWS = 16, 4000, 20
_POLICY = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


def write_report(results: RunView, path: str | Path) -> Path:
    """Write the run's page to ``path`` (a run folder's is ``report.html``); returns it."""
    path = Path(path)
    path.write_text(render_report(results), encoding="utf-8")
    return path


def render_report(results: RunView) -> str:
    """The run's page as one HTML document (no external resources)."""
    manifest = results.manifest
    spec = manifest.get("spec", {})
    title = str(spec.get("name") or "run of specsight")
    text, source_note, fmt = _spec_text(spec)
    where = _locator(text, fmt)
    metrics, metric_html = _metrics(results, where)
    patterns, attention_html = attention_sections(
        results.saves, manifest.get("tensors", {}), len(metrics), _metric_entry
    )
    metrics += patterns
    # the findings first; what the run was (model, timings, versions) folded below them
    facts = (
        f"<details><summary>model, timings, versions, dataset</summary>{_facts(results)}</details>"
    )
    sections = [
        ("expectations", "Expectations", _expectations(results, where)),
        ("metrics", "Metrics", metric_html),
        ("attention", "Attention", attention_html),
        ("tokens", "Next tokens", _next_tokens(results)),
        ("generated", "Generated text", _generated(results)),
        ("facts", "Run", facts),
        ("spec", "Spec", f'<p class="note">{_e(source_note)}</p>' + _spec_lines(text)),
    ]
    shown = [(key, head, body) for key, head, body in sections if body]
    nav = "".join(f'<a href="#{key}">{head}</a>' for key, head, _ in shown)
    body = "".join(f'<section id="{k}"><h2>{h}</h2>{b}</section>' for k, h, b in shown)
    held = sum(1 for o in results.expectations if o.ok)
    verdict = ""
    if results.expectations:
        ok = held == len(results.expectations)
        cls, word = ("ok", "all held") if ok else ("fail", "FAILED")
        verdict = (
            f' <span class="badge {cls}">expect {held}/{len(results.expectations)} {word}</span>'
        )
    model = manifest.get("model", {})
    sub = f"on {_e(model.get('id'))} ({_e(model.get('dtype'))}, {_e(model.get('device'))})"
    sub += f" &middot; {_e(manifest.get('created', ''))}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} &middot; specsight report</title>"
        f"<style>{_asset('report.css')}</style></head><body>"
        f'<header><h1>{_e(title)}{verdict}</h1><div class="sub">{sub}</div></header>'
        f"<nav>{nav}</nav><main>{body}</main>"
        '<div id="tip" role="tooltip" hidden></div>'
        f'<script type="application/json" id="specsight-data">{_script_json({"metrics": metrics})}'
        f"</script><script>{_asset('report.js')}</script></body></html>\n"
    )


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _asset(name: str) -> str:
    text = (resources.files(__package__) / "report_assets" / name).read_text(encoding="utf-8")
    if "</" in text:  # inlined in a <script> or <style> element, which it must not close
        raise ValueError(f"report asset {name} holds '</'")
    return text


def _script_json(value: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    for char, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, code)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


# --- the spec --------------------------------------------------------------------------------


def _spec_text(spec: dict[str, Any]) -> tuple[str, str, str]:
    """(text, where it comes from, format): the spec file when it still has the run's sha256,
    else the recorded content as YAML."""
    file, sha = spec.get("file"), spec.get("sha256")
    if file:
        try:
            raw = Path(file).read_bytes()
        except OSError:
            raw = None
        if raw is not None and hashlib.sha256(raw).hexdigest() == sha:
            fmt = "json" if str(file).lower().endswith(".json") else "yaml"
            return raw.decode("utf-8", "replace"), f"{file} (sha256 {str(sha)[:12]})", fmt
        reason = "has changed since the run" if raw is not None else "is not here"
        note = f"{file} {reason}; the spec as recorded in the manifest:"
    else:
        note = "the spec as recorded in the manifest (it was not read from a file):"
    content = dict(spec.get("content") or {})
    rows = (content.get("dataset") or {}).get("rows")
    if isinstance(rows, list) and len(rows) > _MAX_ROWS:
        content["dataset"] = {**content["dataset"], "rows": rows[:_MAX_ROWS]}
        note += f" (dataset rows: the first {_MAX_ROWS} of {len(rows)})"
    text = yaml.safe_dump(content, sort_keys=False, allow_unicode=True, width=100)
    return text, note, "yaml"


def _locator(text: str, fmt: str) -> Any:
    """A function from a path in the spec to its line in ``text`` (None when unknown)."""
    try:
        doc = load_text(text, fmt=fmt)
    except (SpecsightError, ValueError):
        return lambda path, key=False: None

    def line_of(path: tuple[Any, ...], key: bool = False) -> int | None:
        node: Any = doc.data
        for part in path:  # only a path the spec holds (locate falls back to an ancestor)
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return None
        return doc.source.locate(path, key=key)[0]

    return line_of


def _line_link(line: int | None) -> str:
    return f' <a class="where" href="#L{line}">line {line}</a>' if line else ""


def _spec_lines(text: str) -> str:
    lines = text.splitlines()
    more = len(lines) - _MAX_SPEC_LINES
    shown = "".join(
        f'<div class="line" id="L{i}"><span class="ln">{i}</span><span>{_e(line)}</span></div>'
        for i, line in enumerate(lines[:_MAX_SPEC_LINES], 1)
    )
    tail = f'<p class="note">... {more} more lines</p>' if more > 0 else ""
    return f'<div class="spec mono">{shown}</div>{tail}'


# --- facts and verdicts ----------------------------------------------------------------------


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows if v not in (None, "", {})
    )
    return f'<table class="facts">{cells}</table>'


def _facts(results: RunView) -> str:
    m = results.manifest
    spec, model, plan = m.get("spec", {}), m.get("model", {}), m.get("plan", {})
    memory = (plan.get("memory_estimate") or {}).get("total")
    run = [
        ("spec", spec.get("name")),
        ("spec file", spec.get("file")),
        ("spec sha256", spec.get("sha256")),
        ("created", m.get("created")),
        ("rows", plan.get("rows")),
        ("forwards", plan.get("forwards")),
        ("max batch", plan.get("max_batch")),
        ("hooks", plan.get("hooks")),
        ("memory estimate", f"{memory / 2**20:.1f} MiB" if memory else None),
    ]
    timings = [(k.removesuffix("_s"), f"{v:.3f} s") for k, v in m.get("timings", {}).items()]
    models = [(k.replace("_", " "), v) for k, v in model.items()]
    blocks = [("Run", run), ("Model", models), ("Timings", timings)]
    blocks.append(("Versions", list(m.get("versions", {}).items())))
    data = m.get("dataset") or {}
    if data:
        used = [(k, data.get(k)) for k in ("file", "rows", "used", "sha256")]
        blocks.append(("Dataset", [*used, ("columns", ", ".join(data.get("columns") or []))]))
    if results.saves:
        tensors = m.get("tensors", {})
        saved = [
            (n, f"{list(t.shape)} [{', '.join(tensors.get(n, {}).get('axes', []))}]")
            for n, t in results.saves.items()
        ]
        blocks.append(("Saved tensors", saved))
    parts = "".join(
        f"<div><h3>{_e(head)}</h3>{_table(rows)}</div>" for head, rows in blocks if rows
    )
    return f'<div class="grid2">{parts}</div>'


def _expectations(results: RunView, where: Any) -> str:
    items = []
    for o in results.expectations:
        cls, mark = ("ok", "ok") if o.ok else ("fail", "FAIL")
        message = f" &mdash; {_e(o.message)}" if o.message else ""
        detail = f'<div class="detail">{_e(o.detail)}</div>' if o.detail and not o.ok else ""
        link = _line_link(where(("expect", o.index)))
        items.append(
            f'<li class="{cls}"><span class="badge {cls}">{mark}</span> <code>{_e(o.claim)}'
            f'</code>{message}{link}<div class="note">{_e(o.location)}</div>{detail}</li>'
        )
    return f'<ul class="verdicts">{"".join(items)}</ul>' if items else ""


# --- metrics ---------------------------------------------------------------------------------


def _flat(tensor: Any) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in tensor.double().flatten().tolist()]


def _fit(tensor: Any, axes: list[str]) -> tuple[Any, list[str], str]:
    """The tensor as embedded: whole when small, else its first slice (and a note)."""
    if tensor.numel() <= _MAX_CELLS:
        return tensor, axes, ""
    note = f"showing the first slice of {list(tensor.shape)} ({' x '.join(axes)}); "
    note += "the whole tensor is in results.safetensors"
    while tensor.ndim > 2:
        tensor, axes = tensor[..., 0], axes[:-1]
    if tensor.numel() > _MAX_CELLS:
        tensor = tensor[: max(1, _MAX_CELLS // max(1, tensor.shape[-1]))]
    return tensor, axes, note


def _notes(meta: dict[str, Any], shape: tuple[int, ...], size: int) -> list[str] | None:
    """Per cell: the decoded tokens of a top-k or logit-lens metric (the cell's token, or the
    top tokens at that site)."""
    decoded = meta.get("decoded")
    if not decoded:
        return None
    if meta.get("view") == "tokens" and len(decoded) * shape[-1] == size:
        k = shape[-1]
        return [f"token {decoded[i // k][i % k][0]!r}" for i in range(size)]
    if len(decoded) == size:
        return ["top: " + ", ".join(f"{t!r} {p:.3g}" for t, p in cell) for cell in decoded]
    return None


def _metric_entry(
    name: str, tensor: Any, meta: dict[str, Any], extra: dict[str, Any], metrics: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    axes = list(meta.get("axes", []))[: tensor.ndim]
    axes += [f"dim{i}" for i in range(len(axes), tensor.ndim)]
    full_shape = tuple(tensor.shape)
    data, axes, note = _fit(tensor.double(), axes)
    labels = {}
    for i, axis in enumerate(axes):
        shown = axis_labels(meta, axis)
        labels[axis] = (
            shown if len(shown) >= data.shape[i] else [str(j) for j in range(data.shape[i])]
        )
    notes = _notes(meta, full_shape, tensor.numel()) if not note else None
    if notes and meta.get("view") == "tokens" and len(meta["decoded"]) == 1:
        labels[axes[-1]] = [f"{i}: {t!r}" for i, (t, _) in enumerate(meta["decoded"][0])]
    same = {k: v for k, v in extra.items() if tuple(v.shape) == full_shape and not note}
    entry = {
        "name": name,
        "axes": axes,
        "shape": list(data.shape),
        "values": _flat(data),
        "labels": labels,
        "extra": {k: _flat(v) for k, v in same.items() if k != "items"},
        "notes": notes,
        "f32": str(tensor.dtype) in ("torch.float32", "torch.float16", "torch.bfloat16"),
        "baseline_metric": meta.get("baseline_metric"),
    }
    entry.update(colour_scale(meta, data, entry["extra"].get("effect"), metrics))
    return entry, note


def _metrics(results: RunView, where: Any) -> tuple[list[dict[str, Any]], str]:
    tensors = results.manifest.get("tensors", {})
    entries, parts = [], []
    for name, tensor in results.metrics.items():
        meta = tensors.get(name, {})
        if meta.get("companion_of"):
            continue
        extra = {
            key.rpartition("/")[2]: value
            for key, value in results.metrics.items()
            if tensors.get(key, {}).get("companion_of") == name
        }
        entry, note = _metric_entry(name, tensor, meta, extra, results.metrics)
        index = len(entries)
        entries.append(entry)
        axes = " x ".join(meta.get("axes", [])[: tensor.ndim])
        about = f"{meta.get('metric_kind') or 'metric'}{_over(meta)}"
        about += f" of {meta['invoke']}" if meta.get("invoke") else ""
        about += f" [{axes}]" if axes else ""
        if meta.get("baseline_metric"):
            about += f"; baseline {meta['baseline_metric']}"
        if tensor.ndim > 2 and not note:
            note = f"axes {', '.join(entry['axes'][:2])} shown; choose the other axes' values:"
        strongest = ""
        if tensor.ndim >= 2 and tensor.numel() > 0:
            lines = strongest_cells(name, tensor, meta, extra)
            items = "".join(f"<li>{_e(line.strip())}</li>" for line in lines[1:])
            strongest = (
                f'<div class="note">{_e(lines[0].strip())}</div><ul class="strongest">{items}</ul>'
            )
        link = _line_link(where(("metrics", name), key=True))
        graph = edge_graph_svg(tensor, meta) if meta.get("view") == "edges" else ""
        parts.append(
            f'<div class="metric" id="metric-{index}"><h3>{_e(name)} '
            f'<span class="where">{_e(about)}</span>{link}</h3>'
            + (f'<p class="note">{_e(note)}</p>' if note else "")
            + f'<div class="slices"></div><div class="plot"></div>{strongest}{graph}</div>'
        )
    return entries, "".join(parts)


# --- next tokens and generated text ----------------------------------------------------------


def _tokens(items: list[Any]) -> str:
    return "".join(f'<span class="tok">{_e(repr(t))} {p:.3f}</span>' for t, p in items)


def _next_tokens(results: RunView) -> str:
    rows = []
    for invoke, per_prompt in results.next_tokens.items():
        prompts = results.prompts.get(invoke, [])
        for i, tokens in enumerate(per_prompt[:_MAX_PROMPTS]):
            prompt = prompts[i] if i < len(prompts) else ""
            label = invoke if len(per_prompt) == 1 else f"{invoke}[{i}]"
            rows.append(
                f'<tr><th class="mono">{_e(label)}</th><td><div class="prompt mono">{_e(prompt)}'
                f"</div>{_tokens(tokens)}</td></tr>"
            )
        if len(per_prompt) > _MAX_PROMPTS:
            more = len(per_prompt) - _MAX_PROMPTS
            rows.append(f'<tr><th></th><td class="note">... {more} more</td></tr>')
    return f'<table class="tokens">{"".join(rows)}</table>' if rows else ""


def _generated(results: RunView) -> str:
    rows = []
    for invoke, entries in (results.manifest.get("generated") or {}).items():
        prompts = results.prompts.get(invoke, [])
        for entry in entries[: 2 * _MAX_PROMPTS]:
            p = entry.get("prompt", 0)
            where = [f"{k}={v}" for k, v in entry.get("cell", {}).items()]
            where += [str(p)] if len(prompts) > 1 else []
            label = f"{invoke}[{', '.join(where)}]" if where else invoke
            prompt = prompts[p] if isinstance(p, int) and p < len(prompts) else ""
            rows.append(
                f'<tr><th class="mono">{_e(label)}</th><td><div class="prompt mono">{_e(prompt)}'
                f'</div><div class="generated mono">{_e(entry.get("text", ""))}</div></td></tr>'
            )
        if len(entries) > 2 * _MAX_PROMPTS:
            more = len(entries) - 2 * _MAX_PROMPTS
            rows.append(f'<tr><th></th><td class="note">... {more} more</td></tr>')
    return f'<table class="tokens">{"".join(rows)}</table>' if rows else ""
