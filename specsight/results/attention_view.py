"""The report's attention view: each saved ``attn_pattern`` site drawn as circuitsvis draws
one, a query x key grid of attention weights per head, with the prompt's tokens on both axes
and pickers for the head (and prompt, sweep cell); a sequential colour scale, weights being
probabilities."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

__all__ = ["attention_sections"]

#: tokens shown per prompt (longer prompts: their first positions)
_MAX_KEYS = 256


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _token_labels(meta: dict[str, Any], positions: list[int]) -> list[str] | None:
    """``9: ' Mary'`` per position when every prompt has the same tokens there (else None)."""
    prompts = meta.get("prompt_tokens") or []
    if not prompts or any(p != prompts[0] for p in prompts[1:]):
        return None
    tokens = prompts[0]
    return [f"{p}: {tokens[p]!r}" if 0 <= p < len(tokens) else str(p) for p in positions]


def _view(tensor: Any, meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The pattern with query and key first (then head, then the leading axes), and the
    manifest entry that labels it."""
    axes = list(meta.get("axes", []))
    order = [axes.index("query"), axes.index("key"), axes.index("head")]
    order += [i for i in range(len(axes)) if i not in order]
    view = tensor.permute(*order)[:, :_MAX_KEYS]
    values = dict(meta.get("axis_values", {}))
    queries = list(values.get("query") or range(view.shape[0]))
    keys = list(range(view.shape[1]))
    labels = {"query": _token_labels(meta, queries), "key": _token_labels(meta, keys)}
    shown = {
        **meta,
        "axes": [axes[i] for i in order],
        "axis_values": {**values, "query": queries, "key": keys},
        "axis_labels": {**meta.get("axis_labels", {}), **{k: v for k, v in labels.items() if v}},
        "baseline": None,
        "signed": False,
    }
    return view, shown


def attention_sections(
    saves: dict[str, Any],
    tensors: dict[str, Any],
    first_index: int,
    entry_of: Callable[..., tuple[dict[str, Any], str]],
) -> tuple[list[dict[str, Any]], str]:
    """The report's data entries and HTML for every saved attention pattern; ``entry_of``:
    the report's entry builder (name, tensor, meta, extra, metrics) -> (entry, note)."""
    entries, parts = [], []
    for name, tensor in saves.items():
        meta = tensors.get(name, {})
        if "query" not in meta.get("axes", []) or "key" not in meta.get("axes", []):
            continue
        view, shown = _view(tensor, meta)
        entry, note = entry_of(name, view.float(), shown, {}, {})
        index = first_index + len(entries)
        entries.append(entry)
        same = "" if shown["axis_labels"].get("key") else " (prompts differ: positions only)"
        about = f"attention of {meta.get('invoke', '')} at {meta.get('site', '')}{same}"
        parts.append(
            f'<div class="metric attention" id="metric-{index}"><h3>{_e(name)} '
            f'<span class="where">{_e(about)}</span></h3>'
            + (f'<p class="note">{_e(note)}</p>' if note else "")
            + '<p class="note">rows: query position; columns: key position; choose the head:</p>'
            + '<div class="slices"></div><div class="plot"></div></div>'
        )
    return entries, "".join(parts)
