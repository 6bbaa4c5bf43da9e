"""What every metric kind shares: metrics that read each row's output at one position
(:class:`RowMetric`), the tokens a metric reads (:class:`Tokens`), the compiler's services to a
kind (:class:`CompileEnv`) and the engine's (:class:`ReadBatch`, :class:`AfterRun`), and the
line ``specsight plan`` shows for a metric.

A kind is one class: its record fields, ``compile`` (from the spec's metric, through the
compiler's services), ``read`` (its values from a forward's logits) or ``finish`` (after the
run, from stored values or other metrics), its label, the axes it adds to the result, and how
the summary and report show it (``view``). The plan never imports torch: the engine's tensors
come in through the batch and are used through their own methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

from ...errors import format_path
from ..ops import Save
from ..records import Metric, Reduce, site_fields
from ..refs import InvokeRef, ResultRef, RowRef, Rows, StoreKey

__all__ = [
    "Tokens",
    "RowMetric",
    "ReaderParts",
    "CompileEnv",
    "ReadBatch",
    "AfterRun",
    "explain_line",
    "dims_text",
    "save_sites_at_rows",
]


@dataclass(frozen=True, kw_only=True)
class Tokens:
    """The token ids a metric reads: the same for every row (``ids``), or one tuple per entry
    of the metric's rows (``per_row``: a dataset's own answers). ``labels``: the decoded ids,
    or the templates of per-row tokens."""

    ids: tuple[int, ...] = ()
    per_row: tuple[tuple[int, ...], ...] = ()
    labels: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, kw_only=True)
class ReaderParts:
    """What the compiler works out for any metric that reads rows at one position each."""

    name: ResultRef
    invoke: InvokeRef
    rows: Rows
    positions: tuple[int, ...]
    tokens: Tokens
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    reduce: Reduce | None
    baseline: ResultRef | None

    def fields(self, *skip: str) -> dict[str, Any]:
        """The parts as record fields (``skip``: those the kind does not have)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


class CompileEnv(Protocol):
    """The compiler's services to a metric kind's ``compile`` (see ``compile.metrics``)."""

    def fail(
        self, code: str, message: str, path: tuple[Any, ...], hint: str | None = None
    ) -> Exception:
        """Record a located issue; returns the exception that abandons this metric."""

    def reader(self, name: str, metric: Any, *, tokens: list[tuple[Any, tuple[Any, ...]]] = (), last: bool = False, reduced_by_default: bool = False) -> ReaderParts:  # fmt: skip
        """Rows, positions (``last``: each prompt's last), tokens, axes, reduction and baseline
        of a metric reading rows of its invoke."""

    def __getattr__(self, name: str) -> Any: ...


class ReadBatch(Protocol):
    """One forward's rows a metric reads, at their positions (the engine's)."""

    logits: Any  # [n, vocab], float32

    def picked(self, tokens: Tokens) -> Any:
        """``logits`` at the metric's tokens: [n, len(tokens)]."""

    def __getattr__(self, name: str) -> Any: ...


class AfterRun(Protocol):
    """What the run left, for kinds computed after it (the engine's)."""

    store: dict[str, Any]
    metrics: dict[str, Any]

    def __getattr__(self, name: str) -> Any: ...


@dataclass(frozen=True, kw_only=True)
class RowMetric(Metric):
    """A metric of each row's output at one position (its next-token prediction)."""

    rows: Rows  # in result order, row-major over ``axes``
    positions: tuple[int, ...]  # the position read, per row
    #: the metric of the unmodified run this one's ``/effect`` is measured from
    baseline: ResultRef | None = None

    buffered: ClassVar[bool] = True

    def logit_reads(self) -> Iterator[tuple[int, int]]:
        """The (row, position) pairs whose logits the metric reads."""
        return zip(self.rows, self.positions)

    def read(self, batch: ReadBatch) -> tuple[Any, Any]:
        """The values of the batch's rows (and their token ids, for kinds that have them)."""
        raise NotImplementedError

    def what(self, plan: Any) -> str:
        """What ``specsight plan`` says the metric computes."""
        return self.kind

    def explain(self, plan: Any) -> str:
        return explain_line(self, plan, self.what(plan))


def save_sites_at_rows(
    env: CompileEnv, tag: str, name: str, parts: ReaderParts, sites: list[Any]
) -> tuple[Any, ...]:
    """Add a save of every site at each of the metric's rows, at the row's position; the store
    keys (``<tag>/<name>/<row>/<site>``), row-major over rows x sites."""
    origin = format_path(("metrics", name))
    keys = []
    for row, pos in zip(parts.rows, parts.positions):
        for site in sites:
            key = StoreKey(f"{tag}/{name}/{row}/{site.name}")
            keys.append(key)
            env.add_op(
                Save(
                    **site_fields(site), row=RowRef(row), positions=(pos,), store=key, origin=origin
                )
            )
    return tuple(keys)


def dims_text(metric: Metric, extra: tuple[str, ...] = ()) -> str:
    """``layer=30 x pos=14`` (a reduced axis left out; ``extra`` after), or ``scalar``."""
    skip = metric.reduce.axis if metric.reduce else None
    dims = [f"{a}={n}" for i, (a, n) in enumerate(zip(metric.axes, metric.shape)) if i != skip]
    return " x ".join([*dims, *extra]) or "scalar"


def reduced_text(metric: Metric) -> str:
    """``, mean over 64 items (+ stderr, 95% bootstrap interval, per-item values)``."""
    r = metric.reduce
    if r is None:
        return ""
    extra = "stderr" + (f", {r.level:.0%} bootstrap interval" if r.ci else "")
    return f", {r.stat} over {r.size} {r.over}s (+ {extra}, per-item values)"


def explain_line(
    metric: RowMetric,
    plan: Any,
    what: str,
    *,
    where: str | None = None,
    extra: tuple[str, ...] = (),
) -> str:
    """The line ``specsight plan`` shows for a metric read at positions of an invoke."""
    if where is None:
        where = f"@ position {_ranges(list(metric.positions))}"
    if plan.model_summary.get("inputs") == "image":
        where = "(the classifier's output)"
    line = f"  {metric.name}: {what} on {metric.invoke} {where} -> [{dims_text(metric, extra)}]"
    line += reduced_text(metric)
    return line + (f"; effect = value - {metric.baseline}" if metric.baseline else "")


def _ranges(values: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    if not values:
        return "-"
    values = sorted(set(values))
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)
