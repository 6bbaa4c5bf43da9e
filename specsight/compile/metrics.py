"""Compiling metrics (torch-free): each kind's record class compiles its spec metric
(:mod:`specsight.plan.metrics`) through :class:`MetricCompiler`, which works out what metrics
share: which rows and position each reads, token ids (per dataset item when they name
columns), result axes, reduction and baseline. The checks that need no model are here too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import did_you_mean
from ..plan import InvokeRef, Metric, Op, ResultRef, Rows, metric_kind
from ..plan.metrics import ReaderParts, Tokens
from ..sites import Site, SiteError, resolve_site
from .aggregate import check_baseline, compile_reduce, one_per_input
from .circuits import circuit_edges, plain_prompts
from .context import Abort, Context, SpecContext, SpecPath, plain
from .dataset import (
    check_metric_columns,
    column_names,
    item_label,
    render_selector,
    render_value,
)
from .distributions import check_reference, kl_reference
from .positions import PositionError, resolve_position

__all__ = ["MetricCompiler", "compile_metric", "metric_invoke_exists", "recovery_inputs_ok"]


def compile_metric(ctx: Context, name: str, metric: Any) -> Metric | None:
    """The plan record of one spec metric (None after a located issue): its kind's class
    compiles it through the compiler's services (:class:`MetricCompiler`)."""
    try:
        return metric_kind(metric.kind).compile(MetricCompiler(ctx), name, metric)
    except Abort:
        return None


class MetricCompiler:
    """The compiler's services to metric kinds (:class:`specsight.plan.metrics.CompileEnv`)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.info = ctx.info

    @property
    def vocab_size(self) -> int:
        return self.ctx.info.vocab_size

    def fail(self, code: str, message: str, path: SpecPath, hint: str | None = None) -> Abort:
        return self.ctx.fail(code, message, path, hint)

    def token_id(self, ref: str | int, path: SpecPath) -> int:
        return self.ctx.token_id(ref, path)

    def token_str(self, token_id: int) -> str:
        return self.ctx.tok.token_str(token_id)

    def add_op(self, op: Op) -> None:
        self.ctx.ops.append(op)

    def row(self, invoke: str, cell: int, prompt: int) -> int:
        return self.ctx.row_index[(invoke, cell, prompt)]

    def plain_prompts(self, ref: str, path: SpecPath) -> list[list[int]]:
        return plain_prompts(self.ctx, ref, path)

    def circuit_edges(self, name: str, circuit: Any, graph: Any, path: SpecPath) -> Any:
        return circuit_edges(self.ctx, name, circuit, graph, path)

    def spec_metric(self, name: str) -> Any:
        return self.ctx.spec.metrics[name]

    def item_columns(self) -> tuple[str, ...]:
        """The dataset's columns (none without a dataset)."""
        return tuple(self.ctx.items.columns) if self.ctx.items is not None else ()

    def item_values(self, template: str) -> list[Any]:
        """A template's value in each item of the dataset (an int column's ints as they are)."""
        assert self.ctx.items is not None
        return [render_value(template, row) for row in self.ctx.items.rows]

    def input_axis(self, invoke: str) -> str | None:
        return self.ctx.input_axis(invoke)

    def sites(self, selector: str, path: SpecPath) -> list[Site]:
        """The sites a selector names (a located issue when none)."""
        try:
            return resolve_site(selector, self.ctx.info, self.ctx.sae_sites)
        except SiteError as exc:
            raise self.fail("unknown-site", exc.message, path, exc.hint) from None

    def position(self, selector: Any, tokens: list[int], path: SpecPath) -> int:
        """The one position a selector picks in ``tokens``."""
        try:
            picked = resolve_position(plain(selector), tokens, self.ctx.tok)
        except PositionError as exc:
            raise self.fail("bad-position", exc.message, path, exc.hint) from None
        if len(picked) != 1:
            raise self.fail("bad-position", "a metric reads one position", path, "use 'last'")
        return picked[0]

    def single_prompt(self, ref: str, path: SpecPath) -> list[int]:
        """The tokens of an invoke that must be one prompt without a sweep or generation."""
        ctx = self.ctx
        if ref not in ctx.spec.invokes:
            hint = did_you_mean(ref, ctx.spec.invokes) or "invokes: " + ", ".join(ctx.spec.invokes)
            raise self.fail("unknown-invoke", f"no invoke named '{ref}'", path, hint)
        invoke = ctx.spec.invokes[ref]
        if invoke.sweep or invoke.generate is not None or len(ctx.tokens[ref]) != 1:
            raise self.fail(
                "bad-attribution",
                f"attribution needs '{ref}' to be one prompt without a sweep or generation",
                path,
                "give the clean and corrupted runs one prompt each",
            )
        return ctx.tokens[ref][0]

    def result_axes(self, invoke: str) -> tuple[tuple[str, ...], tuple[int, ...], str | None]:
        """The axes and shape of a metric of ``invoke``: its sweep, then its inputs (when
        several); and the input axis (None: one input)."""
        grid, each = self.ctx.grids[invoke], self.ctx.input_axis(invoke)
        axes = tuple(grid.axes) + ((each,) if each else ())
        shape = tuple(grid.shape) + ((len(self.ctx.tokens[invoke]),) if each else ())
        return axes, shape, each

    def reduce(self, name: str, metric: Any, axes: Any, shape: Any, each: str | None) -> Any:
        return compile_reduce(self.ctx, name, metric, axes, shape, each)

    def check_recovery(self, name: str, metric: Any) -> None:
        if not recovery_inputs_ok(self.ctx, name, metric):
            raise Abort

    def reference_rows(
        self, name: str, metric: Any, parts: ReaderParts
    ) -> tuple[Rows, tuple[int, ...]]:
        """A kl metric's reference row and position for each of its rows."""
        ctx = self.ctx
        if not check_reference(ctx, name, metric):
            raise Abort
        grid = ctx.grids[metric.invoke]
        cells = len(grid.cells()) if grid.axes else 1
        prompts = len(ctx.tokens[metric.invoke])
        rows, positions = kl_reference(
            ctx, metric, list(parts.positions[:prompts]), cells, _position_in(ctx, name, metric)
        )
        return Rows(rows), positions

    def reader(
        self,
        name: str,
        metric: Any,
        *,
        tokens: Sequence[tuple[Any, tuple[Any, ...]]] = (),
        last: bool = False,
        reduced_by_default: bool = False,
    ) -> ReaderParts:
        """What any metric reading rows of its invoke at one position has: rows (row-major over
        the sweep cells, then the inputs), each row's position (``last``: the prompt's last),
        its token ids (shared, or per dataset item), axes, shape, reduction and baseline."""
        ctx, path = self.ctx, ("metrics", name)
        if not metric_invoke_exists(ctx, name, metric):
            raise Abort
        if ctx.info.inputs == "image" and "position" in metric.model_fields_set:
            raise ctx.fail(
                "classifier-position",
                "an image classifier has one output per image, not one per position",
                path + ("position",),
                "remove 'position'; to read a position inside the model, save a site there",
            )
        if not check_metric_columns(ctx, name, metric):
            raise Abort
        over_items = metric.invoke in ctx.item_invokes
        prompts = ctx.tokens[metric.invoke]
        if last:
            picked = [len(t) - 1 for t in prompts]
        else:
            picked = [
                _metric_position(ctx, metric, t, i if over_items else None, path)
                for i, t in enumerate(prompts)
            ]
        grid = ctx.grids[metric.invoke]
        cells = len(grid.cells()) if grid.axes else 1
        rows = [self.row(metric.invoke, c, p) for c in range(cells) for p in range(len(prompts))]
        positions = tuple(picked[p] for _ in range(cells) for p in range(len(prompts)))
        ids = _token_ids(ctx, tokens, over_items, len(prompts), cells, path)
        axes, shape, each = self.result_axes(metric.invoke)
        reduce = compile_reduce(ctx, name, metric, axes, shape, each, reduced_by_default)
        if not check_baseline(ctx, name, metric):
            raise Abort
        baseline = getattr(metric, "baseline", None)
        return ReaderParts(
            name=ResultRef(name),
            invoke=InvokeRef(metric.invoke),
            rows=Rows(rows),
            positions=positions,
            tokens=ids,
            axes=axes,
            shape=shape,
            reduce=reduce,
            baseline=None if baseline is None else ResultRef(baseline),
        )


def _token_ids(
    ctx: Context,
    refs: Sequence[tuple[Any, tuple[Any, ...]]],
    over_items: bool,
    n_prompts: int,
    cells: int,
    path: SpecPath,
) -> Tokens:
    """A metric's token ids: the same for every row, or, when they name dataset columns, each
    item's own (``labels``: the templates)."""
    if over_items and ctx.items is not None and column_names([ref for ref, _ in refs]):
        per_item = [
            tuple(
                ctx.token_id(
                    render_value(ref, ctx.items.rows[i]), path + where, _where(ctx, i, ref)
                )
                for ref, where in refs
            )
            for i in range(n_prompts)
        ]
        per_row = tuple(per_item[i] for _ in range(cells) for i in range(n_prompts))
        return Tokens(per_row=per_row, labels=tuple(str(ref) for ref, _ in refs))
    ids = tuple(ctx.token_id(render_value(ref, {}), path + where) for ref, where in refs)
    return Tokens(ids=ids, labels=tuple(ctx.tok.token_str(i) for i in ids))


def _position_in(ctx: Context, name: str, metric: Any) -> Any:
    """(invoke, prompt index) -> the position the metric's selector picks in that prompt."""

    def position(invoke: str, prompt: int) -> int:
        item = prompt if invoke in ctx.item_invokes else None
        path = ("metrics", name)
        return _metric_position(ctx, metric, ctx.tokens[invoke][prompt], item, path)

    return position


def _where(ctx: Context, item: int, template: Any) -> str:
    assert ctx.items is not None
    return item_label(ctx.items, item, template) + ": "


def _metric_position(
    ctx: Context, metric: Any, tokens: list[int], item: int | None, path: SpecPath
) -> int:
    """The one position a metric reads in a prompt (in a dataset item, with its values)."""
    selector = plain(metric.position)
    concrete = selector if item is None else render_selector(selector, ctx.items.rows[item])  # type: ignore[union-attr]
    where = "" if item is None else _where(ctx, item, selector)
    try:
        picked = resolve_position(concrete, tokens, ctx.tok)
    except PositionError as exc:
        raise ctx.fail(
            "bad-position", where + exc.message, path + ("position",), exc.hint
        ) from None
    if len(picked) != 1:
        raise ctx.fail(
            "bad-position",
            f"{where}a metric reads one position; this selects {len(picked)}",
            path + ("position",),
            "use 'last', an index such as -1, or {token: ' John'}",
        )
    return picked[0]


def metric_invoke_exists(ctx: SpecContext, name: str, metric: Any) -> bool:
    """Whether a metric's invoke exists (a located issue when not; needs no model)."""
    if metric.invoke in ctx.spec.invokes:
        return True
    invokes = ctx.spec.invokes
    hint = did_you_mean(metric.invoke, invokes) or "invokes: " + ", ".join(invokes)
    path = ("metrics", name, "invoke")
    ctx.fail("unknown-invoke", f"no invoke named '{metric.invoke}'", path, hint)
    return False


def recovery_inputs_ok(ctx: SpecContext, name: str, metric: Any) -> bool:
    """Whether the metrics a recovery is computed from exist and fit: scalar kinds, and single
    values for clean and corrupt (located issues when not; needs no model)."""
    metrics, path = ctx.spec.metrics, ("metrics", name)
    ok = True
    for role in ("patched", "clean", "corrupt"):
        ref = getattr(metric, role)
        other = metrics.get(ref)
        if other is None or ref == name:
            candidates = [n for n, m in metrics.items() if n != name and m.scalar]
            hint = did_you_mean(ref, candidates) or "metrics: " + ", ".join(candidates)
            ctx.fail(
                "unknown-metric",
                f"no metric named '{ref}' to use as '{role}'",
                path + (role,),
                hint,
            )
            ok = False
        elif not other.scalar:
            ctx.fail(
                "bad-recovery",
                f"'{ref}' is a {other.kind} metric; recovery needs logit_diff, logits, logprob or prob",
                path + (role,),
            )
            ok = False
        elif other.invoke not in ctx.spec.invokes:  # that metric reports its unknown invoke
            ok = False
        elif role != "patched" and not _patched_fits(ctx, other.invoke, metrics, metric):
            ctx.fail(
                "bad-recovery",
                f"the {role} metric '{ref}' must be one value, or one per item of the patched "
                "metric: its invoke has a sweep, or other prompts than the patched one",
                path + (role,),
                "measure the clean and corrupted runs in invokes with one prompt (or the "
                "dataset's items) and no sweep",
            )
            ok = False
    return ok


def _patched_fits(ctx: SpecContext, invoke: str, metrics: Any, metric: Any) -> bool:
    patched = metrics.get(metric.patched)
    if patched is None or patched.invoke not in ctx.spec.invokes:
        return True  # reported for the patched metric
    return one_per_input(ctx, invoke, patched.invoke)
