"""Circuit files: ``run --out`` writes ``circuits/<metric>.top<k>.json`` for each circuit a
faithfulness metric checked (the top k edges of an edge attribution, by absolute score), and
``circuits/<metric>.json`` with an edge attribution's ``top`` edges. A spec reads one back
with ``circuit: {file: ...}`` (``specsight.compile.circuits`` checks it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..engine.circuit_metrics import ranked

__all__ = ["write_circuits", "ranked_edges"]

#: the ``specsight_circuit`` version written (``specsight.compile.circuits`` reads it)
FORMAT = 1


def ranked_edges(scores: torch.Tensor, k: int) -> list[tuple[int, int, int | None]]:
    """The ``k`` edges a circuit of that size holds, strongest first: (upstream, downstream,
    position or None)."""
    n_up, n_down = scores.shape[-2:]
    out = []
    for index in ranked(scores, k).tolist():
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
    """Write the circuit files a run's metrics ask for (their manifest entries'
    ``circuit_files``) into ``folder/circuits``."""
    written = []
    for name, entry in results.manifest.get("tensors", {}).items():
        if "/" in name:  # a companion
            continue
        for wanted in entry.get("circuit_files", []):
            target = folder / "circuits" / f"{wanted['file']}.json"
            target.parent.mkdir(exist_ok=True)
            document = _document(results, wanted["ranked_by"], wanted["edges"], name)
            target.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
            written.append(target)
    return written
