"""Applying a plan's ops inside a forward: the :class:`Runner` builds, per forward, action
tables (per site, levels of grouped ops) and gives each hooked site a function that applies
them; it is also the engine's side of the op kinds (:class:`~specsight.plan.ops.OpEnv`: the
store, plan vectors, values computed once per run).

At a site, each row's ops run in the order the spec declares them. Ops of different rows are
independent, so ops of one kind on the same columns form a group; a kind that batches
(``batchable``) applies to the whole group as one indexed write, the others op by op. Outputs
are modified on a copy that replaces the module's return value; inputs are modified in place,
so a residual stream read through a norm's input (``resid_mid``) changes the residual itself,
not only what the norm sees (under autograd, an input that is a view is replaced by a changed
copy instead: its base may be saved for the backward pass). Per-head sites act on column
windows of their tensor, and token-flattened tensors are viewed per row (:mod:`.views`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import RunError
from ..plan import Forward, Op, Plan, SaeRef
from ..plan.ops import At, Group
from .ablate import mean_value, noise_draw, project_out, span_basis, spread, spread_key
from .hooks import module_table
from .paths import path_value
from .python_calls import call_op
from .sae import SaeHooks, SparseAutoencoder
from .views import attention_weights, col_index, pos_index, row_major, token_major

__all__ = ["ActionTables", "Runner"]

#: where ops act: a module's io, and the SAE and its part when the site is an SAE's
Site = tuple[str, str, SaeRef | None, str | None]

_SITE_HINT = "check the op's positions and columns against the site (`specsight sites MODEL`)"
_HINTS = {
    "add": "check the vector width against the site's shape (`specsight sites MODEL`)",
    "set": "check the value's width against the site's shape (`specsight sites MODEL`)",
    "patch": "patch between prompts of the same length, or give source_positions",
    "project_out": "check the vectors' width against the site's shape (`specsight sites MODEL`)",
}


@dataclass
class _Level:
    """Ops of one kind on the same columns at one site: a group applied at once (``group``),
    or op by op."""

    kind: type[Op]
    ops: list[Op]
    cols: torch.Tensor | None
    group: Group | None = None
    #: the ops' positions index the site's tensor shifted by this
    offset: int = 0
    #: a group of ops on different columns (``Op.mixed_cols``): each entry's columns [n, width]
    entry_cols: torch.Tensor | None = None


@dataclass(frozen=True)
class ActionTables:
    """One forward's action tables: its rows' batch indices and, per (module, io) site, levels
    of grouped ops (level i holds every row's i-th op there)."""

    forward: Forward
    local: dict[int, int]
    sites: dict[Site, list[list[_Level]]]
    #: the forward starts at this position: op positions index the input shifted by it
    offset: int = 0
    #: SAE sites: the positions (start, stop) of the input their ops touch, the only ones
    #: encoded
    spans: dict[Site, tuple[int, int]] = field(default_factory=dict)


class Runner(SaeHooks):
    """A plan's ops on one model: stored values, vectors, and the active action tables."""

    def __init__(
        self,
        plan: Plan,
        model: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        pad_id: int = 0,
    ):
        self.plan = plan
        self.model = model
        self.device = device
        self.dtype = dtype
        self.pad_id = pad_id
        self.store: dict[str, torch.Tensor] = {}
        self._vectors: dict[str, torch.Tensor] = {}
        self.active: ActionTables | None = None
        #: a ``from_base`` forward's input at its first running layer (from the untouched runs)
        self.base_input: torch.Tensor | None = None
        #: values ablations compute once from captures: means, spreads, bases
        self._derived: dict[tuple, Any] = {}
        self._saes: dict[SaeRef, SparseAutoencoder] = {}
        #: each transcoder's input in the forward running (kept by :meth:`transcoder_keeper`)
        self.transcoder_inputs: dict[SaeRef, torch.Tensor] = {}
        #: the backward pass's tensor hooks keep gradients here (see :meth:`keep_grad`)
        self.grad_hooks: Callable[[torch.Tensor, Callable[[torch.Tensor], None]], None] | None = (
            None
        )
        self.ops_by_row: dict[int, list[Op]] = defaultdict(list)
        for op in plan.ops:
            self.ops_by_row[op.row].append(op)

    # --- action tables ------------------------------------------------------------------

    def prepare(
        self, forward: Forward, ops_by_row: dict[int, list[Op]] | None = None, offset: int = 0
    ) -> ActionTables:
        """Build the action tables of one forward (``ops_by_row`` overrides the plan's ops) and
        make them the active ones; ``offset``: the forward's inputs start at that position."""
        local = {row: i for i, row in enumerate(forward.rows)}
        per_site: dict[Site, dict[int, list[Op]]] = defaultdict(lambda: defaultdict(list))
        by_row = self.ops_by_row if ops_by_row is None else ops_by_row
        for row in forward.rows:
            for op in by_row.get(row, ()):
                per_site[op.hook_site][row].append(op)
        sites: dict[Site, list[list[_Level]]] = {}
        spans: dict[Site, tuple[int, int]] = {}
        for site, ops_of in per_site.items():
            at = offset
            if site[2] is not None:
                touched = [
                    p - offset for ops in ops_of.values() for op in ops for p in op.positions
                ]
                spans[site] = (min(touched), max(touched) + 1)
                at = offset + spans[site][0]
            levels = []
            for level in range(max(len(ops) for ops in ops_of.values())):
                kinds: dict[tuple[type, Any], list[Op]] = defaultdict(list)
                for ops in ops_of.values():
                    if level < len(ops):
                        kinds[_level_key(ops[level])].append(ops[level])
                levels.append([self._level(key[0], ops, local, at) for key, ops in kinds.items()])
            sites[site] = levels
        self.active = ActionTables(forward, local, sites, offset, spans)
        return self.active

    def activate(self, tables: ActionTables | None) -> None:
        """Make tables built earlier (by :meth:`prepare`) the active ones again."""
        self.active = tables

    def _level(self, kind: type[Op], ops: list[Op], local: dict[int, int], offset: int) -> _Level:
        level = _Level(kind, ops, col_index(ops[0].cols, self.device), offset=offset)
        if len({op.cols for op in ops}) > 1:  # a mixed_cols kind: each op its own columns
            level.cols = None
            level.entry_cols = torch.stack(
                [col_index(op.cols, self.device) for op in ops for _ in op.positions]
            )
        if kind.batchable(ops, self):
            rows = [local[op.row] for op in ops for _ in op.positions]
            positions = [p - offset for op in ops for p in op.positions]
            index: tuple[torch.Tensor, ...] = (
                torch.tensor(rows, device=self.device, dtype=torch.long),
                torch.tensor(positions, device=self.device, dtype=torch.long),
            )
            level.group = Group(ops, index)
            kind.prepare(level.group, self)
        return level

    # --- hooks ----------------------------------------------------------------------------

    def expander(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
        """At ``layer``'s input: copies the single row the layers below ran on to every row
        of the forward, or (``from_base``) puts in the untouched runs' hidden states."""

        def expand(hidden: torch.Tensor) -> torch.Tensor | None:
            active = self.active
            if active is None or active.forward.shared_prefix != layer:
                return None
            if active.forward.from_base:
                return self.base_input
            return hidden.expand(len(active.forward.rows), *hidden.shape[1:]).contiguous()

        return expand

    def hook(self, site: Site) -> Callable[[torch.Tensor], torch.Tensor | None]:
        if site[2] is not None:
            return self.sae_hook(site)
        io = site[1]

        def apply(hidden: torch.Tensor) -> torch.Tensor | None:
            active = self.active
            levels = active.sites.get(site) if active is not None else None
            if not levels:
                return None
            forward = active.forward
            writes = any(level.kind.writes for groups in levels for level in groups)
            # outputs change on a copy that replaces them; inputs in place (the residual they
            # carry changes too), except a view under autograd: its base may be saved for the
            # backward pass (an attention output), so a changed copy replaces the input
            replace = writes and (
                io == "output"
                or (io == "input" and hidden._base is not None and hidden.requires_grad)
            )
            if replace:
                hidden = hidden.clone()
            if io == "pattern":
                try:
                    hidden = attention_weights(hidden, site[0])
                except RunError as exc:
                    origin = levels[0][0].ops[0].origin
                    raise RunError(f"{origin}: {exc.message}", hint=exc.hint) from None
            work = hidden
            if hidden.dim() == 2:
                work = token_major(hidden, len(forward.rows), forward.seq_len, site[0])
            elif io != "pattern" and _not_per_position(hidden, forward.seq_len):
                work = row_major(hidden, len(forward.rows), forward.seq_len, site[0])
            for groups in levels:
                for level in groups:
                    self._apply(level, work)
            return hidden if replace else None

        return apply

    def _apply(self, level: _Level, hidden: torch.Tensor) -> None:
        op = level.ops[0]
        values = level.group.values if level.group is not None else None
        width = hidden.shape[-1] if level.cols is None else len(level.cols)
        width = width if level.entry_cols is None else level.entry_cols.shape[1]
        if values is not None and values.shape[-1] != width:
            raise RunError(
                f"{op.origin}: the {op.label} vector has {values.shape[-1]} values but site "
                f"'{op.site}' has width {width}",
                hint=f"give {width} values",
            )
        try:
            if level.group is not None:
                self._write(level, hidden)
                return
            for one in level.ops:
                one.apply(hidden, self._at(one, hidden, level.offset), self)
        except RunError:
            raise
        except Exception as exc:  # any failure of a user's op is that op's run error
            raise RunError(
                f"{op.origin}: {op.label} at '{op.site}' failed: {exc}".split("\n")[0],
                hint=_HINTS.get(op.label, _SITE_HINT),
            ) from None

    def _write(self, level: _Level, hidden: torch.Tensor) -> None:
        group = level.group
        assert group is not None
        index = group.index
        if index[0].device != hidden.device:  # a module of a model placed across devices
            index = group.index = tuple(i.to(hidden.device) for i in index)
            for name in ("values", "factors"):
                if getattr(group, name) is not None:
                    setattr(group, name, getattr(group, name).to(hidden.device))
        if level.cols is not None:
            cols = level.cols.to(hidden.device)
            index = (index[0][:, None], index[1][:, None], cols[None, :])
            group = Group(group.ops, index, group.values, group.factors)
        elif level.entry_cols is not None:
            cols = level.entry_cols.to(hidden.device)
            index = (index[0][:, None], index[1][:, None], cols)
            group = Group(group.ops, index, group.values, group.factors)
        level.kind.write(hidden, group, self)

    def _at(self, op: Op, hidden: torch.Tensor, offset: int) -> At:
        active = self.active
        assert active is not None
        positions = pos_index(tuple(p - offset for p in op.positions), hidden.device)
        return At(active.local[op.row], positions, col_index(op.cols, hidden.device))

    # --- the op kinds' services (specsight.plan.ops.OpEnv) --------------------------------

    def factors(self, values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(list(values), device=self.device, dtype=self.dtype).unsqueeze(-1)

    def _vector64(self, key: str) -> torch.Tensor:
        if key not in self._vectors:
            self._vectors[key] = torch.tensor(self.plan.vectors[key], dtype=torch.float64)
        return self._vectors[key]

    def vectors(self, keys: Sequence[str]) -> torch.Tensor:
        distinct = sorted(set(keys))
        table = torch.stack([self._vector64(k).to(self.device, self.dtype) for k in distinct])
        index = torch.tensor([distinct.index(k) for k in keys], device=self.device)
        return table[index]

    def vector(self, key: str, like: torch.Tensor) -> torch.Tensor:
        return self._vector64(key).to(like.device, like.dtype)

    def stored(self, pairs: Sequence[tuple[str, int]], cols: Any) -> torch.Tensor:
        by_key: dict[str, list[tuple[int, int]]] = {}
        for slot, (key, position) in enumerate(pairs):
            by_key.setdefault(key, []).append((slot, position))
        order, pieces = [], []
        for key, entries in by_key.items():
            stored = self.store[key]
            picked = torch.tensor([p for _, p in entries], device=stored.device)
            pieces.append(stored[picked].to(self.device))
            order += [slot for slot, _ in entries]
        values = torch.cat(pieces)[torch.argsort(torch.tensor(order, device=self.device))]
        if cols is not None:
            values = values[:, col_index(cols, self.device)]
        return values

    def saved(self, keys: Sequence[str], mean: bool) -> torch.Tensor:
        """Saved values on their own device: one vector per position (heads flattened), or
        the mean over every row and position (``mean``)."""
        pieces = self._saved_rows(keys)
        return torch.cat(pieces).mean(0) if mean else pieces[0]

    def saved_mean(self, keys: Sequence[str], pooled: bool) -> torch.Tensor:
        """The mean of saved rows in float32: per position (rows of equal length), or over
        every row and position (``pooled``)."""
        pieces = [p.float() for p in self._saved_rows(keys)]
        return torch.cat(pieces).mean(0) if pooled else torch.stack(pieces).mean(0)

    def _saved_rows(self, keys: Sequence[str]) -> list[torch.Tensor]:
        """Each saved row as [positions, width] (a head site's heads flattened)."""
        return [self.store[k].reshape(self.store[k].shape[0], -1) for k in keys]

    def derived(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def call(self, fn: str, values: torch.Tensor, origin: str) -> torch.Tensor:
        return call_op(fn, values, origin)

    def spreads(self) -> dict[str, float]:
        """The spreads noise ops measured (``std_of``), for the manifest."""
        return {
            spread_key(key[1], key[2]): float(value)
            for key, value in self._derived.items()
            if key[0] == "spread" and key[1]
        }

    def mean(self, captures: list[torch.Tensor], over: str) -> torch.Tensor:
        return mean_value(captures, over)

    def spread(self, captures: list[torch.Tensor], cols: Any) -> float:
        return spread(captures, cols)

    def basis(self, keys: Sequence[str]) -> torch.Tensor:
        return span_basis([self._vector64(k) for k in keys])

    def project_out(self, values: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        return project_out(values, basis)

    def noise(self, seed: int, like: torch.Tensor) -> torch.Tensor:
        return noise_draw(int(seed), tuple(like.shape))

    def path_value(self, op: Any, at: At) -> torch.Tensor:
        return path_value(op, self.store, module_table(self.model))

    def row_length(self, row: int) -> int:
        return len(self.plan.rows[row].tokens)

    def keep_grad(self, hidden: torch.Tensor, at: At, op: Any) -> None:
        """Keep ``hidden``'s gradient at one row's positions (and columns) when backward runs."""
        if not hidden.requires_grad or self.grad_hooks is None:
            raise RunError(
                f"{op.origin}: no gradient reaches '{op.site}'",
                hint="gradients flow from the input embedding's output on, in the forward that "
                "the backward metric reads",
            )
        key, head_dim = op.store, op.head_dim

        def keep(grad: torch.Tensor) -> None:
            value = grad[at.row, at.positions]
            if at.cols is not None:
                value = value[:, at.cols]
            value = value.detach().clone()
            if head_dim:
                value = value.reshape(len(at.positions), -1, head_dim)
            self.store[key] = value

        self.grad_hooks(hidden, keep)


def _level_key(op: Op) -> tuple[type, Any]:
    """Ops at one site that form one group: the same kind on the same columns, or on as many
    columns for kinds whose writes take each op's own (``mixed_cols``)."""
    if op.mixed_cols and op.cols is not None:
        return type(op), sum(stop - start for start, stop in op.cols)
    return type(op), op.cols


def _not_per_position(hidden: torch.Tensor, seq_len: int) -> bool:
    """Tensors that are not [batch, pos, width]: more than three axes, or three whose second
    is not a position axis (a one-position input such as a feature vector)."""
    return hidden.dim() > 3 or (hidden.dim() == 3 and seq_len == 1 and hidden.shape[1] != 1)
