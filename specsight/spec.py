"""Spec v1: the pydantic models of an experiment file.

A spec names a model, *invokes* (named prompt groups batched into forwards), *ops* on model
sites inside each invoke, optional *sweeps* that expand an invoke into many cells, and *metrics*
computed on the output. Models are frozen and reject unknown keys. :func:`validate_spec` turns
loaded data into a :class:`Spec` or a :class:`~specsight.errors.SpecError` listing every problem
with its file position and path.

Placeholders ``{name}`` in op fields refer to sweep variables (``{layer}``, ``{pos}``, ...).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import Issue, SpecError, did_you_mean
from .load import LoadedDoc

__all__ = [
    "SPEC_VERSION",
    "Spec",
    "ModelRef",
    "Invoke",
    "Op",
    "Metric",
    "OP_NAMES",
    "METRIC_KINDS",
    "validate_spec",
    "json_schema",
]

SPEC_VERSION = 1
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]*$"
PLACEHOLDER_PATTERN = r"^\{[A-Za-z_][A-Za-z0-9_]*\}$"

Placeholder = Annotated[str, Field(pattern=PLACEHOLDER_PATTERN, description="a sweep variable, e.g. '{factor}'")]
Number = Union[float, Placeholder]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- selectors -----------------------------------------------------------------------------


class TokenSelector(_Strict):
    """The position of a token in the prompt: ``{token: " John", occurrence: 2}``."""

    token: str = Field(min_length=1, description="token text as the tokenizer spells it, e.g. ' John'")
    occurrence: int = Field(
        1, description="1 = first occurrence, 2 = second, -1 = last", json_schema_extra={"not": {"const": 0}}
    )

    @field_validator("occurrence")
    @classmethod
    def _nonzero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("occurrence counts from 1 (first) or from -1 (last); 0 is not allowed")
        return value


PositionSelector = Union[
    int,
    Annotated[
        str,
        Field(
            description="'all', 'last', 'first', an index such as '-2', a slice 'a:b', or a placeholder '{pos}'"
        ),
    ],
    TokenSelector,
]
Positions = Union[PositionSelector, list[PositionSelector]]


# --- vectors -------------------------------------------------------------------------------


class FileVector(_Strict):
    """A vector stored in a .safetensors or .npy file beside the spec."""

    file: str = Field(min_length=1)
    key: str | None = Field(None, description="tensor name inside a .safetensors file")


class SavedVector(_Strict):
    """A value saved by another invoke (``save`` op), by its name."""

    saved: str = Field(min_length=1)
    reduce: Literal["none", "mean"] = Field(
        "none", description="'mean' averages the saved value over its positions"
    )


VectorSource = Union[list[float], FileVector, SavedVector]


# --- ops -----------------------------------------------------------------------------------


class _SiteOp(_Strict):
    site: str = Field(min_length=1, description="canonical site ('resid_post.5') or module path")
    positions: Positions = Field("all", description="token positions the op acts on")


class SaveOp(_SiteOp):
    """Keep the value of a site in the results."""

    op: Literal["save"]
    name: str | None = Field(None, description="result name; default '<invoke>/<site>'")


class ZeroOp(_SiteOp):
    """Set the site to zero at the chosen positions."""

    op: Literal["zero"]


class ScaleOp(_SiteOp):
    """Multiply the site by a factor."""

    op: Literal["scale"]
    factor: Number


class AddOp(_SiteOp):
    """Add a vector (inline, from a file, or a saved value) times a coefficient."""

    op: Literal["add"]
    vector: VectorSource
    coeff: Number = 1.0


class SetOp(_SiteOp):
    """Replace the site with a value (inline, from a file, or a saved value)."""

    op: Literal["set"]
    value: VectorSource


class PatchOp(_SiteOp):
    """Replace the site with the same site's value in another invoke."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    op: Literal["patch"]
    from_: str = Field(alias="from", description="the invoke to copy from")
    source_positions: Positions | None = Field(
        None, description="positions in the source prompt; default: the same selectors"
    )


Op = Annotated[Union[SaveOp, ZeroOp, ScaleOp, AddOp, SetOp, PatchOp], Field(discriminator="op")]
OP_CLASSES: dict[str, type[_SiteOp]] = {
    "save": SaveOp,
    "zero": ZeroOp,
    "scale": ScaleOp,
    "add": AddOp,
    "set": SetOp,
    "patch": PatchOp,
}
OP_NAMES = tuple(OP_CLASSES)


# --- invokes, sweeps -----------------------------------------------------------------------

SweepValues = Union[
    Literal["all"],
    Annotated[str, Field(pattern=r"^-?\d*:-?\d*(:-?\d+)?$", description="a range 'start:stop[:step]'")],
    Annotated[list[Union[int, float]], Field(min_length=1)],
]


class Invoke(_Strict):
    """A named group of prompts run together, with the ops that act on them."""

    prompt: Union[Annotated[str, Field(min_length=1)], Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]]
    ops: list[Op] = Field(default_factory=list)
    sweep: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], SweepValues] | None = Field(
        None, description="grid of variables; each cell becomes batch rows with its own ops"
    )

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


# --- metrics -------------------------------------------------------------------------------

TokenRef = Union[Annotated[str, Field(min_length=1)], Annotated[int, Field(ge=0)]]


class _MetricBase(_Strict):
    invoke: str = Field(description="the invoke whose output is measured")
    position: PositionSelector = Field("last", description="the position whose next-token output is read")


class _TokenMetric(_MetricBase):
    token: TokenRef | None = None
    tokens: list[TokenRef] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> _TokenMetric:
        if (self.token is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'token' (one token) or 'tokens' (a list)")
        return self


class LogitsMetric(_TokenMetric):
    kind: Literal["logits"]


class LogprobMetric(_TokenMetric):
    kind: Literal["logprob"]


class ProbMetric(_TokenMetric):
    kind: Literal["prob"]


class LogitDiffMetric(_MetricBase):
    kind: Literal["logit_diff"]
    target: TokenRef
    foil: TokenRef


class TopKMetric(_MetricBase):
    kind: Literal["top_k"]
    k: int = Field(10, ge=1, le=1000)


Metric = Annotated[
    Union[LogitsMetric, LogprobMetric, ProbMetric, LogitDiffMetric, TopKMetric], Field(discriminator="kind")
]
METRIC_CLASSES: dict[str, type[_MetricBase]] = {
    "logits": LogitsMetric,
    "logprob": LogprobMetric,
    "prob": ProbMetric,
    "logit_diff": LogitDiffMetric,
    "top_k": TopKMetric,
}
METRIC_KINDS = tuple(METRIC_CLASSES)


# --- model, spec ---------------------------------------------------------------------------


class ModelRef(_Strict):
    """Which model to run and how. A bare string is the same as ``{id: ...}``."""

    id: str = Field(min_length=1, description="'smollm2-135m', 'tiny-llama', a Hugging Face id or a folder")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    revision: str | None = None
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    seed: int = Field(0, description="seed of tiny random models")


Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class Spec(_Strict):
    """A whole experiment."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="specsight spec v1")

    specsight: Literal[1] = Field(description="spec format version")
    name: str | None = None
    description: str | None = None
    model: ModelRef
    invokes: dict[Name, Invoke] = Field(min_length=1)
    metrics: dict[Name, Metric] = Field(default_factory=dict)

    @field_validator("model", mode="before")
    @classmethod
    def _model_string(cls, value: Any) -> Any:
        return {"id": value} if isinstance(value, str) else value


def json_schema() -> dict[str, Any]:
    """The JSON Schema of spec v1 (what ``schemas/spec.v1.json`` holds)."""
    schema = Spec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://specsight.dev/schemas/spec.v1.json"
    # A bare model string is accepted too.
    schema["properties"]["model"] = {"anyOf": [{"type": "string", "minLength": 1}, {"$ref": "#/$defs/ModelRef"}]}
    return schema


# --- validation with located errors --------------------------------------------------------


def _child(node: Any, key: Any) -> tuple[bool, Any]:
    if isinstance(node, dict) and key in node:
        return True, node[key]
    if isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
        return True, node[key]
    return False, None


def _data_path(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Keep only the parts of a pydantic loc that exist in the data (drops union branch tags)."""
    path: list[Any] = []
    node = data
    for part in loc:
        found, child = _child(node, part)
        if found:
            path.append(part)
            node = child
    return tuple(path)


def _model_at(path: tuple[Any, ...], data: Any) -> type[BaseModel] | None:
    """The pydantic class that validates the mapping at ``path`` (for did-you-mean on keys)."""
    cls: type[BaseModel] | None = Spec
    node = data
    i = 0
    while i < len(path) and cls is not None:
        part = path[i]
        _, node_child = _child(node, part)
        if cls is Spec and part == "invokes" and i + 1 < len(path):
            cls, i = Invoke, i + 2
            node = _child(node_child, path[i - 1])[1]
            continue
        if cls is Spec and part == "metrics" and i + 1 < len(path):
            metric = _child(node_child, path[i + 1])[1]
            kind = metric.get("kind") if isinstance(metric, dict) else None
            cls, i, node = METRIC_CLASSES.get(kind), i + 2, metric
            continue
        if cls is Spec and part == "model":
            cls, i, node = ModelRef, i + 1, node_child
            continue
        if cls is Invoke and part == "ops" and i + 1 < len(path):
            op = _child(node_child, path[i + 1])[1]
            name = op.get("op") if isinstance(op, dict) else None
            cls, i, node = OP_CLASSES.get(name), i + 2, op
            continue
        if part == "positions" or part == "source_positions" or part == "position":
            cls = TokenSelector
            node = node_child
            i += 1
            while i < len(path) and isinstance(path[i], int):
                node = _child(node, path[i])[1]
                i += 1
            continue
        if part in ("vector", "value"):
            cls = SavedVector if isinstance(node_child, dict) and "saved" in node_child else FileVector
            i, node = i + 1, node_child
            continue
        return None
    return cls


def _keys_of(cls: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in cls.model_fields.items()]


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _issue_for(err: dict[str, Any], data: Any) -> tuple[tuple[Any, ...], Issue, bool]:
    """Translate one pydantic error; returns (path, issue, positioned at the key?)."""
    loc = tuple(err["loc"])
    kind = err["type"]
    path = _data_path(loc, data)
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "extra_forbidden":
        key = loc[-1]
        cls = _model_at(path[:-1], data)
        hint = did_you_mean(str(key), _keys_of(cls)) if cls else None
        if hint is None and cls is not None:
            hint = "allowed keys: " + ", ".join(_keys_of(cls))
        return path, Issue("unknown-key", f"unknown key '{key}'", path, hint=hint), True
    if kind == "missing":
        key = loc[-1]
        return path, Issue("missing-key", f"missing required key '{key}'", path), False
    if kind == "union_tag_invalid":
        tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        field = "op" if "save" in tags else "kind"
        tag = ctx.get("tag")
        code = "unknown-op" if field == "op" else "unknown-metric"
        hint = did_you_mean(str(tag), tags) or "one of: " + ", ".join(tags)
        return path + (field,), Issue(code, f"unknown {field} '{tag}'", path + (field,), hint=hint), False
    if kind == "union_tag_not_found":
        field = "op" if path and "ops" in path else "kind"
        return path, Issue("missing-key", f"missing required key '{field}'", path), False
    if kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        options = re.findall(r"'([^']*)'|(\d+)", expected)
        names = [a or b for a, b in options]
        hint = did_you_mean(str(value), names) if isinstance(value, str) else None
        return path, Issue("bad-value", f"invalid value {_describe(value)}: expected {expected}", path, hint=hint), False
    message = err["msg"]
    message = message[0].lower() + message[1:] if message else message
    message = message.replace("Value error, ", "").replace("value error, ", "")
    return path, Issue("bad-value", f"invalid value {_describe(value)}: {message}", path), False


def validate_spec(doc: LoadedDoc) -> Spec:
    """Validate loaded data into a :class:`Spec`, or raise one SpecError with every problem."""
    data = doc.data
    if isinstance(data, dict) and "specsight" in data and data["specsight"] != SPEC_VERSION:
        line, col = doc.source.locate(("specsight",))
        raise SpecError(
            Issue(
                "version",
                f"this is spec format version {_describe(data['specsight'])}; this specsight reads version {SPEC_VERSION}",
                ("specsight",),
                doc.file,
                line,
                col,
                hint="upgrade specsight, or write 'specsight: 1'",
            )
        )
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        grouped: dict[tuple[Any, ...], list[tuple[Issue, bool]]] = {}
        for err in exc.errors(include_url=False):
            path, issue, at_key = _issue_for(err, data)
            grouped.setdefault((path, issue.code, issue.message if issue.code != "bad-value" else ""), []).append(
                (issue, at_key)
            )
        issues = []
        for group in grouped.values():
            issue, at_key = group[0]
            if len(group) > 1 and issue.code == "bad-value":
                reasons = []
                for other, _ in group:
                    reason = other.message.split(": ", 1)[-1]
                    if reason not in reasons:
                        reasons.append(reason)
                issue = Issue(
                    issue.code,
                    issue.message.split(": ", 1)[0] + ": " + "; or ".join(reasons),
                    issue.path,
                    hint=issue.hint,
                )
            line, col = doc.source.locate(issue.path, key=at_key)
            issues.append(issue.located(doc.file, line, col))
        issues.sort(key=lambda i: (i.line or 0, i.col or 0))
        raise SpecError(issues) from None
