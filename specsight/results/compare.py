"""Comparing two runs: what differs in their manifests (model hash, dtype, device, versions),
then every tensor with tolerances, largest differences first.

Manifest differences that make numbers incomparable (other weights, another dtype) are reported
as such *before* any tensor is compared, so a drift is never blamed on the wrong cause.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .labels import coords
from .results import Results

__all__ = ["TensorDiff", "RunDiff", "compare_runs", "BLOCKING_FIELDS"]

#: manifest fields whose difference makes a numeric comparison meaningless
BLOCKING_FIELDS = ("model.id", "model.weights_sha256", "model.dtype")
_INFO_FIELDS = (
    "model.revision",
    "model.device",
    "versions.specsight",
    "versions.torch",
    "versions.transformers",
    "versions.python",
    "spec.sha256",
)


def _get(manifest: dict[str, Any], dotted: str) -> Any:
    node: Any = manifest
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


@dataclass(frozen=True)
class TensorDiff:
    name: str
    status: str  # "equal", "close", "different", "missing-in-a", "missing-in-b", "shape"
    max_abs: float = 0.0
    max_rel: float = 0.0
    where: str = ""
    a_shape: tuple[int, ...] = ()
    b_shape: tuple[int, ...] = ()


@dataclass
class RunDiff:
    blocking: list[tuple[str, Any, Any]] = field(default_factory=list)
    info: list[tuple[str, Any, Any]] = field(default_factory=list)
    tensors: list[TensorDiff] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.blocking and all(t.status in ("equal", "close") for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        """The comparison as JSON-ready data: blocking and informational manifest differences
        (field, a, b) and one entry per tensor."""
        return {
            "ok": self.ok,
            "blocking": [{"field": f, "a": a, "b": b} for f, a, b in self.blocking],
            "info": [{"field": f, "a": a, "b": b} for f, a, b in self.info],
            "tensors": [
                {**asdict(t), "a_shape": list(t.a_shape), "b_shape": list(t.b_shape)}
                for t in self.tensors
            ],
        }

    def format(self, *, limit: int = 20) -> str:
        lines = []
        for name, a, b in self.blocking:
            lines.append(f"INCOMPARABLE {name}: {a!r} vs {b!r}")
        if self.blocking:
            lines.append("numbers not compared: the runs used different weights or dtypes")
            return "\n".join(lines)
        for name, a, b in self.info:
            lines.append(f"note: {name} differs: {a!r} vs {b!r}")
        ranked = sorted(self.tensors, key=lambda t: (t.status in ("equal", "close"), -t.max_abs))
        for t in ranked[:limit]:
            if t.status in ("missing-in-a", "missing-in-b", "shape"):
                lines.append(f"{t.status:<9} {t.name} {list(t.a_shape)} vs {list(t.b_shape)}")
            else:
                extra = f" at {t.where}" if t.where and t.status == "different" else ""
                lines.append(
                    f"{t.status:<9} {t.name}: max |a-b| {t.max_abs:.3g}, max rel {t.max_rel:.3g}{extra}"
                )
        if len(ranked) > limit:
            lines.append(f"... {len(ranked) - limit} more tensors")
        same = sum(t.status in ("equal", "close") for t in self.tensors)
        lines.append(f"{same} of {len(self.tensors)} tensors match")
        return "\n".join(lines)


def _where(index: int, shape: tuple[int, ...], meta: dict[str, Any]) -> str:
    axes = meta.get("axes") or []
    values = meta.get("axis_values") or {}
    parts = []
    for dim, i in enumerate(coords(index, shape)):
        axis = axes[dim] if dim < len(axes) else f"dim{dim}"
        labels = values.get(axis) or []
        parts.append(f"{axis}={labels[i] if i < len(labels) else i}")
    return ", ".join(parts)


def _compare_tensor(
    name: str, a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float, meta: dict[str, Any]
) -> TensorDiff:
    if a.shape != b.shape:
        return TensorDiff(name, "shape", a_shape=tuple(a.shape), b_shape=tuple(b.shape))
    if a.dtype == b.dtype and torch.equal(a, b):
        return TensorDiff(name, "equal", a_shape=tuple(a.shape), b_shape=tuple(b.shape))
    fa, fb = a.double(), b.double()
    both_nan = torch.isnan(fa) & torch.isnan(fb)
    diff = (fa - fb).abs().masked_fill(both_nan, 0).nan_to_num(math.inf)
    if diff.numel() == 0 or float(diff.max()) == 0:
        return TensorDiff(name, "equal", a_shape=tuple(a.shape), b_shape=tuple(b.shape))
    rel = diff / fb.abs().clamp_min(1e-12)
    worst = int(diff.flatten().argmax())
    close = bool((diff <= atol + rtol * fb.abs().nan_to_num(0)).all())
    return TensorDiff(
        name,
        "close" if close else "different",
        float(diff.max()),
        float(rel.masked_fill(diff == 0, 0).max()),
        _where(worst, tuple(a.shape), meta),
        tuple(a.shape),
        tuple(b.shape),
    )


def compare_runs(a: Results, b: Results, *, rtol: float = 1e-5, atol: float = 1e-6) -> RunDiff:
    """Manifest differences, then every tensor of ``a`` against ``b``."""
    out = RunDiff()
    for name in BLOCKING_FIELDS:
        va, vb = _get(a.manifest, name), _get(b.manifest, name)
        if va != vb:
            out.blocking.append((name, va, vb))
    for name in _INFO_FIELDS:
        va, vb = _get(a.manifest, name), _get(b.manifest, name)
        if va != vb:
            out.info.append((name, va, vb))
    if out.blocking:
        return out
    ta, tb = a.tensors, b.tensors
    meta = a.manifest.get("tensors", {})
    for name in sorted(set(ta) | set(tb)):
        if name not in ta:
            out.tensors.append(TensorDiff(name, "missing-in-a", b_shape=tuple(tb[name].shape)))
        elif name not in tb:
            out.tensors.append(TensorDiff(name, "missing-in-b", a_shape=tuple(ta[name].shape)))
        else:
            out.tensors.append(
                _compare_tensor(name, ta[name], tb[name], rtol, atol, meta.get(name, {}))
            )
    return out
