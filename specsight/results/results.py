"""Results of a run: tensors by name, metric axes, the manifest, files and a readable summary.

``results.safetensors`` holds every metric (``logit_diff``, ``top/ids``) and saved value
(``clean/resid_post.5``); ``manifest.json`` holds what is needed to trust and rerun it: spec and
weight hashes, versions, device, dtype, timings and each tensor's sha256 and axes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import did_you_mean
from .expect import Outcome
from .plots import write_heatmaps
from .summary import render_summary

__all__ = ["Results", "tensor_sha256", "RESULTS_FILE", "MANIFEST_FILE"]

RESULTS_FILE = "results.safetensors"
MANIFEST_FILE = "manifest.json"


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 over a tensor's dtype, shape and bytes (contiguous, CPU)."""
    t = tensor.detach().cpu().contiguous()
    flat = t.reshape(-1)
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        digest.update(memoryview(flat.view(torch.uint8).numpy()))  # no copy of the bytes
    return digest.hexdigest()


@dataclass
class Results:
    """What a run produced. ``results["logit_diff"]`` gives a tensor by name."""

    metrics: dict[str, torch.Tensor]
    saves: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    #: per invoke, per prompt: the top next tokens at the last position as (token, prob)
    next_tokens: dict[str, list[list[tuple[str, float]]]] = field(default_factory=dict)
    #: per invoke, its prompts (for the summary)
    prompts: dict[str, list[str]] = field(default_factory=dict)
    #: verdicts on the spec's ``expect:`` claims
    expectations: list[Outcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every expectation held."""
        return all(outcome.ok for outcome in self.expectations)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.metrics, **self.saves}

    def __getitem__(self, name: str) -> torch.Tensor:
        tensors = self.tensors
        if name not in tensors:
            hint = did_you_mean(name, tensors) or "names: " + ", ".join(sorted(tensors))
            raise KeyError(f"no result named '{name}' ({hint})")
        return tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.metrics or name in self.saves

    def axes(self, name: str) -> list[str]:
        return list(self.manifest.get("tensors", {}).get(name, {}).get("axes", []))

    # --- files -----------------------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike[str], *, plots: bool = True) -> Path:
        """Write ``results.safetensors``, ``manifest.json`` and, for every metric swept over
        two axes, a heatmap ``<metric>.png`` into ``out_dir``."""
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in sorted(self.tensors.items())}
        metadata = {"format": "specsight-results-1"}
        tmp = folder / (RESULTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, folder / RESULTS_FILE)
        manifest = dict(self.manifest)
        manifest["summary"] = {"next_tokens": self.next_tokens, "prompts": self.prompts}
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if plots:
            write_heatmaps(self.metrics, self.manifest, folder)
        return folder

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> Results:
        """Read a folder written by :meth:`save`."""
        folder = Path(out_dir)
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        tensors = load_file(str(folder / RESULTS_FILE))
        kinds = {name: meta.get("kind") for name, meta in manifest.get("tensors", {}).items()}
        metrics = {n: t for n, t in tensors.items() if kinds.get(n) != "save"}
        saves = {n: t for n, t in tensors.items() if kinds.get(n) == "save"}
        summary = manifest.pop("summary", {})
        outcomes = [Outcome(**o) for o in manifest.get("expectations", [])]
        next_tokens = {
            inv: [[(tok, prob) for tok, prob in prompt] for prompt in per]
            for inv, per in summary.get("next_tokens", {}).items()
        }
        return cls(metrics, saves, manifest, next_tokens, summary.get("prompts", {}), outcomes)

    # --- display ---------------------------------------------------------------------------

    def summary(self, *, width: int = 120) -> str:
        """The readable terminal summary as plain text."""
        return render_summary(self, width=width)
