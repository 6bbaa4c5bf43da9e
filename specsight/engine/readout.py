"""Reading results out of a run: each metric's values from a forward's logits (the metric's
kind computes them from a :class:`MetricBatch`), what kinds computed after the run read
(:class:`AfterRun`), and saved values assembled from per-row pieces (padded with NaN where
prompts differ in length)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..plan import Forward, Metric, Row
from ..plan.metrics import Tokens
from .circuit_metrics import circuit_faithfulness, circuit_scores
from .dla import direct_attribution
from .probe import train_probes
from .python_calls import call_metric

__all__ = ["AfterRun", "MetricBatch", "assemble", "read_metric", "to_host"]

Column = Callable[[int], int]


class MetricBatch:
    """The rows of one forward a metric reads, at its positions: what a kind's ``read`` gets
    (see :class:`specsight.plan.metrics.ReadBatch`)."""

    def __init__(
        self,
        slots: dict[int, int],
        forward: Forward,
        logits: torch.Tensor,
        column: Column,
        rows: Sequence[Row],
        references: dict[tuple[int, int], torch.Tensor],
    ):
        self.picked = [(i, row) for i, row in enumerate(forward.rows) if row in slots]
        self.slots = [slots[row] for _, row in self.picked]
        self._all, self._column, self._rows, self._references = logits, column, rows, references
        self._logits: torch.Tensor | None = None
        self.metric: Any = None

    def __bool__(self) -> bool:
        return bool(self.picked)

    @property
    def logits(self) -> torch.Tensor:
        """The rows' logits at the metric's positions, float32: [n, vocab]."""
        if self._logits is None:
            device = self._all.device
            local = torch.tensor([i for i, _ in self.picked], device=device)
            positions = self.metric.positions
            pos = torch.tensor([self._column(positions[s]) for s in self.slots], device=device)
            self._logits = self._all[local, pos].float()
        return self._logits

    def token_ids(self, tokens: Tokens) -> torch.Tensor:
        """Each row's token ids, [n, len(tokens)]."""
        device = self._all.device
        if tokens.per_row:
            return torch.tensor([tokens.per_row[s] for s in self.slots], device=device)
        return torch.tensor([list(tokens.ids)] * len(self.slots), device=device)

    def pick(self, values: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """``values`` ([n, vocab]) at the metric's tokens: [n, len(tokens)]."""
        if tokens.per_row:
            return values.gather(1, self.token_ids(tokens))
        return values[:, list(tokens.ids)]

    def reference_logp(self, metric: Any) -> torch.Tensor:
        """The log-distributions each row is compared with (a kl's reference rows)."""
        pairs = [(metric.references[s], metric.reference_positions[s]) for s in self.slots]
        return torch.stack([self._references[pair] for pair in pairs]).to(self._all.device)

    def sequences(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per row: its logits at every position but the last, and the tokens they predict
        (None for a one-token row)."""
        device = self._all.device
        for i, row in self.picked:
            tokens = self._rows[row].tokens
            if len(tokens) < 2:
                yield self._all[i, :0], None
                continue
            cols = torch.tensor([self._column(p) for p in range(len(tokens) - 1)], device=device)
            yield self._all[i][cols], torch.tensor(tokens[1:], device=device)

    @staticmethod
    def stack(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values)

    @staticmethod
    def call_metric(fn: str, logits: torch.Tensor, metric: str) -> torch.Tensor:
        return call_metric(fn, logits, metric)


def read_metric(
    metric: Metric, batch: MetricBatch, buffers: dict[str, torch.Tensor]
) -> torch.Tensor | None:
    """Compute one metric for the rows of this forward into its result buffers (the values
    and, for kinds that have them, token ids); returns the values (None: no row read)."""
    if not batch:
        return None
    batch.metric = metric
    values, token_ids = metric.read(batch)
    index = torch.tensor(batch.slots)
    for name, tensor in ((metric.name, values), (f"{metric.name}/ids", token_ids)):
        if tensor is None:
            continue
        if name not in buffers:
            shape = (len(metric.rows), *tensor.shape[1:])  # type: ignore[attr-defined]
            buffers[name] = torch.empty(shape, dtype=tensor.dtype)
        buffers[name][index] = tensor.detach().cpu()
    return values


class AfterRun:
    """What the run left, for kinds computed after it (see
    :class:`specsight.plan.metrics.AfterRun`): stored values, the metrics so far, and the
    model's modules to decode with."""

    def __init__(
        self,
        store: dict[str, torch.Tensor],
        metrics: dict[str, torch.Tensor],
        modules: dict[str, torch.nn.Module] | None,
    ):
        self.store, self.metrics, self.modules = store, metrics, modules
        #: called between a circuit metric's forwards (a cancelled job stops there)
        self.checkpoint: Callable[[], None] | None = None

    def decode(self, hidden: list[torch.Tensor], modules: tuple[str, str]) -> torch.Tensor:
        """Residual streams ([positions, d_model] each) through the final norm and the
        unembedding: next-token probabilities, [positions, vocab]."""
        if self.modules is None:
            raise ValueError("decoding stored residuals needs the model's modules")
        norm, unembed = (self.modules[name] for name in modules)
        with torch.inference_mode():
            normed = norm(torch.cat(hidden).unsqueeze(0))
            weight = next(unembed.parameters(), None)
            if weight is not None:  # some norms (Mamba's) return float32 from bf16 inputs
                normed = normed.to(weight.dtype)
            return torch.softmax(unembed(normed)[0].float(), -1)

    def dla(
        self,
        values: dict[str, Any],
        *,
        token_ids: list[list[int]],
        modules: tuple[str, str, tuple[str, ...]],
        centered: bool,
        n_heads: int,
    ) -> dict[str, torch.Tensor]:
        """Direct logit attribution of stored parts of the residual stream (see engine.dla)."""
        if self.modules is None:
            raise ValueError("direct logit attribution needs the model's modules")
        norm, unembed, o_proj = modules
        found = (self.modules[norm], self.modules[unembed], [self.modules[m] for m in o_proj])
        return direct_attribution(values, token_ids, found, centered=centered, n_heads=n_heads)

    def _model(self, what: str) -> torch.nn.Module:
        if self.modules is None or "" not in self.modules:
            raise ValueError(f"{what} runs forwards of its own: it needs the model")
        return self.modules[""]

    def edge_scores(self, record: Any) -> torch.Tensor:
        """An edge_attribution metric's scores (see engine.circuit_metrics)."""
        return circuit_scores(self._model("edge attribution"), record, self.checkpoint)

    def faithfulness(self, record: Any, scores: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """A faithfulness metric's values (see engine.circuit_metrics)."""
        model = self._model("faithfulness")
        return circuit_faithfulness(model, record, scores, self.checkpoint)

    @staticmethod
    def probes(per_site: list[torch.Tensor], **fields: Any) -> dict[str, torch.Tensor]:
        """Linear probes trained on stored values (see engine.probe)."""
        return train_probes(per_site, **fields)

    @staticmethod
    def index(values: list[int], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, device=like.device)

    @staticmethod
    def stack(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values)

    @staticmethod
    def call_metric(fn: str, values: torch.Tensor, metric: str) -> torch.Tensor:
        return call_metric(fn, values, metric).cpu()

    @staticmethod
    def tensor(values: list[float]) -> torch.Tensor:
        return torch.tensor(values)

    @staticmethod
    def cat(values: list[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat(values, dim)


def to_host(store: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The store on the CPU, copied in one transfer per dtype rather than one per value (each
    device-to-host copy waits for the device)."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key, value in store.items():
        if value.device.type != "cpu":
            by_dtype.setdefault(value.dtype, []).append(key)
    if not by_dtype:
        return store
    out = dict(store)
    for keys in by_dtype.values():
        flat = torch.cat([store[key].detach().reshape(-1) for key in keys]).cpu()
        offset = 0
        for key in keys:
            size = store[key].numel()
            out[key] = flat[offset : offset + size].view(store[key].shape)
            offset += size
    return out


def assemble(
    keys: tuple[str, ...], shape: tuple[int, ...], store: dict[str, torch.Tensor]
) -> torch.Tensor:
    pieces = [
        store[key].float().cpu()
        if store[key].dtype in (torch.bfloat16, torch.float16)
        else store[key].cpu()
        for key in keys
    ]
    # pieces differ in positions (prompts of different lengths) and, for attention patterns,
    # in keys: pad every axis to the longest with NaN
    longest = [max(sizes) for sizes in zip(*(p.shape for p in pieces))]
    if len(pieces) == 1:
        stacked = pieces[0].unsqueeze(0)
    elif any(list(p.shape) != longest for p in pieces):
        padded = torch.full((len(pieces), *longest), float("nan"), dtype=pieces[0].dtype)
        for i, piece in enumerate(pieces):
            padded[(i, *(slice(0, n) for n in piece.shape))] = piece
        stacked = padded
    else:
        stacked = torch.stack(pieces)
    return stacked.reshape(*shape, *stacked.shape[1:]) if shape else stacked[0]
