"""Results of a run: tensors by name, metric axes, the manifest, files and a readable summary.

``results.safetensors`` holds every metric (``logit_diff``, ``top/ids``) and saved value
(``clean/resid_post.5``); ``manifest.json`` holds what is needed to trust and rerun it: spec and
weight hashes, versions, device, dtype, timings and each tensor's sha256 and axes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..errors import RunError, did_you_mean
from ..plan import PlanExpectation
from .arrays import to_xarray
from .circuit_files import write_circuits
from .expect import Outcome, evaluate
from .folder import MANIFEST_FILE, RESULTS_FILE, write_folder
from .frames import split_parts, stack_sites, to_pandas
from .inline import render_inline
from .plots import write_heatmaps
from .report import REPORT_FILE, write_report
from .summary import render_summary

__all__ = ["Results", "tensor_sha256", "RESULTS_FILE", "MANIFEST_FILE"]


def describe_function(function: Any) -> dict[str, Any]:
    """A Python function as the manifest records it: where it is defined and its source's
    sha256 (None where Python cannot find the source: a builtin, a C extension)."""
    name = f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"
    try:
        source: str | None = inspect.getsource(function)
    except (OSError, TypeError):
        source = None
    digest = hashlib.sha256(source.encode()).hexdigest() if source is not None else None
    return {"function": name, "source_sha256": digest}


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 over a tensor's dtype, shape and bytes (contiguous, CPU)."""
    t = tensor.detach().cpu().contiguous()
    flat = t.reshape(-1)
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        digest.update(memoryview(flat.view(torch.uint8).numpy()))  # no copy of the bytes
    return digest.hexdigest()


@dataclass(repr=False)
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

    def judge(self, expectations: tuple[PlanExpectation, ...]) -> None:
        """Check a plan's ``expect:`` claims on these results: the verdicts go into
        ``expectations`` and the manifest."""
        self.expectations = evaluate(expectations, self.tensors, self.manifest["tensors"])
        self.manifest["expectations"] = [o.to_dict() for o in self.expectations]

    def record_items(self, rows: Sequence[Mapping[str, Any]] | None) -> None:
        """Record the dataset rows the run used, item by item, in the manifest (what
        :meth:`to_pandas` and :meth:`to_xarray` join on ``item``)."""
        dataset = self.manifest.get("dataset")
        if rows is not None and isinstance(dataset, dict):
            dataset["items"] = [dict(row) for row in rows]

    def record_functions(
        self, functions: Mapping[str, Any] | None, named: Sequence[tuple[Any, str]]
    ) -> None:
        """Record which Python function each name the spec uses was (``module.qualname``) and
        the sha256 of its source, where Python can find it."""
        used = sorted({fn for _, fn in named})
        if not used or not functions:
            return
        self.manifest["python"] = {name: describe_function(functions[name]) for name in used}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.metrics, **self.saves}

    def __repr__(self) -> str:
        """One line: the spec, the model, the first few tensors with their shapes, the claims."""
        about = self.manifest.get("spec", {})
        spec = repr(about["name"]) if about.get("name") else about.get("file") or "a spec"
        model = self.manifest.get("model", {}).get("id") or "?"
        shown = [f"{n} {list(t.shape)}" for n, t in list(self.tensors.items())[:4]]
        more = len(self.tensors) - len(shown)
        listed = ", ".join(shown) + (f", +{more} more" if more > 0 else "")
        claims = ""
        if self.expectations:
            held = sum(o.ok for o in self.expectations)
            claims = f"; expect {held}/{len(self.expectations)} held"
        return f"<Results of {spec} on {model}: {listed}{claims}>"

    def to_pandas(self, name: str | None = None, *, items: bool = False) -> Any:
        """Every metric as one tidy pandas DataFrame: a row per cell with ``metric``, a column
        per axis (and ``<axis>_label``), ``value``, ``stderr``, ``ci_low``, ``ci_high`` and
        ``effect``, and the dataset's columns joined on ``item``. ``items=True``: the per-item
        values of reduced metrics. With ``name``: that one tensor in long format."""
        return to_pandas(self, name, items=items)

    def to_xarray(self, name: str | None = None) -> Any:
        """Every tensor as an xarray Dataset whose variables share dims (``patched_ld`` and
        ``patched_ld_stderr`` on the same ``layer`` and ``pos``); one tensor as a DataArray
        with ``name``."""
        return to_xarray(self, name)

    def stack(self, site: str, invoke: str | None = None) -> torch.Tensor:
        """Per-layer saves of ``site`` (``results.stack("resid_post")``) as one
        ``[layer, ...]`` tensor."""
        return stack_sites(self, site, invoke)

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        """A dla result split by component: ``embed``, ``bias``, ``heads`` [..., layer, head],
        ``attn`` and ``mlps`` [..., layer] (``results.parts("dla")["heads"]``)."""
        return split_parts(self, name)

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

    def save(
        self,
        out_dir: str | os.PathLike[str],
        *,
        plots: bool = True,
        report: bool = True,
        force: bool = False,
        results_bytes: bytes | None = None,
    ) -> Path:
        """Write ``results.safetensors``, ``manifest.json``, the page ``report.html`` and, for
        every metric swept over two axes, a heatmap ``<metric>.png`` into ``out_dir``,
        atomically: a folder holding another spec's run is replaced only with ``force``.
        ``results_bytes`` are written as ``results.safetensors`` instead of serialising the
        tensors (a server's exact bytes)."""

        def write(folder: Path) -> None:
            data, text = self.payload()
            (folder / RESULTS_FILE).write_bytes(
                results_bytes if results_bytes is not None else data
            )
            (folder / MANIFEST_FILE).write_text(text, encoding="utf-8")
            write_circuits(self, folder)
            if plots:
                write_heatmaps(self.metrics, self.manifest, folder)
            if report:
                write_report(self, folder / REPORT_FILE)

        return write_folder(Path(out_dir), write, self.spec_sha256, force=force)

    def payload(self) -> tuple[bytes, str]:
        """The run as ``results.safetensors`` bytes and ``manifest.json`` text: what
        :meth:`save` writes and what a server stores and sends."""
        tensors = {n: t.detach().cpu().contiguous() for n, t in sorted(self.tensors.items())}
        data = save(tensors, metadata={"format": "specsight-results-1"})
        manifest = dict(self.manifest)
        manifest["summary"] = {"next_tokens": self.next_tokens, "prompts": self.prompts}
        return data, json.dumps(manifest, indent=2, sort_keys=True) + "\n"

    @property
    def spec_sha256(self) -> str:
        """The sha256 of the spec this run comes from."""
        return str(self.manifest.get("spec", {}).get("sha256", ""))

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> Results:
        """Read a folder written by :meth:`save` (a RunError when it is not one)."""
        folder = Path(out_dir)
        for name in (MANIFEST_FILE, RESULTS_FILE):
            if not (folder / name).is_file():
                raise RunError(
                    f"{folder} is not a run folder: it has no {name}",
                    hint="write one with specsight run SPEC --out FOLDER",
                )
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
            tensors = load_file(str(folder / RESULTS_FILE))
            if not isinstance(manifest, dict):
                raise ValueError("the manifest is not a JSON object")
        except (OSError, ValueError, SafetensorError) as exc:
            raise RunError(f"cannot read the run in {folder}: {exc}") from None
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

    def _repr_html_(self) -> str:
        """How a notebook shows a run: the claims' verdicts, each metric (grids coloured as in
        the report), the run's facts folded below; static HTML, no script."""
        return render_inline(self)

    def summary(self, *, width: int = 120) -> str:
        """The readable terminal summary as plain text."""
        return render_summary(self, width=width)
