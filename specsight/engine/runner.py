"""Applying a plan's ops inside a forward: the :class:`Runner` builds, per forward, action
tables (per site, levels of ops grouped by kind) and gives each hooked site a function that
applies them.

At a site, each row's ops run in the order the spec declares them. Ops of different rows are
independent, so ops of one kind on the same columns apply as one indexed tensor operation.
Outputs are modified on a copy that replaces the module's return value; inputs are modified in
place, so a residual stream read through a norm's input (``resid_mid``) changes the residual
itself, not only what the norm sees (under autograd, an input that is a view is replaced by a
changed copy instead: its base may be saved for the backward pass). Per-head sites act on column windows of their tensor, and
token-flattened tensors are viewed per row (:mod:`.views`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RunError
from ..plan import Forward, Plan, RowOp
from .ablate import mean_value, noise_draw, project_out, span_basis, spread
from .grad import keep_grad
from .views import attention_weights, col_index, pos_index, row_major, token_major

__all__ = ["ActionTables", "Runner"]

_SITE_HINT = "check the op's positions and columns against the site (`specsight sites MODEL`)"
_HINTS = {
    "add": "check the vector width against the site's shape (`specsight sites MODEL`)",
    "set": "check the value's width against the site's shape (`specsight sites MODEL`)",
    "patch": "patch between prompts of the same length, or give source_positions",
    "project_out": "check the vectors' width against the site's shape (`specsight sites MODEL`)",
}


@dataclass
class _Group:
    """Ops of one kind on the same columns at one site, as index tensors where they batch."""

    kind: str
    ops: list[RowOp]
    rows: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    factors: torch.Tensor | None = None
    vectors: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    #: batched saves: how many positions of the gathered values each op keeps
    counts: list[int] | None = None

    def to(self, device: torch.device) -> None:
        """Move the group's tensors to ``device`` (a module of a model placed across devices
        runs elsewhere than the model's input device)."""
        for name in ("rows", "positions", "factors", "vectors", "cols"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))


@dataclass(frozen=True)
class ActionTables:
    """One forward's action tables: its rows' batch indices and, per (module, io) site, levels
    of grouped ops (level i holds every row's i-th op there)."""

    forward: Forward
    local: dict[int, int]
    sites: dict[tuple[str, str], list[list[_Group]]]
    #: the forward starts at this position: op positions index the input shifted by it
    offset: int = 0


class Runner:
    """A plan's ops on one model: stored values, vectors, and the active action tables."""

    def __init__(
        self,
        plan: Plan,
        model: torch.nn.Module,
        device: torch.device,
        pad_id: int,
        *,
        checkpoint: Callable[[], None] | None = None,
    ):
        self.plan = plan
        self.checkpoint = checkpoint  # called before every forward call of the model
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.store: dict[str, torch.Tensor] = {}
        self.vectors: dict[str, torch.Tensor] = {}
        self.active: ActionTables | None = None
        #: a ``from_base`` forward's input at its first running layer (from the untouched runs)
        self.base_input: torch.Tensor | None = None
        #: values ablations compute once from captures: means, spreads, bases
        self.derived: dict[tuple, torch.Tensor | float] = {}
        self.ops_by_row: dict[int, list[RowOp]] = defaultdict(list)
        for op in plan.ops:
            self.ops_by_row[op.row].append(op)

    def _vector(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        if key not in self.vectors:
            self.vectors[key] = torch.tensor(self.plan.vectors[key], dtype=torch.float64)
        return self.vectors[key].to(self.device, dtype)

    def prepare(
        self,
        forward: Forward,
        dtype: torch.dtype,
        ops_by_row: dict[int, list[RowOp]] | None = None,
        offset: int = 0,
    ) -> ActionTables:
        """Build the action tables of one forward (``ops_by_row`` overrides the plan's ops) and
        make them the active ones; ``offset``: the forward's inputs start at that position."""
        local = {row: i for i, row in enumerate(forward.rows)}
        per_site: dict[tuple[str, str], dict[int, list[RowOp]]] = defaultdict(
            lambda: defaultdict(list)
        )
        by_row = self.ops_by_row if ops_by_row is None else ops_by_row
        for row in forward.rows:
            for op in by_row.get(row, ()):
                per_site[(op.module, op.io)][row].append(op)
        sites: dict[tuple[str, str], list[list[_Group]]] = {}
        for site, by_row in per_site.items():
            depth = max(len(ops) for ops in by_row.values())
            levels = []
            for level in range(depth):
                # ops of one kind on the same columns apply as one indexed operation
                kinds: dict[tuple[str, Any], list[RowOp]] = defaultdict(list)
                for ops in by_row.values():
                    if level < len(ops):
                        kinds[(ops[level].kind, ops[level].cols)].append(ops[level])
                levels.append(
                    [self._group(key[0], ops, dtype, local, offset) for key, ops in kinds.items()]
                )
            sites[site] = levels
        self.active = ActionTables(forward, local, sites, offset)
        return self.active

    def activate(self, tables: ActionTables) -> None:
        """Make tables built earlier (by :meth:`prepare`) the active ones again."""
        self.active = tables

    def _group(
        self, kind: str, ops: list[RowOp], dtype: torch.dtype, local: dict[int, int], offset: int
    ) -> _Group:
        group = _Group(kind, ops, cols=col_index(ops[0].cols, self.device))
        if kind == "patch" and all(op.sources[0] in self.store for op in ops):
            return self._patch_group(group, local, offset)
        if kind == "save" and all(op.io != "pattern" for op in ops):
            self._index(group, local, offset)
            group.counts = [len(op.positions) for op in ops]
            return group
        if kind in ("zero", "scale") or (kind in ("add", "set") and ops[0].vector is not None):
            if kind in ("add", "set") and any(op.vector is None for op in ops):
                return group  # mixed saved/inline sources: apply one by one
            self._index(group, local, offset)
            factors = [1.0 if op.factor is None else op.factor for op in ops for _ in op.positions]
            vecs = [op.vector for op in ops for _ in op.positions if op.vector is not None]
            group.factors = torch.tensor(factors, device=self.device, dtype=dtype).unsqueeze(-1)
            if vecs:
                keys = sorted(set(vecs))
                table = torch.stack([self._vector(k, dtype) for k in keys])
                index = torch.tensor([keys.index(k) for k in vecs], device=self.device)
                group.vectors = table[index]
        return group

    def _patch_group(self, group: _Group, local: dict[int, int], offset: int) -> _Group:
        """Patches whose sources are stored already: every row's values gathered now, one
        gather per source, written in the hook by one indexed assignment."""
        by_source: dict[str, list[tuple[int, int]]] = {}
        slot = 0
        for op in group.ops:
            for _, src in zip(op.positions, op.source_positions or op.positions):
                by_source.setdefault(op.sources[0], []).append((slot, src))
                slot += 1
        order, pieces = [], []
        for key, entries in by_source.items():
            stored = self.store[key]
            picked = torch.tensor([src for _, src in entries], device=stored.device)
            pieces.append(stored[picked].to(self.device))
            order += [slot for slot, _ in entries]
        values = torch.cat(pieces)[torch.argsort(torch.tensor(order, device=self.device))]
        if group.cols is not None:
            values = values[:, group.cols]
        self._index(group, local, offset)
        group.vectors = values
        return group

    def _index(self, group: _Group, local: dict[int, int], offset: int) -> None:
        """The group's (row, position) pairs, one per op position, as index tensors."""
        rows = [local[op.row] for op in group.ops for _ in op.positions]
        positions = [p - offset for op in group.ops for p in op.positions]
        group.rows = torch.tensor(rows, device=self.device, dtype=torch.long)
        group.positions = torch.tensor(positions, device=self.device, dtype=torch.long)

    def expander(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
        """At ``layer``'s input: copies the single shared row to every row of the forward, or
        (``from_base``) puts in the untouched runs' hidden states."""

        def expand(hidden: torch.Tensor) -> torch.Tensor | None:
            active = self.active
            if active is None or active.forward.shared_prefix != layer:
                return None
            if active.forward.from_base:
                return self.base_input
            return hidden.expand(len(active.forward.rows), *hidden.shape[1:]).contiguous()

        return expand

    def hook(self, site: tuple[str, str]) -> Callable[[torch.Tensor], torch.Tensor | None]:
        io = site[1]

        def apply(hidden: torch.Tensor) -> torch.Tensor | None:
            active = self.active
            levels = active.sites.get(site) if active is not None else None
            if not levels:
                return None
            forward = active.forward
            writes = any(
                g.kind not in ("save", "capture", "grad") for level in levels for g in level
            )
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
            for level in levels:
                for group in level:
                    self._apply(group, work)
            return hidden if replace else None

        return apply

    def _apply(self, group: _Group, hidden: torch.Tensor) -> None:
        kind = group.kind
        width = hidden.shape[-1] if group.cols is None else len(group.cols)
        if group.vectors is not None and group.vectors.shape[-1] != width:
            op = group.ops[0]
            raise RunError(
                f"{op.origin}: the {kind} vector has {group.vectors.shape[-1]} values but site "
                f"'{op.site}' has width {width}",
                hint=f"give {width} values",
            )
        try:
            if group.rows is not None:
                if group.rows.device != hidden.device:
                    group.to(hidden.device)
                index: tuple[torch.Tensor, ...] = (group.rows, group.positions)
                if group.cols is not None:
                    index = (group.rows[:, None], group.positions[:, None], group.cols[None, :])
                if kind == "save":
                    self._save_group(group, hidden[index])
                elif kind == "patch":
                    hidden[index] = group.vectors.to(hidden.dtype)
                elif kind == "zero":
                    hidden[index] = 0
                elif kind == "scale":
                    hidden[index] = hidden[index] * group.factors
                elif kind == "add":
                    hidden[index] = hidden[index] + group.vectors * group.factors
                elif kind == "set":
                    hidden[index] = group.vectors.expand_as(hidden[index])
                return
            for op in group.ops:
                self._apply_one(op, hidden)
        except RunError:
            raise
        except Exception as exc:  # any failure of a user's op is that op's run error
            op = group.ops[0]
            raise RunError(
                f"{op.origin}: {kind} at '{op.site}' failed: {exc}".split("\n")[0],
                hint=_HINTS.get(kind, _SITE_HINT),
            ) from None

    def _save_group(self, group: _Group, gathered: torch.Tensor) -> None:
        """Each op's positions of one gather, kept under its store key."""
        values = gathered.detach().clone()
        assert group.counts is not None
        for op, value in zip(group.ops, torch.split(values, group.counts)):
            if op.head_dim:  # [positions, heads, head_dim]
                value = value.reshape(len(op.positions), -1, op.head_dim)
            self.store[op.store] = value  # type: ignore[index]

    def _apply_one(self, op: RowOp, hidden: torch.Tensor) -> None:
        active = self.active
        assert active is not None
        row = active.local[op.row]
        positions = pos_index(tuple(p - active.offset for p in op.positions), hidden.device)
        cols = col_index(op.cols, hidden.device)
        if op.io == "pattern":  # [batch, query, head, key]: keys past the row's tokens are padding
            value = hidden[row, positions] if cols is None else hidden[row, positions][:, cols]
            n_keys = len(self.plan.rows[op.row].tokens)
            self.store[op.store] = value[..., :n_keys].detach().clone()
            return
        index: tuple[Any, ...] = (row, positions)
        if cols is not None:
            index = (row, positions[:, None], cols[None, :])
        if op.kind == "grad":
            keep_grad(
                hidden, row, positions, cols, self.store, op.store, op.head_dim, op.origin, op.site
            )
        elif op.kind == "save":
            value = hidden[index].detach().clone()
            if op.head_dim:  # [positions, heads, head_dim]
                value = value.reshape(len(op.positions), -1, op.head_dim)
            self.store[op.store] = value
        elif op.kind == "capture":
            self.store[op.store] = hidden[row, : len(op.positions)].detach().clone()
        elif op.kind == "patch":
            stored = self.store[op.sources[0]]
            source = stored[pos_index(tuple(op.source_positions), stored.device)]
            if cols is not None:
                source = source[:, cols.to(source.device)]
            hidden[index] = source.to(hidden.device, hidden.dtype)
        elif op.kind in ("add", "set"):
            if op.vector is not None:
                value = self._vector(op.vector, hidden.dtype)
            else:  # saved values, on their own device: one vector per position, heads flat
                pieces = [p.reshape(p.shape[0], -1) for p in (self.store[k] for k in op.sources)]
                value = torch.cat(pieces).mean(0) if op.reduce == "mean" else pieces[0]
            value = value.to(hidden.device, hidden.dtype)
            if op.kind == "add":
                hidden[index] = hidden[index] + value * (
                    op.factor if op.factor is not None else 1.0
                )
            else:
                hidden[index] = value.expand(len(op.positions), -1)
        elif op.kind in ("mean", "noise", "project_out"):
            self._ablate(op, hidden, index, cols)
        else:  # pragma: no cover - compile never emits other kinds
            raise RunError(f"unknown op kind '{op.kind}'")

    def _ablate(
        self, op: RowOp, hidden: torch.Tensor, index: tuple[Any, ...], cols: torch.Tensor | None
    ) -> None:
        """mean_ablate, noise and project_out at one row's positions (and columns)."""
        if op.kind == "mean":
            key = ("mean", op.sources, op.reduce)
            if key not in self.derived:
                self.derived[key] = mean_value([self.store[k] for k in op.sources], op.reduce)
            table = self.derived[key]
            value = table if op.reduce == "all" else table[list(op.positions)]  # type: ignore[index]
            if cols is not None:
                value = value[..., cols.to(value.device)]
            hidden[index] = value.to(hidden.device, hidden.dtype).expand_as(hidden[index])
        elif op.kind == "noise":
            std = op.factor if op.factor is not None else 1.0
            if op.sources:
                key = ("spread", op.sources, op.cols)
                if key not in self.derived:
                    captures = [self.store[k] for k in op.sources]
                    where = None if cols is None else cols.to(captures[0].device)
                    self.derived[key] = spread(captures, where)
                std *= self.derived[key]  # type: ignore[operator]
            target = hidden[index]
            draw = noise_draw(int(op.seed or 0), tuple(target.shape))
            hidden[index] = target + (draw * std).to(hidden.device, hidden.dtype)
        else:
            key = ("basis", op.sources)
            if key not in self.derived:
                vectors = [self._vector(k, torch.float64) for k in op.sources]
                self.derived[key] = span_basis(vectors)
            basis = self.derived[key].to(hidden.device)  # type: ignore[union-attr]
            hidden[index] = project_out(hidden[index], basis)


def _not_per_position(hidden: torch.Tensor, seq_len: int) -> bool:
    """Tensors that are not [batch, pos, width]: more than three axes, or three whose second
    is not a position axis (a one-position input such as a feature vector)."""
    return hidden.dim() > 3 or (hidden.dim() == 3 and seq_len == 1 and hidden.shape[1] != 1)
