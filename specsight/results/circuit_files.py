"""Circuit files: ``run --out`` writes ``circuits/<metric>.top<k>.json`` for each circuit a
faithfulness metric checked (the top k edges of an edge attribution, by absolute score), and
``circuits/<metric>.json`` with an edge attribution's ``top`` edges. A spec reads one back
with ``circuit: {file: ...}`` (``specsight.compile.circuits`` checks it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_circuits", "ranked_edges"]

#: the ``specsight_circuit`` version written (``specsight.compile.circuits`` reads it)
FORMAT = 1


def ranked_edges(scores: torch.Tensor, k: int) -> list[tuple[int, int, int | None]]:
    """The ``k`` edges of largest absolute score (ties: the first in row-major order), as the
    engine picks a circuit: (upstream, downstream, position or None)."""
    flat = torch.nan_to_num(scores.float().abs().flatten(), nan=-1.0)
    order = torch.sort(flat, descending=True, stable=True).indices[:k].tolist()
    n_up, n_down = scores.shape[-2:]
    out = []
    for index in order:
        pos, rest = divmod(index, n_up * n_down)
        out.append((*divmod(rest, n_down), pos if scores.dim() == 3 else None))
    return out


def _document(results: Any, source: str, k: int, written_by: str) -> dict[str, Any]:
    manifest = results.manifest
    entry = manifest["tensors"][source]
    scores = results.metrics[source]
    ups, downs = entry["axis_values"]["upstream"], entry["axis_values"]["downstream"]
    edges = ranked_edges(scores, k)
    nodes = sorted({ups[u] for u, _, _ in edges} | {downs[d] for _, d, _ in edges})
    model = manifest.get("model", {})
    return {
        "specsight_circuit": FORMAT,
        "model": {
            "id": model.get("id"),
            "architecture": model.get("architecture"),
            **entry["graph"],
        },  # fmt: skip
        "metric": written_by,
        "ranked_by": source,
        "spec_sha256": results.spec_sha256,
        "nodes": nodes,
        "edges": [_edge((ups, downs), edge, scores) for edge in edges],
    }


def _edge(names: tuple[list[str], list[str]], edge: tuple[int, int, int | None], scores: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    up, down, pos = edge
    at = "" if pos is None else f"@{pos}"
    score = scores[up, down] if pos is None else scores[pos, up, down]
    return {"edge": f"{names[0][up]}->{names[1][down]}{at}", "score": float(score)}


def write_circuits(results: Any, folder: Path) -> list[Path]:
    """Write the circuit files of a run into ``folder/circuits`` (none: no circuit metric)."""
    tensors = results.manifest.get("tensors", {})
    wanted: list[tuple[str, str, int]] = []  # (file stem, source, k)
    for name, entry in tensors.items():
        if "/" in name:  # a companion
            continue
        if entry.get("metric_kind") == "edge_attribution":
            wanted.append((name, name, int(entry["top"])))
        elif entry.get("metric_kind") == "faithfulness" and entry.get("circuit_source"):
            wanted += [(f"{name}.top{k}", entry["circuit_source"], k) for k in entry["circuit_sizes"]]  # fmt: skip
    written = []
    for stem, source, k in wanted:
        target = folder / "circuits" / f"{stem.replace('/', '_')}.json"
        target.parent.mkdir(exist_ok=True)
        document = _document(results, source, k, stem.split(".top")[0])
        target.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        written.append(target)
    return written
