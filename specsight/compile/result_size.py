"""What a run's files take besides the tensors' own bytes (torch-free): the safetensors header
(a JSON entry per tensor, its name included) and ``manifest.json`` (the spec's content, an entry
per tensor with its axes' values and labels, the prompts and next tokens of the summary).

Both are upper estimates from the spec and the tensor names, never measured after the fact: a
server refuses a job whose tensors fit but whose 1,500 long save names would not. The constants
are the bytes ``json.dumps(indent=2)`` writes for one item at the depth it sits in the manifest,
rounded up.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .. import spec as S

__all__ = ["header_bytes", "manifest_bytes"]

#: one tensor's safetensors header entry without its name: dtype, shape, offsets, quotes
_HEADER_ENTRY = 96
#: one manifest entry without its name and axes: kind, invoke, site, dtype, sha256, shape,
#: view, label, flags, each key on its own indented line
_MANIFEST_ENTRY = 896
#: one axis value and its label, each on its own line, indented
_AXIS_VALUE = 48
#: the manifest's fixed part: format, model, plan, versions, timings, dataset
_MANIFEST_FIXED = 8192
#: next tokens shown per prompt, the prompts that have them, bytes per shown token
_NEXT_TOKENS, _NEXT_PROMPTS, _NEXT_TOKEN_BYTES = 5, 16, 128
#: per new token of a generated row: its id and its share of the decoded text, indented
_GENERATED_TOKEN = 48


def header_bytes(names: Iterable[str]) -> int:
    """The safetensors header of tensors named ``names`` (plus its metadata)."""
    return 128 + sum(_HEADER_ENTRY + 2 * len(name.encode()) for name in names)


def manifest_bytes(
    spec: S.Spec,
    owners: Mapping[str, str],
    axis_sizes: Mapping[str, Sequence[int]],
    prompts: Mapping[str, Sequence[str]],
) -> int:
    """``manifest.json`` of a run of ``spec``: ``owners`` maps each tensor to the invoke whose
    axes it carries, ``axis_sizes`` each invoke to its result axes' sizes, ``prompts`` each
    invoke to its rendered prompts."""
    total = _MANIFEST_FIXED + _content_bytes(spec)
    per_invoke = {name: sum(sizes) * _AXIS_VALUE for name, sizes in axis_sizes.items()}
    for name, invoke in owners.items():
        total += _MANIFEST_ENTRY + 2 * len(name.encode()) + per_invoke.get(invoke, 0)
    for name, texts in prompts.items():
        total += sum(len(json.dumps(text)) + 16 for text in texts)
        invoke = spec.invokes[name]
        if not invoke.sweep:
            total += min(len(texts), _NEXT_PROMPTS) * _NEXT_TOKENS * _NEXT_TOKEN_BYTES
        if invoke.generate is not None:
            rows = len(texts) * max(1, _cells(axis_sizes.get(name, ())))
            total += rows * (256 + invoke.generate.max_new_tokens * _GENERATED_TOKEN)
    return total


def _cells(sizes: Sequence[int]) -> int:
    out = 1
    for size in sizes:
        out *= size
    return out


def _content_bytes(spec: S.Spec) -> int:
    """The spec as the manifest records it (as written, indented): its JSON text's length."""
    content: Any = spec.model_dump(
        mode="json", by_alias=True, exclude_none=True, exclude_unset=True
    )
    return len(json.dumps(content, indent=2, sort_keys=True).encode())
