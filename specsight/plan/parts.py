"""The parts of an execution plan, as frozen, JSON-serialisable dataclasses: rows (one sequence
in a batch), per-row ops with concrete modules and positions, forwards (batched passes), and the
metrics, saves and expectations read out of them.

Rows are the unit of batching: one prompt of one invoke in one sweep cell. Forwards group rows;
stages order forwards so that every value a row reads (another invoke's activation, a saved
value) was produced by an earlier stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Row", "RowOp", "Forward", "PlanMetric", "PlanSave", "PlanExpectation"]


@dataclass(frozen=True)
class Row:
    """One sequence in a batch."""

    invoke: str
    prompt_index: int
    cell: int  # index into the invoke's sweep grid (0 when not swept)
    tokens: tuple[int, ...]  # placeholders (zeros) for image and tensor inputs
    #: image and tensor inputs: the key of this row's input in ``Plan.inputs``
    input: str | None = None

    @property
    def identity(self) -> tuple[tuple[int, ...], str | None]:
        """What the model sees of this row before any op: equal identities, equal activations."""
        return self.tokens, self.input


@dataclass(frozen=True)
class RowOp:
    """One op acting on one row at one site.

    ``kind`` is a spec op (save, zero, scale, add, set, patch), an ablation's run-time form
    (``mean``: the mean of ``sources`` captures, per position or over all; ``noise``: Gaussian
    noise of std ``factor`` (times the empirical std of ``sources``); ``project_out``: the span
    of the plan vectors ``sources`` removed), or ``capture``, the plan's own op that keeps a
    row's whole sequence at a site for patches and ablations. ``io`` is
    ``input``, ``output`` or ``pattern`` (the attention weights a module returns, read as
    [batch, query, head, key]).
    """

    kind: str
    site: str
    module: str
    io: str
    row: int
    positions: tuple[int, ...]
    factor: float | None = None
    vector: str | None = None
    sources: tuple[str, ...] = ()
    source_positions: tuple[int, ...] | None = None
    reduce: str = "none"
    store: str | None = None
    origin: str = ""  # the op's path in the spec, for run-time errors
    layer: int | None = None  # the layer the site sits in, when it does
    #: a window of the site's last dimension: column ranges (start, stop) the op reads and
    #: writes, e.g. some heads of a fused projection (None: the whole width). For ``pattern``
    #: sites (io) they index the head axis.
    cols: tuple[tuple[int, int], ...] | None = None
    #: head sites: saves come back as [positions, heads, head_dim]
    head_dim: int | None = None
    #: generating invokes: the forward steps the op applies to (0: the prompt pass, at
    #: ``positions``; s >= 1: the new token only). None: not a generating invoke
    steps: tuple[int, ...] | None = None
    #: ``noise``: the seed of this row's draw (the same for an item in every cell)
    seed: int | None = None


@dataclass(frozen=True)
class Forward:
    """One batched forward pass."""

    stage: int
    rows: tuple[int, ...]
    seq_len: int
    #: the first ``shared_prefix`` layers see identical rows: they run once, on one row, and
    #: the hidden state is copied to every row at the input of layer ``shared_prefix``
    shared_prefix: int = 0
    #: positions whose logits are needed (None: all, e.g. when an op reads the logits site)
    keep_logits: tuple[int, ...] | None = None
    #: generation: {max_new_tokens, do_sample, temperature, top_p, seed} (None: one forward)
    generate: dict[str, Any] | None = None
    #: rows of identical tokens, untouched before this position: only positions from here on
    #: run, attending to the untouched run's keys and values of the earlier ones (0: all run)
    position_start: int = 0
    #: rows of one token length, of any sequences: layers below ``shared_prefix`` do not run
    #: (layer ``shared_prefix``'s input comes from each row's untouched run, positions from
    #: ``position_start`` on), nor do positions before ``position_start`` (their keys and
    #: values come from the untouched run too)
    from_base: bool = False


@dataclass(frozen=True)
class PlanMetric:
    """A metric read from the output logits of a set of rows."""

    name: str
    kind: str
    invoke: str
    rows: tuple[int, ...]  # in result order, row-major over ``axes``
    positions: tuple[int, ...]  # the position read, per row
    tokens: tuple[int, ...] = ()
    #: tokens that differ per row (a dataset's ``target: "{io}"``): one tuple per entry of
    #: ``rows``, used instead of ``tokens``; ``token_strs`` then holds the templates
    row_tokens: tuple[tuple[int, ...], ...] = ()
    token_strs: tuple[str, ...] = ()
    k: int | None = None
    squeeze_token: bool = False
    axes: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()
    #: logit lens: the decoded sites, the stored values (row-major rows x sites), and the
    #: final-norm and unembedding modules applied to them
    sites: tuple[str, ...] = ()
    store_keys: tuple[str, ...] = ()
    lens_modules: tuple[str, ...] = ()
    #: recovery: the (patched, clean, corrupt) metrics it is computed from
    inputs: tuple[str, ...] = ()
    #: an aggregate over one of ``axes``: {over, axis, size, stat, ci, level, n_boot, seed,
    #: of} (None: the metric keeps every row's value)
    reduce: dict[str, Any] | None = None
    #: the metric of the unmodified run this one's ``/effect`` is measured from
    baseline: str | None = None
    #: kl: the reference row and position of each entry of ``rows``
    reference_rows: tuple[int, ...] = ()
    reference_positions: tuple[int, ...] = ()

    @property
    def result_axes(self) -> tuple[str, ...]:
        """``axes`` as the result has them: without the reduced axis."""
        if not self.reduce:
            return self.axes
        return tuple(a for i, a in enumerate(self.axes) if i != self.reduce["axis"])


@dataclass(frozen=True)
class PlanSave:
    """A saved site value assembled from per-row pieces into one tensor."""

    name: str
    invoke: str
    site: str
    keys: tuple[str, ...]  # store keys, row-major over ``axes``
    n_positions: tuple[int, ...]
    axes: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()
    #: the axes of each row's value after ``axes``: ("position", "hidden"); head sites
    #: ("position", "head", "head_dim"); attention patterns ("query", "head", "key")
    value_axes: tuple[str, ...] = ("position", "hidden")
    #: the values along value axes that are the same in every row: the selected positions,
    #: the selected heads
    value_axis_values: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanExpectation:
    """An ``expect:`` entry resolved against the plan: which tensor, which cells, which check."""

    index: int
    target: str  # the result tensor's name
    target_kind: str  # "metric" or "saved"
    metric_kind: str | None
    axes: tuple[str, ...]  # the tensor's axes
    select: tuple[tuple[int, ...] | None, ...]  # per leading axis: chosen indices, None = all
    over: str
    checks: dict[str, Any] = field(default_factory=dict)
    token_id: int | None = None  # argmax / top_k token
    token_str: str | None = None
    token_index: int | None = None  # argmax among a metric's tokens: the token's index
    location: str = ""
    message: str | None = None
