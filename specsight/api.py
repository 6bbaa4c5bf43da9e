"""The Python API: load a spec, compile it, run it, rerun a run folder. What the CLI calls, and
what notebooks use.

    import specsight
    results = specsight.run("specs/ioi_patching.yaml")
    results["logit_diff"]            # tensor shaped [layer, pos]

``run`` accepts a path, a YAML/JSON string's loaded dict, or a :class:`~specsight.spec.Spec`.
Importing this module does not import torch; running a spec does.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .compile import (
    BLOCK_ROWS,
    Budget,
    activation_budget,
    batch_cap,
    check_references,
    plan_blocks,
    read_items,
)
from .compile import compile_plan as _compile
from .compile.saes import SaeSource
from .errors import ModelNotFoundError, RunError, SpecError
from .models import ModelInfo, Tokenizer
from .models.catalog import IN_MEMORY
from .plan import Plan
from .spec import Spec, doc_of, document_of, load_spec, python_functions, python_refusal

if TYPE_CHECKING:
    import torch

    from .models.load import LoadedModel
    from .results import Results, RunDiff

__all__ = [
    "load_spec",
    "compile_plan",
    "run",
    "rerun_folder",
    "doc_of",
    "load_model_for",
    "model_info_for",
    "validate",
]


def compile_plan(
    spec: Spec,
    info: ModelInfo,
    tokenizer: Tokenizer,
    *,
    max_batch: int | None = None,
    device: str = "cpu",
    allow_files: bool = True,
    prefix_reuse: bool = True,
    position_reuse: bool = True,
) -> Plan:
    """Compile a spec for a model described by ``info`` (no torch needed for CPU devices).

    ``max_batch`` None sizes forwards from the memory available on ``device``.
    ``prefix_reuse`` and ``position_reuse`` skip what identical rows share: the layers below
    their first touched layer, the positions before their first touched position.
    """
    budget = Budget(
        max_batch=max_batch,
        memory=None if max_batch else _activation_budget(device),
        cap=batch_cap(device),
        prefix_reuse=prefix_reuse,
        position_reuse=position_reuse,
    )
    return _compile(spec, info, tokenizer, doc=doc_of(spec), budget=budget, allow_files=allow_files)


def _located(exc: ModelNotFoundError, spec: Spec) -> SpecError:
    """A model that does not exist, as a spec error at the field that names it."""
    doc = document_of(spec)
    return SpecError(
        doc.source.issue("unknown-model", exc.message, ("model", exc.field), hint=exc.hint)
    )


def _not_in_memory(spec: Spec) -> None:
    """A spec with ``model: in-memory`` has no model to load: a located SpecError."""
    if spec.model.id == IN_MEMORY:
        message = "'in-memory' names no model to load: this spec runs on a model passed to run()"
        hint = "specsight.run(spec, model=hf_model, tokenizer=hf_tokenizer) in Python"
        raise SpecError(
            document_of(spec).source.issue("in-memory-model", message, ("model", "id"), hint=hint)
        )


def load_model_for(spec: Spec, *, device: str | None = None) -> LoadedModel:
    """The model a spec's ``model:`` names, loaded; a model that does not exist is a located
    SpecError (exit 2), a model that fails to load a ModelLoadError (exit 1)."""
    from .models.load import load_model_ref

    doc = doc_of(spec)
    _not_in_memory(spec)
    try:
        return load_model_ref(spec.model, device=device, base_dir=doc.base_dir if doc else None)
    except ModelNotFoundError as exc:
        raise _located(exc, spec) from None


def model_info_for(spec: Spec) -> tuple[ModelInfo, Tokenizer]:
    """ModelInfo and tokenizer of a spec's model without loading weights (see
    :func:`load_model_for` for errors)."""
    from .models.info_cache import cached_info, remember_info

    doc = doc_of(spec)
    _not_in_memory(spec)
    remembered = cached_info(spec.model)  # torch-free: no torch import for a model read before
    if remembered is not None:
        return remembered
    from .models.load import load_ref_info

    try:
        info, tokenizer = load_ref_info(spec.model, base_dir=doc.base_dir if doc else None)
    except ModelNotFoundError as exc:
        raise _located(exc, spec) from None
    remember_info(spec.model, info, tokenizer)
    return info, tokenizer


def validate(source: str | os.PathLike[str] | dict[str, Any] | Spec) -> str | None:
    """Check a spec as far as this machine can without loading weights (``specsight
    validate``). With the model's files here (tiny models, the converted built-in, folders,
    the hub cache) it is compiled, so everything ``plan`` catches is caught; otherwise the
    checks that need no model run, and the returned note says what was not checked. Raises
    one SpecError with every problem found."""
    from .models.catalog import is_here

    spec = _as_spec(source)
    items = read_items(spec, document_of(spec))  # a bad dataset is found before torch loads
    if is_here(spec.model):
        info, tokenizer = model_info_for(spec)
        budget = Budget(max_batch=1, memory=None, cap=batch_cap("cpu"))
        _compile(spec, info, tokenizer, doc=doc_of(spec), budget=budget, items=items)
        return None
    check_references(spec, document_of(spec))
    return (
        f"model '{spec.model.name}' is not here: sites, layers, positions and tokens were not "
        "checked"
    )


def _activation_budget(device: str) -> int:
    """Activation bytes a forward may use on ``device`` (torch is imported for CUDA only)."""
    if device.startswith("cuda"):
        from .engine import device_free_bytes

        return activation_budget(device, device_free_bytes(device))
    return activation_budget(device)


def _as_spec(source: Any) -> Spec:
    if isinstance(source, Spec):
        return source
    if isinstance(source, dict | str | os.PathLike):
        return load_spec(source)
    raise TypeError(f"run() takes a path, a dict or a Spec, not {type(source).__name__}")


def run(
    source: str | os.PathLike[str] | dict[str, Any] | Spec,
    *,
    model: LoadedModel | torch.nn.Module | None = None,
    tokenizer: Any = None,
    out: str | os.PathLike[str] | None = None,
    max_batch: int | None = None,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    prefix_reuse: bool = True,
    position_reuse: bool = True,
    force: bool = False,
    block_rows: int = BLOCK_ROWS,
    saes: Mapping[str, str] | None = None,
    functions: Mapping[str, Callable[..., Any]] | None = None,
) -> Results:
    """Validate, compile and run a spec on this machine; optionally write ``out`` (a folder
    holding another spec's run is replaced only with ``force``; checked before running).

    ``model``: the model to run instead of loading the spec's: a Hugging Face model (with its
    ``tokenizer``, for text) or a :class:`~specsight.models.load.LoadedModel`. It must be the
    model the spec names (family, layers, widths, heads, vocabulary: a located SpecError
    otherwise), unless the spec says ``model: in-memory``.

    A dataset run of more than ``block_rows`` rows is compiled and run a block of items at a
    time (what it holds stays flat in the number of items), unless its items read each other
    (see :func:`specsight.compile.why_one_plan`).

    ``saes``: SAE folders the spec may name by id (``saes: {x: {id: ID, ...}}``), id -> path.

    ``functions``: the Python functions the spec's ``python`` metrics and ops name, name ->
    callable: a metric's gets each forward's rows' logits at its position ([n, vocab]) and
    returns one value per row ([n]); an op's gets the site's values at its positions ([n,
    width]) and returns their replacement (the same shape). Local runs only."""
    from .engine import Executor, given_functions
    from .results import check_out_dir, results_from_raw

    started = time.perf_counter()
    spec = _as_spec(source)
    doc = doc_of(spec)
    python_refusal(spec, doc, functions)
    if out is not None:
        check_out_dir(Path(out), document_of(spec).sha256, force=force)
    dataset = read_items(spec, document_of(spec))  # a bad dataset is found before the model loads
    t0 = time.perf_counter()
    restore = None
    if model is None:
        model = load_model_for(spec, device=device)
    else:
        from .models.load.in_memory import given_model, modes_of

        restore = modes_of(model)
        model = given_model(spec, model, tokenizer)
    load_s = time.perf_counter() - t0
    try:
        budget = Budget(
            max_batch=max_batch,
            memory=None if max_batch else _activation_budget(model.device),
            cap=batch_cap(model.device),
            prefix_reuse=prefix_reuse,
            position_reuse=position_reuse,
        )
        registered = {sae_id: SaeSource(str(folder)) for sae_id, folder in (saes or {}).items()}
        compiler = functools.partial(
            _compile, spec, model.info, model.tokenizer, doc=doc, budget=budget, saes=registered
        )
        executor = Executor(model.model, pad_id=model.tokenizer.pad_id, progress=progress)
        t0 = time.perf_counter()
        items, blocks = plan_blocks(spec, compiler, block_rows, items=dataset)
        with given_functions(functions):
            if blocks is None:  # one plan (over the items already read, when they were)
                plan = compiler(items=items)
                compile_s = time.perf_counter() - t0
                raw = executor.run(plan)
            else:
                probe_s = time.perf_counter() - t0
                raw = executor.run_blocks(blocks.plans(), blocks.total_rows, blocks.whole)
                plan, compile_s = blocks.whole(), probe_s + blocks.compile_s
    finally:
        if restore is not None:
            restore()
    timings = {"load_model_s": load_s, "compile_s": compile_s, **raw.timings}
    timings["total_s"] = time.perf_counter() - started
    results = results_from_raw(spec, doc, plan, model, raw, timings)
    results.record_items(None if dataset is None else dataset.rows)
    results.record_functions(functions, python_functions(spec))
    if out is not None:
        results.save(out, force=force)
    return results


def rerun_folder(
    run_dir: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    rtol: float = 0.0,
    atol: float = 0.0,
    saes: Mapping[str, str] | None = None,
) -> RunDiff:
    """Run a run folder's spec again from its manifest and compare the results (``specsight
    rerun``).

    The spec comes from the manifest (or from its file when that file is unchanged, so files
    beside it still resolve). The model is loaded and its weights hash checked *before* running:
    other weights or another dtype are reported as such instead of as numeric drift.
    ``saes``: SAE folders the spec names by id, as for :func:`run`.
    """
    from .models.load import load_model_ref
    from .results import Results, RunDiff, compare_runs

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
    new = run(spec, model=loaded, out=out, saes=saes)
    return compare_runs(new, old, rtol=rtol, atol=atol)
