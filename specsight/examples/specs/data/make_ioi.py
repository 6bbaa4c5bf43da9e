"""Generate ``specs/data/ioi.jsonl``: 64 indirect-object-identification (IOI) prompt pairs.

Each row has a ``clean`` prompt ("When Mary and John went to the store, John gave a drink to",
answer `` Mary``) and a ``corrupt`` one with the second mention of the subject replaced by the
indirect object ("..., Mary gave a drink to", so the model now prefers `` John``), plus ``io``,
``s`` (the two names, with their leading space), ``place``, ``object`` and ``template`` (index).

Every name, place and object is a single token for SmolLM2-135M, and every prompt, clean and
corrupt, is 14 tokens with the names, place, object and last token at the same positions in all
templates. The script checks this against the model's tokenizer before writing. The output is
deterministic (``random.Random(0)``); rerun from the repository root with::

    .venv/bin/python specs/data/make_ioi.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("ioi.jsonl")
N_ROWS = 64
N_TOKENS = 14

TEMPLATES = [
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "Then {A} and {B} went to the {place}. {S} gave a {object} to",
    "After {A} and {B} arrived at the {place}, {S} handed a {object} to",
    "While {A} and {B} were at the {place}, {S} passed a {object} to",
]
NAMES = [
    "Mary", "John", "Alice", "Bob", "Sarah", "James", "Emma", "Michael", "Anna", "David",
    "Laura", "Daniel", "Kate", "Tom", "Lisa", "Mark", "Rachel", "Paul", "Julia", "Kevin",
    "Helen", "Peter", "Grace", "Eric",
]  # fmt: skip
PLACES = [
    "store", "school", "park", "office", "station", "hospital", "restaurant", "garden",
    "beach", "library", "market", "museum",
]  # fmt: skip
OBJECTS = [
    "drink", "book", "ring", "letter", "gift", "pen", "key", "ball", "phone", "cake", "bag",
    "ticket",
]  # fmt: skip


def make_rows(n: int = N_ROWS, seed: int = 0) -> list[dict[str, str | int]]:
    """``n`` distinct rows, cycling through the templates; ABB and BAB orders alternate."""
    rng = random.Random(seed)
    rows: list[dict[str, str | int]] = []
    seen: set[str] = set()
    while len(rows) < n:
        t = len(rows) % len(TEMPLATES)
        io, s = rng.sample(NAMES, 2)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        a, b = (io, s) if (len(rows) // len(TEMPLATES)) % 2 == 0 else (s, io)
        fill = {"A": a, "B": b, "place": place, "object": obj}
        clean = TEMPLATES[t].format(S=s, **fill)
        if clean in seen:
            continue
        seen.add(clean)
        corrupt = TEMPLATES[t].format(S=io, **fill)
        rows.append(
            {"clean": clean, "corrupt": corrupt, "io": f" {io}", "s": f" {s}",
             "place": place, "object": obj, "template": t}
        )  # fmt: skip
    return rows


def check(rows: list[dict[str, str | int]]) -> None:
    """Every word is one token and every pair is ``N_TOKENS`` long, differing in one position."""
    from specsight.models.load.loader import load_model

    tok = load_model("smollm2-135m").tokenizer
    for word in NAMES + PLACES + OBJECTS:
        if len(tok.encode_plain(f" {word}")) != 1:
            raise SystemExit(f"' {word}' is not one token: pick another word")
    for row in rows:
        clean, corrupt = tok.encode(str(row["clean"])), tok.encode(str(row["corrupt"]))
        if not len(clean) == len(corrupt) == N_TOKENS:
            raise SystemExit(f"not {N_TOKENS} tokens: {row}")
        diff = [i for i, (x, y) in enumerate(zip(clean, corrupt)) if x != y]
        if len(diff) != 1 or tok.token_strs([corrupt[diff[0]]]) != [row["io"]]:
            raise SystemExit(f"the pair differs in more than the second name: {row}")


def main() -> None:
    rows = make_rows()
    check(rows)
    OUT.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
