"""Spec v1: the whole experiment file as pydantic models.

A spec names a model, *invokes* (named input groups batched into forwards) with their ops and
optional *sweeps* that expand an invoke into many cells, *metrics* computed on the output, an
optional backward pass and *expectations*. Models are frozen and reject unknown keys; loaded
data becomes a :class:`Spec` through :func:`specsight.spec.validate_spec`, which reports every
problem with its file position and path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from .base import NAME_PATTERN, StrictModel
from .claims import Backward, Expectation
from .metrics import METRIC_KINDS, Metric
from .ops import OP_NAMES, FileVector, Op
from .saes import SaeEntry
from .source import LoadedDoc

__all__ = [
    "INPUT_KINDS",
    "Dataset",
    "Sample",
    "FileTensor",
    "SweepValues",
    "Sampling",
    "Generate",
    "Invoke",
    "ModelRef",
    "Spec",
    "json_schema",
]


class FileTensor(FileVector):
    """Input tensors in a .safetensors or .npy file beside the spec, batch axis first: one row
    per item (models built by a ``factory``)."""


# --- invokes, sweeps -----------------------------------------------------------------------

SweepValues = Union[
    Literal["all"],
    Annotated[
        str, Field(pattern=r"^-?\d*:-?\d*(:-?\d+)?$", description="a range 'start:stop[:step]'")
    ],
    Annotated[list[int | float], Field(min_length=1)],
]


class Sampling(StrictModel):
    """Seeded sampling: temperature and nucleus (top-p) sampling over the whole vocabulary."""

    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the sampler")


class Generate(StrictModel):
    """Generate new tokens after each prompt (KV cache); ops choose their ``steps``."""

    max_new_tokens: int = Field(ge=1, le=4096)
    sampling: Literal["greedy"] | Sampling = Field(
        "greedy", description="'greedy' or {temperature, top_p, seed}"
    )


class Invoke(StrictModel):
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
    ops: list[Op] = Field(
        default_factory=list,
        description="what the invoke does at model sites, in order; op: " + ", ".join(OP_NAMES),
    )
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


# --- datasets ------------------------------------------------------------------------------

Cell = Union[str, int, float, bool, None]


class Sample(StrictModel):
    """A reproducible subset of a dataset's rows: ``n`` of them, drawn with ``seed``."""

    n: int = Field(ge=1, description="how many rows")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the draw")


class Dataset(StrictModel):
    """Rows whose columns invokes and metrics use as templates: ``prompt: "{clean}"``,
    ``target: "{io}"``, ``positions: {token: "{s}"}``. An invoke whose prompt names a column
    runs once per row (its results get an ``item`` axis)."""

    file: str | None = Field(
        None, min_length=1, description="a .jsonl or .csv file beside the spec, one row a line"
    )
    rows: Annotated[list[dict[str, Cell]], Field(min_length=1)] | None = Field(
        None, description="the rows inline"
    )
    sample: Sample | None = Field(None, description="use a seeded subset of the rows")

    @model_validator(mode="before")
    @classmethod
    def _inline_list(cls, value: Any) -> Any:
        return {"rows": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _file_or_rows(self) -> Dataset:
        if (self.file is None) == (self.rows is None):
            raise ValueError(
                "give exactly one of 'file' (a .jsonl or .csv file beside the spec) or 'rows' "
                "| e.g. dataset: {file: data/ioi.jsonl}"
            )
        return self


# --- model, spec ---------------------------------------------------------------------------


class ModelRef(StrictModel):
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
    device_map: (
        Literal["auto", "balanced", "balanced_low_0", "sequential"]
        | dict[Annotated[str, Field(min_length=1)], str | int]
        | None
    ) = Field(
        None,
        description="place the model across devices with accelerate, as from_pretrained does: "
        "'auto', 'balanced', 'sequential', or {module prefix: device} with devices 'cpu', "
        "'disk', 'cuda:N' or a GPU index N (models with a checkpoint folder)",
    )
    max_memory: dict[Annotated[str, Field(min_length=1)], str | int] | None = Field(
        None,
        description="memory each device may hold for device_map 'auto'/'balanced'/'sequential': "
        "{'0': '20GiB', 'cpu': '64GiB'}",
    )
    offload_folder: str | None = Field(
        None,
        min_length=1,
        description="a folder for modules placed on 'disk' (beside the spec; local runs only)",
    )

    @model_validator(mode="after")
    def _placement(self) -> ModelRef:
        if self.device_map is None and (self.max_memory or self.offload_folder):
            raise ValueError(
                "'max_memory' and 'offload_folder' go with 'device_map' | add device_map: auto"
            )
        if self.device_map is not None and self.device != "auto":
            raise ValueError(
                "'device' and 'device_map' both place the model | keep one (device_map: "
                "{'': cuda:1} puts all of it on one device)"
            )
        if self.device_map is not None and self.factory is not None:
            raise ValueError("'device_map' needs a model id with a checkpoint | remove it")
        return self

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


class Spec(StrictModel):
    """A whole experiment."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, title="specsight spec v1"
    )
    #: the document the spec was loaded from (file positions for later errors); None for a
    #: spec built in Python
    _document: LoadedDoc | None = PrivateAttr(None)

    @property
    def document(self) -> LoadedDoc | None:
        """The document this spec was loaded from (None: built in Python)."""
        return self._document

    schema_: str | None = Field(
        None,
        alias="$schema",
        description="the JSON schema this file follows, for editors (specsight ignores it)",
    )
    specsight: Literal[1] = Field(description="spec format version")
    name: str | None = None
    description: str | None = None
    model: ModelRef
    dataset: Dataset | None = Field(
        None, description="rows (a file beside the spec, or inline) that invokes template over"
    )
    saes: dict[Name, SaeEntry] = Field(
        default_factory=dict,
        description="sparse autoencoders by name: their sites are sae.NAME.features, "
        "sae.NAME.recon and sae.NAME.error",
    )
    invokes: dict[Name, Invoke] = Field(min_length=1)
    metrics: dict[Name, Metric] = Field(
        default_factory=dict,
        description="measurements by name; kind: " + ", ".join(METRIC_KINDS),
    )
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
    _accept_shorthands(schema)
    _close_pattern_objects(schema)
    return schema


def _accept_shorthands(node: Any) -> None:
    """What the models' before-validators accept, in the schema too: ``reduce: mean`` and a
    dataset given as a bare list of rows."""
    shorthand = {
        "#/$defs/Reduce": {"enum": ["mean", "median", "sum"]},
        "#/$defs/Dataset": {"type": "array", "items": {"type": "object"}, "minItems": 1},
    }
    if isinstance(node, dict):
        options = node.get("anyOf")
        if isinstance(options, list):
            refs = [o.get("$ref") for o in options if isinstance(o, dict)]
            node["anyOf"] = options + [shorthand[r] for r in refs if r in shorthand]
        for value in node.values():
            _accept_shorthands(value)
    elif isinstance(node, list):
        for value in node:
            _accept_shorthands(value)


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
