"""Admitting a job: a submitted spec validated and compiled against the server's model, within
the server's limits (:class:`LimitError`, HTTP 413), and the refusals of what runs locally only
(factories, file inputs).

Nothing here reads files or runs user code: a remote spec is data, compiled with file vectors
refused, and the plan holds only token ids, module names, positions and numbers.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..compile import Budget, compile_plan, spec_sizes
from ..compile.saes import SaeConfigError, SaeSource, read_sae_config
from ..compile.templates import TEMPLATE, cell_text
from ..errors import Issue, ModelLoadError, SpecError, SpecsightError, format_path
from ..plan import Plan
from ..spec import LoadedDoc, Spec, from_data, python_refusal, validate_spec
from .protocol import Limits

if TYPE_CHECKING:
    from ..models.load import LoadedModel

__all__ = [
    "LimitError",
    "PreparedJob",
    "check_text_bytes",
    "strings_in",
    "checked_saes",
    "sae_configs",
    "factory_refusal",
    "prepare_job",
    "refuse_local_only",
]


class LimitError(SpecsightError):
    """A job asks for more than the server allows (HTTP 413)."""

    exit_code = 1

    def __init__(self, what: str, estimate: int, limit: int, hint: str | None = None):
        self.what, self.estimate, self.limit, self.hint = what, estimate, limit, hint
        super().__init__(f"{what}: {estimate} exceeds the server's limit of {limit}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": "limit-exceeded",
            "message": str(self),
            "hint": self.hint,
            "estimate": self.estimate,
            "limit": self.limit,
        }


@dataclass
class PreparedJob:
    """A validated, compiled job, ready to run."""

    spec: Spec
    doc: LoadedDoc
    plan: Plan
    result_bytes: int


def _utf8_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _longest_values(rows: list[Any]) -> dict[str, int]:
    """Each dataset column's longest value, in UTF-8 bytes."""
    longest: dict[str, int] = {}
    for row in rows:
        if isinstance(row, dict):
            for name, value in row.items():
                size = _utf8_bytes(cell_text(value))
                if size > longest.get(name, -1):
                    longest[name] = size
    return longest


def _filled_bytes(text: str, longest: dict[str, int]) -> int:
    """The most UTF-8 bytes ``text`` can have with dataset values in its placeholders (each
    column's longest value in each of its placeholders; counted, not rendered)."""
    size = _utf8_bytes(text)
    if "{" not in text or not longest:
        return size
    names = Counter[str]()
    for match in TEMPLATE.finditer(text):
        if match.group(1) is None:
            size -= 1  # {{ writes {
        else:
            names[match.group(1)] += 1
    for name, count in names.items():
        if name in longest:  # a placeholder that names no column stays as it is
            size += count * (longest[name] - len(name) - 2)
    return size


def strings_in(data: Any) -> Iterator[tuple[tuple[Any, ...], str, bool]]:
    """Every string of JSON data with where it stands, keys included: (path, text, is a key);
    a key's path ends in the key. Iterative: a deeply nested body cannot exhaust the stack."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str):
                    yield path + (key,), key, True
                stack.append((path + (key,), item))
        elif isinstance(value, list):
            stack.extend((path + (i,), v) for i, v in enumerate(value))
        elif isinstance(value, str):
            yield path, value, False


def check_text_bytes(spec_data: Any, limits: Limits) -> None:
    """Every text of a submitted spec (prompts, tokens, dataset values, names, and templates
    with the dataset's longest values in) within ``limits.max_prompt_bytes`` UTF-8 bytes,
    checked on the raw data before anything validates or tokenizes it (LimitError, 413)."""
    dataset = spec_data.get("dataset") if isinstance(spec_data, dict) else None
    rows = dataset.get("rows") if isinstance(dataset, dict) else dataset
    longest = _longest_values(rows) if isinstance(rows, list) else {}
    limit = limits.max_prompt_bytes

    def refuse(path: tuple[Any, ...], size: int, what: str = "") -> None:
        raise LimitError(
            f"prompt bytes ({format_path(path) or 'the spec'}{what})",
            size,
            limit,
            "shorten the text; a prompt must also fit in max_prompt_tokens tokens",
        )

    for path, value, is_key in strings_in(spec_data):
        if is_key:
            if _utf8_bytes(value) > limit:
                refuse(path[:-1], _utf8_bytes(value), ": a key")
        elif path[:1] == ("dataset",):
            if _utf8_bytes(value) > limit:
                refuse(path, _utf8_bytes(value))
        elif (size := _filled_bytes(value, longest)) > limit:
            filled = size != _utf8_bytes(value)
            refuse(path, size, " with the dataset's longest values in" if filled else "")


def _served_seed(model: LoadedModel) -> int:
    return int(getattr(model, "seed", 0) or 0)


def _check(what: str, estimate: int, limit: int, hint: str) -> None:
    if estimate > limit:
        raise LimitError(what, estimate, limit, hint)


def _local_only(
    doc: LoadedDoc | None, code: str, message: str, path: tuple, hint: str
) -> SpecError:
    """A SpecError located in ``doc`` when there is one."""
    if doc is None:
        return SpecError([Issue(code, message, path, None, None, None, hint)])
    return SpecError(doc.source.issue(code, message, path, hint=hint))


def factory_refusal(doc: LoadedDoc | None) -> SpecError:
    """The error a ``model.factory`` spec gets from a server (and from the client, early)."""
    return _local_only(
        doc,
        "factory-remote",
        "model.factory runs local Python code; a server never imports or runs code named by a spec",
        ("model", "factory"),
        "run this spec locally (without --remote), or name one of the server's models in model.id",
    )


def checked_saes(saes: dict[str, str]) -> dict[str, str]:
    """A server's ``--sae ID=PATH`` SAEs, each folder's config and weights checked at start
    (a ModelLoadError otherwise); id -> absolute folder."""
    checked = {}
    for sae_id, folder in saes.items():
        full = os.path.abspath(os.path.expanduser(folder))
        try:
            read_sae_config(full)
        except SaeConfigError as exc:
            raise ModelLoadError(
                f"SAE '{sae_id}' ({folder}): {exc.message}", hint=exc.hint
            ) from None
        checked[sae_id] = full
    return checked


def _named(spec: Spec, saes: dict[str, str]) -> dict[str, str]:
    """The server's SAEs the spec names by id (most specs name none: no config is read)."""
    wanted = {entry.id for entry in spec.saes.values()}
    return {sae_id: folder for sae_id, folder in saes.items() if sae_id in wanted}


def sae_configs(saes: dict[str, str]) -> dict[str, dict[str, Any]]:
    """What clients compile against for each of a model's SAEs: its config, not its path."""
    return {sae_id: read_sae_config(folder) for sae_id, folder in saes.items()}


def refuse_local_only(spec: Spec, doc: LoadedDoc | None) -> None:
    """Raise the SpecError a spec that can only run locally gets: a factory model, a model
    placement (device_map, max_memory, offload_folder: a path), image and tensor inputs
    (files, which a server never reads), or Python functions."""
    if spec.model.factory is not None:
        raise factory_refusal(doc)
    python_refusal(spec, doc, where="a server")
    _refuse_placement(spec, doc)
    for name, entry in spec.saes.items():
        if entry.path is not None:
            raise _local_only(
                doc,
                "file-not-allowed",
                f"SAE '{name}' names a folder: a server never reads paths from a spec",
                ("saes", name, "path"),
                "name an SAE the server has with 'id:' (a server's `--sae ID=PATH`; its "
                "GET /v1/models lists them)",
            )
    for name, invoke in spec.invokes.items():
        if invoke.input_kind != "prompt":
            raise _local_only(
                doc,
                "file-input-remote",
                f"'{invoke.input_kind}' inputs are files, which run locally only",
                ("invokes", name, invoke.input_kind),
                "run this spec without --remote (servers take text prompts for now)",
            )


def _refuse_placement(spec: Spec, doc: LoadedDoc | None) -> None:
    """A model placement in a remote spec (the server places its own models; and
    ``offload_folder`` is a path) is refused."""
    for field in ("device_map", "max_memory", "offload_folder"):
        if getattr(spec.model, field) is not None:
            raise _local_only(
                doc,
                "placement-remote",
                f"model.{field} places a model on this machine; a server places its own",
                ("model", field),
                "remove it with --remote (specsight serve --device-map places the served model)",
            )


def _refuse_unserved(spec: Spec, doc: LoadedDoc, model: LoadedModel) -> None:
    """Model fields the server cannot honour, refused rather than ignored: another revision,
    device or attention implementation than the one it loaded."""
    ref, given = spec.model, spec.model.model_fields_set
    served = {
        "revision": model.revision,
        "device": model.device,
        "attn_implementation": model.info.attn_implementation,
    }
    asked = {
        "revision": ref.revision if "revision" in given else None,
        "device": ref.device if "device" in given and ref.device != "auto" else None,
        "attn_implementation": ref.attn_implementation if "attn_implementation" in given else None,
    }
    for field, wanted in asked.items():
        have = served[field]
        if wanted is None or wanted == have or (field == "device" and str(have).startswith(wanted)):
            continue
        what = {"revision": "revision", "device": "on", "attn_implementation": "with attention"}
        runs = f"{what[field]} {have}" if have else f"without a {field}"
        raise SpecError(
            doc.source.issue(
                "model-mismatch",
                f"this server runs '{model.model_id}' {runs}, not {wanted}",
                ("model", field),
                hint=f"remove model.{field}, or run locally",
            )
        )


def prepare_job(
    spec_data: dict[str, Any], model: LoadedModel, limits: Limits, *, spec_file: str | None = None
) -> PreparedJob:
    """Validate and compile a submitted spec against the server's model, enforcing limits.

    Raises SpecError (422: located issues) or LimitError (413)."""
    check_text_bytes(spec_data, limits)  # before anything parses or tokenizes the texts
    doc = from_data(spec_data, file=spec_file)
    spec = validate_spec(doc)
    if spec.model.factory is not None:
        raise factory_refusal(doc)
    python_refusal(spec, doc, where="a server")
    _refuse_placement(spec, doc)
    if spec.model.id != model.model_id:
        raise SpecError(
            doc.source.issue(
                "unknown-model",
                f"this server runs '{model.model_id}', not '{spec.model.id}'",
                ("model",),
                hint="pick a model from GET /v1/models",
            )
        )
    given = spec.model.model_fields_set
    if "dtype" in given and spec.model.dtype != model.dtype:
        raise SpecError(
            doc.source.issue(
                "model-mismatch",
                f"this server runs '{model.model_id}' in {model.dtype}, not {spec.model.dtype}",
                ("model", "dtype"),
                hint=f"write dtype: {model.dtype}, or run locally",
            )
        )
    _refuse_unserved(spec, doc, model)
    if "seed" in given and spec.model.seed != _served_seed(model):
        raise SpecError(
            doc.source.issue(
                "model-mismatch",
                f"this server's '{model.model_id}' was built with seed {_served_seed(model)}, not {spec.model.seed}",
                ("model", "seed"),
                hint="drop model.seed, or run locally",
            )
        )
    if spec.dataset is not None and spec.dataset.rows is not None:
        _check(
            "dataset rows",
            len(spec.dataset.rows),
            limits.max_dataset_rows,
            "sample the dataset (dataset: {sample: {n: ...}}) or split it into several jobs",
        )
    for invoke in spec.invokes.values():
        for op in invoke.ops:
            vector = getattr(op, "vector", None) or getattr(op, "value", None)
            if isinstance(vector, list):
                _check(
                    "inline vector values",
                    len(vector),
                    limits.max_vector_values,
                    "send a shorter vector",
                )
    # every size from the spec's dimensions, before compiling materialises anything per row
    sizes = spec_sizes(
        spec,
        model.info,
        model.tokenizer,
        module_widths=model.module_widths,
        max_cells=limits.max_cells,
        sae_widths={
            sae_id: cfg["d_sae"] for sae_id, cfg in sae_configs(_named(spec, model.saes)).items()
        },
    )
    _check("sweep cells", sizes.cells, limits.max_cells, "split the sweep into several jobs")
    _check("batch rows", sizes.rows, limits.max_rows, "split the spec into several jobs")
    _check("prompt tokens", sizes.longest_prompt, limits.max_prompt_tokens, "shorten the prompts")
    _check(
        "tokens in all rows",
        sizes.total_tokens,
        limits.max_total_tokens,
        "sweep fewer cells per job",
    )
    _check("new tokens", sizes.max_new_tokens, limits.max_new_tokens, "generate fewer tokens")
    result_bytes = sizes.result_bytes
    _check(
        "estimated result bytes",
        result_bytes,
        limits.max_result_bytes,
        "save fewer sites, positions or steps",
    )
    budget = Budget(max_cells=limits.max_cells)
    saes = {sae_id: SaeSource(folder) for sae_id, folder in model.saes.items()}
    plan = compile_plan(
        spec, model.info, model.tokenizer, doc=doc, budget=budget, allow_files=False, saes=saes
    )
    return PreparedJob(spec, doc, plan, result_bytes)
