"""Generate ``specs/data/sentiment.jsonl``: 192 short reviews, half positive, half negative.

Each row has a ``text`` ("The film was wonderful, so we walked home afterwards"), its
``sentiment`` (``positive`` or ``negative``), the ``word`` that carries it and the ``template``
(index). The sentiment word sits mid-sentence, so the last token (where a probe reads) holds it
only once attention has moved it there; a probe split by ``word`` is tested on words it never
saw. Every template is used with every word once; the rows are shuffled with
``random.Random(0)`` (deterministic). Rerun from the repository root with::

    .venv/bin/python specs/data/make_sentiment.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("sentiment.jsonl")

POSITIVE = ["wonderful", "great", "lovely", "excellent", "delightful", "superb", "pleasant", "brilliant", "fantastic", "charming", "enjoyable", "perfect"]  # fmt: skip
NEGATIVE = ["terrible", "awful", "dreadful", "horrible", "boring", "miserable", "poor", "disappointing", "unpleasant", "dull", "annoying", "painful"]  # fmt: skip
TEMPLATES = [
    "The film was {w}, so we walked home afterwards",
    "Our dinner at the cafe was {w} and then we took the bus",
    "The concert last night was {w}; after it we went to bed",
    "My week at the office was {w}, and tomorrow is Monday",
    "The book I read was {w}, and I put it on the shelf",
    "The hotel was {w} and we checked out at noon",
    "That game was {w}, then everyone went back to work",
    "The trip to the coast was {w}, and we drove back on Sunday",
]


def main() -> None:
    rows = [
        {"text": t.format(w=w), "sentiment": label, "word": w, "template": i}
        for i, t in enumerate(TEMPLATES)
        for label, words in (("positive", POSITIVE), ("negative", NEGATIVE))
        for w in words
    ]
    random.Random(0).shuffle(rows)
    OUT.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
