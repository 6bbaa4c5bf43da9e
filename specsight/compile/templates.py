"""Templates over a dataset's columns (torch-free): the ``{name}`` placeholders of a string
(or of every string in lists and mappings), a row's values put in their place, and the fields
of ops and metrics whose templates take a row's values. ``{{`` and ``}}`` stand for literal
braces.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "METRIC_TEMPLATE_FIELDS",
    "TEMPLATE",
    "cell_text",
    "OP_TEMPLATE_FIELDS",
    "column_names",
    "render",
    "render_selector",
    "render_value",
]

#: op fields whose templates take a dataset row's values
OP_TEMPLATE_FIELDS = ("positions", "source_positions")
_NAME = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: a template's column placeholders, and its escaped braces
TEMPLATE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def column_names(text: Any) -> set[str]:
    """The ``{name}`` placeholders of a template, or of every string inside lists and mappings
    (literal ``{{`` and ``}}`` left out)."""
    if isinstance(text, list | tuple):
        return set().union(*(column_names(t) for t in text))
    if isinstance(text, dict):
        return set().union(*(column_names(t) for t in text.values()))
    if not isinstance(text, str):
        return set()
    return {m.group(1) for m in TEMPLATE.finditer(text) if m.group(1)}


def render(text: str, row: dict[str, Any]) -> str:
    """A template with the row's values in place of its column placeholders (others, and
    those of missing or null values, kept)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:  # an escaped brace
            return match.group(0)[0]
        value = row.get(name)  # a missing or null value is a located issue of its own
        return match.group(0) if value is None else cell_text(value)

    return TEMPLATE.sub(value, text)


def render_value(value: Any, row: dict[str, Any]) -> Any:
    """A token reference with the row's values in: a template that is exactly one placeholder
    of an integer column gives that integer (a token id), any other template a string."""
    if not isinstance(value, str):
        return value
    whole = _NAME.fullmatch(value)
    if whole and whole.group(1) in row and isinstance(row[whole.group(1)], int):
        return row[whole.group(1)]
    return render(value, row)


def cell_text(value: Any) -> str:
    """A dataset value as a template writes it: null as nothing, booleans as JSON does."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


#: metric fields whose templates take a dataset row's values
METRIC_TEMPLATE_FIELDS = ("position", "target", "foil", "token", "tokens", "label")


def render_selector(selector: Any, row: dict[str, Any]) -> Any:
    """A position selector (plain data) with the row's values in: in a token's text, or as
    the selector itself (``"{subj_last}"``: the item's position, an integer or a string such
    as ``"0:4"`` or ``"-1"``)."""
    if isinstance(selector, list):
        return [render_selector(s, row) for s in selector]
    if isinstance(selector, dict) and isinstance(selector.get("token"), str):
        return {**selector, "token": render(selector["token"], row)}
    if isinstance(selector, str) and column_names(selector) & set(row):
        return render_value(selector.strip(), row)
    return selector
