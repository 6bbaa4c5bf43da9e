"""One batched forward of a plan: inputs (token ids, image pixels or tensors) in, logits out.

Text rows are padded on the right with an attention mask; image and tensor rows are stacked
(they share one shape). The logits come from whatever the model returns: ``.logits``, a plain
tensor, or a tuple's first element; a classifier's ``[batch, classes]`` is read as one position.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..errors import RunError
from ..plan import Forward, Plan

__all__ = ["Forwards", "RowInputs"]


class Forwards:
    """Runs a plan's forwards on a model: inputs (token ids, image pixels or tensors) in,
    logits out."""

    def __init__(self, plan: Plan, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, pad_id: int):  # fmt: skip
        self.plan, self.model, self.device, self.pad_id = plan, model, device, pad_id
        self.keep_supported = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.inputs = RowInputs(plan, dtype)

    def run(
        self,
        forward: Forward,
        late: dict[str, Any] | None = None,
        start: int = 0,
        model: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, Callable[[int], int]]:
        """Run one forward; returns its logits and a map from position to logits column.
        ``late`` (with ``start``): the cache and positions of a ``from_base`` forward that
        starts at position ``start`` (:mod:`.reuse`); ``model``: what to call instead of the
        model (its stand-in that skips the layers below the forward's first). A forward with a
        shared prefix runs its first row only up to the layer where the rows differ (the
        runner expands it there)."""
        column: Callable[[int], int] = int
        try:
            if self.plan.model_summary.get("inputs", "text") != "text":
                output = self._other(forward)
            else:
                output, column = self._text(forward, late, start, model or self.model)
        except torch.OutOfMemoryError:
            raise RunError(
                f"out of memory in a forward of {len(forward.rows)} rows x {forward.seq_len} tokens",
                hint="lower --max-batch",
            ) from None
        logits = _logits_of(output)
        if logits.shape[0] != len(forward.rows):
            raise RunError(f"the model returned {logits.shape[0]} rows for {len(forward.rows)}")
        if logits.dim() == 2:  # one output per row (a classifier): every position reads it
            return logits[:, None], lambda _pos: 0
        return logits, column

    def _other(self, forward: Forward) -> Any:
        """An image or tensor forward: the rows' inputs stacked."""
        batch = torch.stack([self.inputs.get(self.plan.rows[row].input) for row in forward.rows])
        if forward.shared_prefix:  # identical rows: one runs
            batch = batch[:1]
        batch = batch.to(self.device)
        if self.plan.model_summary.get("inputs") == "image":
            return self.model(pixel_values=batch)
        return self.model(batch)

    def _text(
        self, forward: Forward, late: dict[str, Any] | None, start: int, model: torch.nn.Module
    ) -> tuple[Any, Callable[[int], int]]:
        column: Callable[[int], int] = int
        ids = torch.full((len(forward.rows), forward.seq_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(forward.rows):
            tokens = self.plan.rows[row].tokens
            ids[i, : len(tokens)] = torch.tensor(tokens)
            mask[i, : len(tokens)] = 1
        if forward.shared_prefix:  # the layers below it run on one row
            ids, mask = ids[:1], mask[:1]
        kwargs: dict[str, Any] = {"use_cache": False}
        if late is not None:  # the earlier positions' keys and values are in the cache
            ids = ids[:, start:]
            kwargs.update(late)
            column = lambda pos: pos - start  # noqa: E731
        if forward.keep_logits is not None and self.keep_supported:
            kept = [pos - start for pos in forward.keep_logits]
            kwargs["logits_to_keep"] = torch.tensor(kept, device=self.device)
            column = {pos: j for j, pos in enumerate(forward.keep_logits)}.__getitem__
        output = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        return output, column


def _logits_of(output: Any) -> torch.Tensor:
    """The output tensor metrics read: ``.logits`` of a model output, a plain tensor, or the
    first element of a tuple (models built by a factory return any of these)."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, tuple | list) and output:
        logits = output[0]
    if logits is None:
        logits = output
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise RunError(
            f"the model's output is {shape}; metrics need [batch, classes] or "
            "[batch, positions, vocabulary]",
            hint="return logits from the model (or a tuple whose first element they are)",
        )
    return logits


class RowInputs:
    """Row inputs (image pixels, tensors) of a plan as tensors, converted once."""

    def __init__(self, plan: Plan, dtype: torch.dtype):
        self.plan, self.dtype = plan, dtype
        self.cache: dict[str, torch.Tensor] = {}

    def get(self, key: str | None) -> torch.Tensor:
        if key is None:
            raise RunError("a row of a model without text inputs has no input")
        if key not in self.cache:
            entry = self.plan.inputs[key]
            is_int = entry.dtype == "int64"
            tensor = torch.tensor(entry.values, dtype=torch.long if is_int else torch.float32)
            tensor = tensor.reshape(entry.shape)
            self.cache[key] = tensor if is_int else tensor.to(self.dtype)
        return self.cache[key]
