"""The compiler's working state, shared by its passes: the spec and model it compiles against,
the rows and ops built so far, stored values, and the issues collected on the way.

A pass records a problem with :meth:`Context.fail` (located through the spec's source map) and
raises the :class:`Abort` it returns to give up on one op or metric; the compiler raises every
issue at once between passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import spec as S
from ..errors import MAX_ISSUES, Issue, did_you_mean
from ..models import ModelInfo, Tokenizer
from ..plan import (
    DatasetInfo,
    InputKey,
    InputTensor,
    InvokeRef,
    Op,
    Row,
    SaeInfo,
    SaeRef,
    VectorKey,
)
from ..plan.ops import Capture
from ..sites import SaeSites
from .sweep import Grid

__all__ = [
    "SpecPath",
    "Abort",
    "Items",
    "SpecContext",
    "Context",
    "plain",
    "default_save_name",
]

SpecPath = tuple[Any, ...]


class Abort(Exception):
    """Raised inside one op or metric after its issue is recorded."""


@dataclass(frozen=True)
class Items:
    """The rows an experiment runs over, after sampling; values as the file gave them."""

    rows: tuple[dict[str, Any], ...]
    columns: tuple[str, ...]
    #: the row numbers (from 0) of ``rows`` in the dataset
    indices: Sequence[int]
    total: int
    sha256: str
    file: str | None
    #: a window of the items (a block of a run in blocks): the item number of ``rows[0]``
    offset: int = 0
    #: the window's whole: what :meth:`describe` reports (None: these items are the whole)
    whole: Items | None = None

    def describe(self, invokes: tuple[str, ...] = ()) -> DatasetInfo:
        """What the manifest records of the dataset (of the whole, for a window), and the
        invokes that run over it."""
        if self.whole is not None:
            return self.whole.describe(invokes)
        return DatasetInfo(
            file=self.file,
            sha256=self.sha256,
            rows=self.total,
            columns=tuple(self.columns),
            used=len(self.rows),
            sample=None if len(self.rows) == self.total else tuple(self.indices),
            invokes=tuple(InvokeRef(name) for name in invokes),
        )

    def window(self, start: int, stop: int) -> Items:
        """Items ``start`` to ``stop`` (item numbers, labels and seeds stay those of the whole)."""
        whole = self.whole or self
        start, stop = start + self.offset, stop + self.offset
        return Items(
            whole.rows[start:stop],
            whole.columns,
            whole.indices[start:stop],
            whole.total,
            whole.sha256,
            whole.file,
            offset=start,
            whole=whole,
        )


@dataclass(kw_only=True)
class SpecContext:
    """What checks that need no model work with: the spec, its document, the save names found
    and the issues collected."""

    spec: S.Spec
    doc: S.LoadedDoc
    issues: dict[tuple[SpecPath, str], Issue] = field(default_factory=dict)
    #: save name -> (invoke, op index)
    save_names: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: the dataset's rows (after sampling), when the spec has one
    items: Items | None = None
    #: items read before compiling (a block of a run in blocks): used instead of the dataset
    given_items: Items | None = None
    #: the invokes that run once per dataset row (their prompt names a column)
    item_invokes: set[str] = field(default_factory=set)

    def input_axis(self, invoke: str) -> str | None:
        """The result axis an invoke's inputs make: ``item`` (a dataset's rows), ``prompt``
        (a list of prompts, images or a tensor file's rows), or None (one input)."""
        if invoke in self.item_invokes:
            return "item"
        return "prompt" if self.spec.invokes[invoke].many_inputs else None

    def fail(self, code: str, message: str, path: SpecPath, hint: str | None = None) -> Abort:
        """Record a located issue (once per path and message); returns the Abort to raise."""
        key = (path, message)
        if key not in self.issues and len(self.issues) < MAX_ISSUES:
            line, col = self.doc.source.locate(path)
            self.issues[key] = Issue(code, message, path, self.doc.file, line, col, hint)
        return Abort()


@dataclass(kw_only=True)
class Context(SpecContext):
    """Everything one compilation against a model knows and has built so far."""

    info: ModelInfo
    tok: Tokenizer
    allow_files: bool = True
    tokens: dict[str, list[list[int]]] = field(default_factory=dict)
    grids: dict[str, Grid] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    row_index: dict[tuple[str, int, int], int] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    captures: dict[str, Capture] = field(default_factory=dict)
    vectors: dict[VectorKey, tuple[float, ...]] = field(default_factory=dict)
    #: image and tensor inputs; per invoke, each row's key and a name to show for it (the
    #: file, or file[i])
    inputs: dict[InputKey, InputTensor] = field(default_factory=dict)
    input_keys: dict[str, list[str]] = field(default_factory=dict)
    input_names: dict[str, list[str]] = field(default_factory=dict)
    #: the spec's SAEs (the plan's), and what resolving their sites needs
    saes: dict[SaeRef, SaeInfo] = field(default_factory=dict)
    sae_sites: dict[str, SaeSites] = field(default_factory=dict)
    save_keys: dict[str, list[str]] = field(default_factory=dict)
    save_npos: dict[str, list[int]] = field(default_factory=dict)
    #: each row's selected positions of a save, in the order of its keys
    save_positions: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    save_meta: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: the widths (heads flattened) a save's values have at its sites, where known
    save_widths: dict[str, set[int | None]] = field(default_factory=dict)
    #: save name -> (axes of each row's value, the values along them every row shares)
    save_layout: dict[str, tuple[tuple[str, ...], dict[str, list[int]]]] = field(
        default_factory=dict
    )
    _plain_ids: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def token_id(self, ref: str | int, path: SpecPath, where: str = "") -> int:
        """The vocabulary id of a metric's token (text or id; a class label for classifiers).
        ``where`` starts the message of an issue (``"item 3 (...): "``)."""
        if isinstance(ref, int):
            if self.info.vocab_size and ref >= self.info.vocab_size:  # 0: unknown (factory models)
                raise self.fail(
                    "bad-token",
                    f"{where}token id {ref} is outside the vocabulary of "
                    f"{self.info.vocab_size} tokens",
                    path,
                    f"ids go from 0 to {self.info.vocab_size - 1}",
                )
            return ref
        ids = self._plain_ids.get(ref)
        if ids is None:  # a dataset's answer tokens repeat across its items
            ids = self._plain_ids.setdefault(ref, self.tok.encode_plain(ref))
        if not self.tok.has_text and len(ids) != 1:
            labels = list(getattr(self.tok, "labels", []))
            hint = (did_you_mean(ref, labels) or "labels: " + ", ".join(labels)) if labels else None
            raise self.fail(
                "bad-token",
                f"{where}no output class is labelled {ref!r}",
                path,
                hint or "this model's outputs have no labels: give a class index (an integer)",
            )
        if len(ids) != 1:
            pieces = " + ".join(repr(t) for t in self.tok.token_strs(ids)) or "nothing"
            raise self.fail(
                "multi-token",
                f"{where}{ref!r} is {len(ids)} tokens, {pieces}; a metric needs one token",
                path,
                "use a single token, often with a leading space such as ' Paris', or a token id",
            )
        return ids[0]


def plain(value: Any) -> Any:
    """A position selector as plain data (token selectors as mappings), for the resolvers."""
    if isinstance(value, S.TokenSelector):
        return value.model_dump()
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def default_save_name(invoke: str, site: str, grad: bool = False) -> str:
    """A save's result name when the op gives none: ``invoke/site`` (``/grad`` for gradients)."""
    return f"{invoke}/{site}" + ("/grad" if grad else "")
