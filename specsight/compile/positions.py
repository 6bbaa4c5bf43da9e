"""Position selectors resolved against a prompt's real tokens (torch-free).

Selectors: an int (negative counts from the end), ``"all"``, ``"first"``, ``"last"``, an index
or slice written as a string (``"-2"``, ``"3:"``, ``"::2"``), or ``{token: " John", occurrence: 2}``
(every token of the text, or ``part: first | last`` of them).
Positions always index real tokens: padding added for batching is never selected.
"""

from __future__ import annotations

import re
from typing import Any

from ..models import Tokenizer

__all__ = ["PositionError", "resolve_positions", "resolve_position"]

_INT = re.compile(r"^-?\d+$")
_SLICE = re.compile(r"^(-?\d*):(-?\d*)(?::(-?\d+))?$")


class PositionError(ValueError):
    """A selector that does not fit the prompt."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


def _index(value: int, n: int) -> int:
    if not -n <= value < n:
        raise PositionError(
            f"position {value} is out of range for a prompt of {n} tokens",
            f"use 0..{n - 1}, or -1..-{n} from the end",
        )
    return value % n


def _token_positions(
    selector: dict[str, Any], tokens: list[int], tokenizer: Tokenizer
) -> list[int]:
    text = selector["token"]
    occurrence = selector.get("occurrence", 1)
    if not getattr(tokenizer, "has_text", True):
        raise PositionError(
            f"cannot search for token {text!r}: this model's inputs are not text",
            "give positions as numbers (for images, 0 is the class token and 1.. the patches)",
        )
    needle = tokenizer.encode_plain(text)
    if not needle:
        raise PositionError(f"token {text!r} encodes to no tokens")
    matches = [
        i for i in range(len(tokens) - len(needle) + 1) if tokens[i : i + len(needle)] == needle
    ]
    if not matches:
        shown = " ".join(repr(t) for t in tokenizer.token_strs(tokens))
        raise PositionError(
            f"token {text!r} does not occur in the prompt",
            f"the prompt's tokens are {shown}",
        )
    if not -len(matches) <= (occurrence - 1 if occurrence > 0 else occurrence) < len(matches):
        count = "only once" if len(matches) == 1 else f"only {len(matches)} times"
        choices = (
            "1 or -1"
            if len(matches) == 1
            else f"1..{len(matches)}, or -1..-{len(matches)} from the end"
        )
        raise PositionError(
            f"token {text!r} occurs {count} in the prompt; there is no occurrence {occurrence}",
            f"use occurrence {choices}",
        )
    start = matches[occurrence - 1] if occurrence > 0 else matches[occurrence]
    span = list(range(start, start + len(needle)))
    part = selector.get("part", "all")
    return span[:1] if part == "first" else span[-1:] if part == "last" else span


def resolve_position(selector: Any, tokens: list[int], tokenizer: Tokenizer) -> list[int]:
    """Positions selected by one selector, in order."""
    n = len(tokens)
    if isinstance(selector, bool):
        raise PositionError(f"{selector!r} is not a position")
    if isinstance(selector, int):
        return [_index(selector, n)]
    if isinstance(selector, dict):
        return _token_positions(selector, tokens, tokenizer)
    text = str(selector).strip()
    if text == "all":
        return list(range(n))
    if text == "last":
        return [n - 1]
    if text == "first":
        return [0]
    if _INT.match(text):
        return [_index(int(text), n)]
    match = _SLICE.match(text)
    if match:
        start, stop, step = (int(g) if g else None for g in match.groups())
        if step == 0:
            raise PositionError("slice step cannot be 0")
        picked = list(range(n))[slice(start, stop, step)]
        if not picked:
            raise PositionError(f"slice '{text}' selects no position of a {n}-token prompt")
        return picked
    if text.startswith("{") and text.endswith("}"):
        raise PositionError(
            f"placeholder '{text}' names no sweep variable",
            "declare it under the invoke's 'sweep:'",
        )
    raise PositionError(
        f"'{text}' is not a position",
        "use an integer, 'all', 'first', 'last', a slice such as '2:5', or {token: ' John'}",
    )


def resolve_positions(selectors: Any, tokens: list[int], tokenizer: Tokenizer) -> list[int]:
    """Positions selected by one selector or a list of them (duplicates removed, order kept)."""
    items = selectors if isinstance(selectors, list) else [selectors]
    out: list[int] = []
    for item in items:
        for pos in resolve_position(item, tokens, tokenizer):
            if pos not in out:
                out.append(pos)
    return out
