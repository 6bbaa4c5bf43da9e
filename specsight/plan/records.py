"""The records a plan is made of, as frozen, JSON-serialisable dataclasses: rows (one sequence
in a batch), forwards (batched passes), the bases of ops and metrics (their kinds live in
:mod:`.ops` and :mod:`.metrics`), saved results, expectations, and what the plan says about
each invoke and the dataset.

Rows are the unit of batching: one prompt of one invoke in one sweep cell. Forwards group rows;
stages order forwards so that every value a row reads (another invoke's activation, a saved
value) was produced by an earlier stage. Every reference is typed (:mod:`.refs`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .codec import KindBase
from .refs import InputKey, InvokeRef, ResultRef, RowRef, Rows, SaeRef, StoreKey

__all__ = [
    "Row",
    "Generation",
    "Forward",
    "Reduce",
    "InvokeInfo",
    "DatasetInfo",
    "InputTensor",
    "SaeInfo",
    "Op",
    "site_fields",
    "Metric",
    "PlanSave",
    "PlanExpectation",
]


@dataclass(frozen=True, kw_only=True)
class Row:
    """One sequence in a batch."""

    invoke: InvokeRef
    prompt_index: int
    cell: int  # index into the invoke's sweep grid (0 when not swept)
    tokens: tuple[int, ...]  # placeholders (zeros) for image and tensor inputs
    #: image and tensor inputs: the key of this row's input in ``Plan.inputs``
    input: InputKey | None = None

    @property
    def identity(self) -> tuple[tuple[int, ...], str | None]:
        """What the model sees of this row before any op: equal identities, equal activations."""
        return self.tokens, self.input


@dataclass(frozen=True, kw_only=True)
class Generation:
    """How a generating forward decodes: greedy, or sampled with a seed."""

    max_new_tokens: int
    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class Forward:
    """One batched forward pass."""

    stage: int
    rows: Rows
    seq_len: int
    #: the first ``shared_prefix`` layers see identical rows: they run once, on one row, and
    #: the hidden state is copied to every row at the input of layer ``shared_prefix``
    shared_prefix: int = 0
    #: positions whose logits are needed (None: all, e.g. when an op reads the logits site)
    keep_logits: tuple[int, ...] | None = None
    #: generation (None: one forward)
    generate: Generation | None = None
    #: rows of identical tokens, untouched before this position: only positions from here on
    #: run, attending to the untouched run's keys and values of the earlier ones (0: all run)
    position_start: int = 0
    #: rows of one token length, of any sequences: layers below ``shared_prefix`` run on one
    #: row only (layer ``shared_prefix``'s input comes from each row's untouched run,
    #: positions from ``position_start`` on), nor do positions before ``position_start`` run
    #: (their keys and values come from the untouched run too)
    from_base: bool = False


@dataclass(frozen=True, kw_only=True)
class Reduce:
    """An aggregate of a metric over one of its axes."""

    over: str
    axis: int
    size: int
    stat: str  # mean, median, sum
    ci: bool
    level: float
    n_boot: int
    seed: int


@dataclass(frozen=True, kw_only=True)
class InvokeInfo:
    """What the plan knows of an invoke: its inputs, stage and result axes."""

    prompts: int
    tokens: tuple[int, ...]  # each input's token count
    stage: int
    cells: int
    #: sweep axes, in grid order
    axes: tuple[str, ...] = ()
    #: the values along each axis of the invoke's results (sweep axes and the input axis)
    axis_values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    #: labels of axis values where a number alone says little (``9: Mary``)
    axis_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: image and tensor inputs: a name to show for each input (None: prompts)
    inputs: tuple[str, ...] | None = None

    @property
    def grid(self) -> tuple[int, ...]:
        """The sweep grid's shape."""
        return tuple(len(self.axis_values[axis]) for axis in self.axes)


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """The dataset rows came from, as the manifest records it."""

    file: str | None
    sha256: str
    rows: int
    columns: tuple[str, ...]
    used: int
    sample: tuple[int, ...] | None
    invokes: tuple[InvokeRef, ...] = ()


@dataclass(frozen=True, kw_only=True)
class InputTensor:
    """An image or tensor input of a row, flattened."""

    shape: tuple[int, ...]
    dtype: str  # float32 or int64
    values: tuple[Any, ...]


@dataclass(frozen=True, kw_only=True)
class SaeInfo:
    """A sparse autoencoder (SAELens's folder format) that reads one site of the model: where
    its weights are (``folder``, a local or server-side path; ``id``: the registered name it
    came from) and how it encodes (:mod:`specsight.engine.sae`)."""

    folder: str
    id: str | None
    architecture: str  # standard | topk | jumprelu
    d_in: int
    d_sae: int
    d_out: int | None = None  # transcoders: the width of the value they stand in for
    k: int | None = None  # topk: features kept per position
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    #: the site the dictionary reads (and writes back to)
    site: str
    module: str
    io: str
    layer: int | None = None
    #: transcoders: the site whose value the decoder stands in for (None: an autoencoder),
    #: and whether that value keeps its error term (else the decoder's output replaces it)
    out_site: str | None = None
    out_module: str | None = None
    out_io: str | None = None
    keep_error: bool = True

    @property
    def transcoder(self) -> bool:
        return self.d_out is not None


@dataclass(frozen=True, kw_only=True)
class Op(KindBase):
    """One op acting on one row at one site; each kind (:mod:`.ops`) adds what it needs.

    ``io`` is ``input``, ``output`` or ``pattern`` (the attention weights a module returns,
    read as [batch, query, head, key]).
    """

    site: str
    module: str
    io: str
    row: RowRef
    positions: tuple[int, ...]
    origin: str = ""  # the op's path in the spec, for run-time errors
    layer: int | None = None  # the layer the site sits in, when it does
    #: a window of the site's last dimension: column ranges (start, stop) the op reads and
    #: writes, e.g. some heads of a fused projection (None: the whole width). For ``pattern``
    #: sites (io) they index the head axis.
    cols: tuple[tuple[int, int], ...] | None = None
    #: generating invokes: the forward steps the op applies to (0: the prompt pass, at
    #: ``positions``; s >= 1: the new token only). None: not a generating invoke
    steps: tuple[int, ...] | None = None
    #: SAE sites: the dictionary (``Plan.saes``) and its part (features, error, recon) the op
    #: acts on; ``module`` and ``io`` are then the site the dictionary reads
    sae: SaeRef | None = None
    part: str | None = None

    #: whether the op changes its site (a site whose ops only read it is not copied)
    writes: ClassVar[bool] = True
    #: whether ops of the kind on different columns of one width still batch (each its own
    #: columns in the indexed write: a feature sweep's zeros)
    mixed_cols: ClassVar[bool] = False

    @property
    def hook_site(self) -> tuple[str, str, SaeRef | None, str | None]:
        """Where the engine applies the op: the module's io, or a part of an SAE reading it."""
        return self.module, self.io, self.sae, self.part

    @property
    def label(self) -> str:
        """How ``specsight plan`` counts the op."""
        return self.kind

    def stores(self) -> StoreKey | None:
        """The store key the op writes its value to (None: it stores nothing)."""
        return None

    def reads(self) -> tuple[StoreKey, ...]:
        """The store keys the op reads."""
        return ()

    # --- at run time (the engine's services come as ``env``: see ``ops.env``) ---------------

    @classmethod
    def batchable(cls, ops: list[Any], env: Any) -> bool:
        """Whether these ops (of this kind, on the same columns of one site) apply as one
        indexed write (:meth:`prepare`, :meth:`write`) rather than one by one (:meth:`apply`)."""
        return False

    @classmethod
    def prepare(cls, group: Any, env: Any) -> None:
        """Fill in what a batched write of ``group.ops`` needs (``group.values``,
        ``group.factors``), before the forward runs."""

    @classmethod
    def write(cls, hidden: Any, group: Any, env: Any) -> None:
        """Apply a group of ops at once (``group.index`` picks their rows and positions)."""
        raise NotImplementedError(f"{cls.kind} ops apply one by one")

    def apply(self, hidden: Any, at: Any, env: Any) -> None:
        """Apply this op to the site's tensor ``hidden`` at ``at``."""
        raise NotImplementedError(f"{self.kind} ops apply in groups")


def site_fields(site: Any) -> dict[str, Any]:
    """The fields of an op at a resolved site (:class:`~specsight.sites.Site`): its name,
    module, io and layer, and the SAE part it is, if one."""
    sae = None if site.sae is None else SaeRef(site.sae)
    return dict(
        site=site.name, module=site.module, io=site.io, layer=site.layer, sae=sae, part=site.part
    )


@dataclass(frozen=True, kw_only=True)
class Metric(KindBase):
    """A metric of the run; each kind (:mod:`.metrics`) says what it reads and how."""

    name: ResultRef
    invoke: InvokeRef
    axes: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()
    #: an aggregate over one of ``axes`` (None: the metric keeps every row's value)
    reduce: Reduce | None = None

    #: how the summary and the report show the metric: values (tables, heatmaps), tokens
    #: (each cell's top tokens), lens (a table of sites)
    view: ClassVar[str] = "values"
    #: whether values are signed (heatmaps centred on 0)
    signed: ClassVar[bool] = False
    #: the value the summary's "strongest cells" measure from (None: the baseline metric's)
    center: ClassVar[float | None] = None
    #: tensors stored beside the metric: ``<name>/<companion>``
    companions: ClassVar[tuple[str, ...]] = ()
    #: axes after :meth:`suffix` that claims cannot pick from: those of the metric's tensor
    #: (a top_k's k), and those its companions add beyond it (a logit lens's top k per site)
    trailing: ClassVar[tuple[str, ...]] = ()
    companion_trailing: ClassVar[tuple[str, ...]] = ()
    #: companions with one value per row of the metric: reduced (the same statistic) when the
    #: metric is, their per-item values kept as ``<name>/<companion>/items``
    reduced_companions: ClassVar[tuple[str, ...]] = ()
    #: whether each row's value is read from its forward's logits into the metric's result
    #: (:meth:`read`); the others are computed after the run (:meth:`finish`)
    buffered: ClassVar[bool] = False
    #: what the reduction averages: items (the values), or means (a recovery of means)
    reduces: ClassVar[str] = "items"
    #: its values rank the vocabulary (top tokens, ids in ``<name>/ids``): claims may name a
    #: token that is the top one (argmax) or among them (top_k)
    ranks_tokens: ClassVar[bool] = False

    @property
    def result_axes(self) -> tuple[str, ...]:
        """``axes`` as the result has them: without the reduced axis."""
        if self.reduce is None:
            return self.axes
        return tuple(a for i, a in enumerate(self.axes) if i != self.reduce.axis)

    def suffix(self) -> tuple[str, ...]:
        """The axes a row's value adds after :attr:`result_axes`."""
        return ()

    def suffix_values(self, axis: str) -> list[Any] | None:
        """The values along one of :meth:`suffix`'s axes."""
        return None

    def manifest_extra(self) -> dict[str, Any]:
        """What the manifest records of the metric beyond its values (a probe's classes)."""
        return {}

    def companion_axes(self, companion: str, axes: list[str]) -> list[str]:
        """The axes of ``<name>/<companion>``, given the metric's own (``axes``)."""
        return axes + list(self.companion_trailing)

    def token_checks(self) -> dict[str, str]:
        """The token checks a claim may make (argmax, top_k), each with where the ids are
        found: ``ids`` (the ``/ids`` companion's top tokens), ``tokens`` (the metric's own)."""
        return {"argmax": "ids", "top_k": "ids"} if self.ranks_tokens else {}

    def label(self) -> str | None:
        """What the summary says a single value is (``prob of ' Paris'``), if anything."""
        return None

    def logit_reads(self) -> Iterator[tuple[int, int]]:
        """The (row, position) pairs whose logits the metric reads."""
        return iter(())

    def reference_reads(self) -> Iterator[tuple[int, int]]:
        """The (row, position) pairs whose next-token distributions it compares with."""
        return iter(())

    def inputs(self) -> tuple[ResultRef, ...]:
        """The metrics it is computed from (after them)."""
        return ()

    def stored_reads(self) -> tuple[StoreKey, ...]:
        """The stored values it reads after the run."""
        return ()

    def explain(self, plan: Any) -> str:
        """The line ``specsight plan`` shows for the metric."""
        raise NotImplementedError

    def finish(self, after: Any) -> dict[str, Any]:
        """Its result tensors, computed after the run (``after``: see ``metrics.base``);
        kinds read from the logits (:attr:`buffered`) have none."""
        return {}


@dataclass(frozen=True, kw_only=True)
class PlanSave:
    """A saved site value assembled from per-row pieces into one tensor."""

    name: ResultRef
    invoke: InvokeRef
    site: str
    keys: tuple[StoreKey, ...]  # store keys, row-major over ``axes``
    n_positions: tuple[int, ...]
    axes: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()
    #: the axes of each row's value after ``axes``: ("pos", "hidden"); head sites
    #: ("pos", "head", "head_dim"); attention patterns ("query", "head", "key")
    value_axes: tuple[str, ...] = ("pos", "hidden")
    #: the values along value axes that are the same in every row: the selected positions,
    #: the selected heads
    value_axis_values: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: where rows select different positions (a per-item token, a column's positions): each
    #: row's positions, row-major over ``axes`` (empty when every row shares them)
    row_positions: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True, kw_only=True)
class PlanExpectation:
    """An ``expect:`` entry resolved against the plan: which tensor, which cells, which check."""

    index: int
    target: ResultRef  # the result tensor's name
    target_kind: str  # "metric" or "saved"
    axes: tuple[str, ...]  # the tensor's axes
    select: tuple[tuple[int, ...] | None, ...]  # per leading axis: chosen indices, None = all
    over: str
    checks: dict[str, Any] = field(default_factory=dict)
    #: argmax / top_k: the token, and where its id is found ("ids": the ``/ids`` companion's
    #: top tokens; "tokens": the metric's own tokens, at ``token_index``)
    token_id: int | None = None
    token_str: str | None = None
    token_index: int | None = None
    token_source: str | None = None
    location: str = ""
    message: str | None = None
