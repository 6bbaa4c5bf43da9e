"""``specsight rerun``: run a run folder's spec again from its manifest and compare the results.

The spec comes from the manifest (or from its file when that file is unchanged, so files beside
it still resolve). The model is loaded and its weights hash checked *before* running: other
weights or another dtype are reported as such instead of as numeric drift.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .compare import RunDiff, compare_runs
from .errors import RunError

__all__ = ["rerun_folder"]


def rerun_folder(
    run_dir: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> RunDiff:
    from .api import load_spec, run
    from .models import load_model_ref
    from .results import Results

    old = Results.load(run_dir)
    recorded = old.manifest.get("spec", {})
    content = recorded.get("content")
    if not isinstance(content, dict):
        raise RunError(
            f"{run_dir} has no spec content in its manifest",
            hint="rerun needs a manifest written by specsight run --out",
        )
    spec_file = recorded.get("file")
    if (
        spec_file
        and Path(spec_file).is_file()
        and hashlib.sha256(Path(spec_file).read_bytes()).hexdigest() == recorded.get("sha256")
    ):
        spec = load_spec(spec_file)
    else:
        spec = load_spec(content)
    model_meta = old.manifest.get("model", {})
    ref = spec.model
    base_dir = str(Path(spec_file).resolve().parent) if spec_file else None
    loaded = load_model_ref(ref, device=model_meta.get("device") or ref.device, base_dir=base_dir)
    blocking = []
    if loaded.weights_sha256 != model_meta.get("weights_sha256"):
        blocking.append(
            ("model.weights_sha256", model_meta.get("weights_sha256"), loaded.weights_sha256)
        )
    if loaded.dtype != model_meta.get("dtype"):
        blocking.append(("model.dtype", model_meta.get("dtype"), loaded.dtype))
    if blocking:
        return RunDiff(blocking=blocking)
    new = run(spec, model=loaded, out=out)
    return compare_runs(new, old, rtol=rtol, atol=atol)
