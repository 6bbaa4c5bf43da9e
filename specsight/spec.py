"""Spec v1: the pydantic models of an experiment file.

A spec names a model, *invokes* (named prompt groups batched into forwards), *ops* on model
sites inside each invoke, optional *sweeps* that expand an invoke into many cells, and *metrics*
computed on the output. Models are frozen and reject unknown keys. :func:`validate_spec` turns
loaded data into a :class:`Spec` or a :class:`~specsight.errors.SpecError` listing every problem
with its file position and path.

Placeholders ``{name}`` in op fields refer to sweep variables (``{layer}``, ``{pos}``, ...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

from ._spec_base import (  # noqa: F401 - re-exported
    NAME_PATTERN,
    PLACEHOLDER_PATTERN,
    SPEC_VERSION,
    Number,
    Placeholder,
    Positions,
    PositionSelector,
    TokenRef,
    TokenSelector,
    _Strict,
)
from ._spec_metrics import (  # noqa: F401 - re-exported
    METRIC_CLASSES,
    METRIC_KINDS,
    AttributionMetric,
    Backward,
    Expectation,
    LogitDiffMetric,
    LogitLensMetric,
    LogitsMetric,
    LogprobMetric,
    Metric,
    ProbMetric,
    RecoveryMetric,
    TopKMetric,
)
from .load import LoadedDoc

__all__ = [
    "SPEC_VERSION",
    "Spec",
    "ModelRef",
    "Invoke",
    "INPUT_KINDS",
    "Op",
    "Metric",
    "OP_NAMES",
    "METRIC_KINDS",
    "validate_spec",
    "json_schema",
]

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


class FileTensor(FileVector):
    """Input tensors in a .safetensors or .npy file beside the spec, batch axis first: one row
    per item (models built by a ``factory``)."""


# --- ops -----------------------------------------------------------------------------------


HeadIndex = Union[int, Placeholder]
HeadSelector = Union[Literal["all"], HeadIndex, Annotated[list[HeadIndex], Field(min_length=1)]]


StepSelector = Union[
    Literal["prompt", "all"],
    Annotated[str, Field(pattern=r"^\d*:\d*$", description="a range of steps 'start:stop'")],
    Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)],
]


class _SiteOp(_Strict):
    site: str = Field(min_length=1, description="canonical site ('resid_post.5') or module path")
    positions: Positions = Field("all", description="token positions the op acts on")
    steps: StepSelector | None = Field(
        None,
        description="generating invokes only: the forward steps the op applies to; step 0 is "
        "the prompt pass ('prompt'), step s >= 1 feeds new token s-1; 'all' (default), a list "
        "or a range 'a:b'. In steps >= 1 the only position is the new token: positions "
        "'all', 'last' and -1 select it, other positions exist only in the prompt pass",
    )
    heads: HeadSelector | None = Field(
        None,
        description="attention heads of a per-head site (head_z, q, k, v, attn_pattern): "
        "'all', an index, a list, or '{head}'; default all heads",
    )


class SaveOp(_SiteOp):
    """Keep the value of a site in the results."""

    op: Literal["save"]
    name: str | None = Field(
        None, description="result name; default '<invoke>/<site>' ('<invoke>/<site>/grad')"
    )
    grad: bool = Field(
        False,
        description="keep the gradient of the spec's 'backward' metric with respect to the "
        "site instead of its value",
    )


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


Op = Annotated[SaveOp | ZeroOp | ScaleOp | AddOp | SetOp | PatchOp, Field(discriminator="op")]
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
    Annotated[
        str, Field(pattern=r"^-?\d*:-?\d*(:-?\d+)?$", description="a range 'start:stop[:step]'")
    ],
    Annotated[list[int | float], Field(min_length=1)],
]


class Sampling(_Strict):
    """Seeded sampling: temperature and nucleus (top-p) sampling over the whole vocabulary."""

    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the sampler")


class Generate(_Strict):
    """Generate new tokens after each prompt (KV cache); ops choose their ``steps``."""

    max_new_tokens: int = Field(ge=1, le=4096)
    sampling: Literal["greedy"] | Sampling = Field(
        "greedy", description="'greedy' or {temperature, top_p, seed}"
    )


class Invoke(_Strict):
    """A named group of inputs run together, with the ops that act on them.

    Text models take ``prompt``; image models (ViT) take ``image``, files beside the spec;
    models built by a ``factory`` take ``input``, a tensor file whose first axis is the batch.
    """

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | None
    ) = None
    image: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | None
    ) = Field(None, description="image models: image file(s) (PNG, JPEG, ...) beside the spec")
    input: FileTensor | None = Field(
        None, description="factory models: a tensor file beside the spec, batch axis first"
    )
    ops: list[Op] = Field(default_factory=list)
    sweep: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], SweepValues] | None = (
        Field(None, description="grid of variables; each cell becomes batch rows with its own ops")
    )

    sweep_mode: Literal["product", "zip"] = Field(
        "product", description="cells: every combination of the values, or the values side by side"
    )
    generate: Generate | None = Field(
        None, description="generate new tokens; results hold '<invoke>/generated_ids' and text"
    )

    @model_validator(mode="after")
    def _one_input(self) -> Invoke:
        given = [k for k in INPUT_KINDS if getattr(self, k) is not None]
        if not given:
            raise ValueError(
                "missing required key 'prompt' | text models take 'prompt', image models "
                "'image' (files beside the spec), factory models 'input' (a tensor file)"
            )
        if len(given) > 1:
            raise ValueError(
                f"{' and '.join(repr(k) for k in given)} are both given | keep one: 'prompt' "
                "for text, 'image' for image models, 'input' for factory models"
            )
        return self

    @property
    def input_kind(self) -> str:
        """``prompt``, ``image`` or ``input``."""
        return next(k for k in INPUT_KINDS if getattr(self, k) is not None)

    @property
    def prompts(self) -> list[str]:
        """The text prompts (empty for image and tensor inputs)."""
        if self.prompt is None:
            return []
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def many_inputs(self) -> bool:
        """Whether results get a ``prompt`` axis: a list of prompts or images, or a tensor
        file (whose first axis is the batch)."""
        return isinstance(self.prompt, list) or isinstance(self.image, list) or bool(self.input)

    @property
    def images(self) -> list[str]:
        if self.image is None:
            return []
        return [self.image] if isinstance(self.image, str) else list(self.image)


INPUT_KINDS = ("prompt", "image", "input")


# --- model, spec ---------------------------------------------------------------------------


class ModelRef(_Strict):
    """Which model to run and how. A bare string is the same as ``{id: ...}``.

    ``factory`` builds any ``torch.nn.Module`` by calling ``package.module:function`` with
    ``args`` (local runs only; a module beside the spec is importable). Such models have no
    canonical sites or vocabulary: ops name raw module paths and invokes give ``input`` tensors.
    """

    id: str | None = Field(
        None,
        min_length=1,
        description="'smollm2-135m', 'tiny-llama', a Hugging Face id or a folder",
    )
    factory: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        description="'package.module:function' returning a torch.nn.Module (local runs only)",
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the factory function"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    revision: str | None = None
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    seed: int = Field(
        0, ge=0, le=2**63 - 1, description="seed of tiny random models and of factory calls"
    )

    @model_validator(mode="after")
    def _id_or_factory(self) -> ModelRef:
        if self.id is None and self.factory is None:
            raise ValueError(
                "missing required key 'id' | add 'id:' (a model name, Hugging Face id or "
                "folder), or 'factory: package.module:function' for any torch module"
            )
        if self.id is not None and self.factory is not None:
            raise ValueError("'id' and 'factory' are both given | keep one of them")
        if self.factory is None and self.args:
            raise ValueError("'args' go with 'factory' | remove 'args', or use 'factory'")
        if self.factory is not None and (self.revision or self.attn_implementation):
            raise ValueError(
                "'revision' and 'attn_implementation' apply to model ids | remove them"
            )
        return self

    @property
    def name(self) -> str:
        """The model's name in results: its id, or ``factory:package.module:function``."""
        return self.id if self.id is not None else f"factory:{self.factory}"


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
    backward: Backward | None = Field(
        None,
        description="run a backward pass from this metric; saves with grad: true keep gradients",
    )
    expect: list[Expectation] = Field(
        default_factory=list, description="claims checked after the run"
    )
    deterministic: bool = Field(
        False, description="use torch's deterministic algorithms and fixed seeds for this run"
    )
    seed: int = Field(
        0, ge=0, le=2**63 - 1, description="seed set before running (sampling, noise)"
    )

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
    schema["properties"]["model"] = {
        "anyOf": [{"type": "string", "minLength": 1}, {"$ref": "#/$defs/ModelRef"}]
    }
    _close_pattern_objects(schema)
    return schema


def _close_pattern_objects(node: Any) -> None:
    """Name-keyed mappings (invokes, metrics, sweep) accept only names matching their pattern."""
    if isinstance(node, dict):
        if "patternProperties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close_pattern_objects(value)
    elif isinstance(node, list):
        for value in node:
            _close_pattern_objects(value)


def validate_spec(doc: LoadedDoc) -> Spec:
    """Validate loaded data into a :class:`Spec`, or raise one SpecError with every problem."""
    from ._validate import validate_spec as _validate

    return _validate(doc)
