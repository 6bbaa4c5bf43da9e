"""Seeded mutations of the example specs, for fuzzing the loader, validation and compiler:
values of the wrong type (unicode, huge and non-finite numbers, nesting), renamed, removed and
duplicated keys, YAML anchors, aliases and tags, raw byte damage, column templates in specs
with and without a dataset, and damaged dataset rows (missing, null, nested, lone surrogates,
huge). The same seed gives the
same case (tests/test_fuzz.py draws seeds with hypothesis; bench/fuzz_specs.py runs 10,000).

``check_case`` loads and compiles one mutated text against its model's shapes (no weights) and
says what happened: ``ok``, a located ``spec-error``, or anything else (a failure).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from specsight.compile import Budget, compile_plan
from specsight.errors import SpecError
from specsight.spec import load_text, validate_spec

SPECS = Path(__file__).resolve().parent.parent / "specs"
EXAMPLES = sorted(p.name for p in SPECS.glob("*.yaml"))

_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**70,
    10**400,
    1e308,
    float("inf"),
    float("nan"),
    "",
    " Mary",
    "é" * 50,
    "\u202e\x00\ud7ff",
    "{layer}",
    "{nope}",
    "{io}",
    "{clean}",
    "{prompt}",
    "{subject}",
    "x {s} and {io}",
    "resid_pots.3",
    "model.layers.99.mlp",
    "0:10000000000",
    "all",
    [],
    [1, "a", None],
    {},
    {"token": " John", "occurrence": 0},
    {"saved": "x/y.*", "reduce": "mean"},
    {"mean_diff": ["love/resid_post.6", "x"], "norm": "match_site"},
    {"file": "../../etc/passwd"},
    [[[[[[[[[[1]]]]]]]]]],
]
_KEYS = ["specsight", "model", "invokes", "metrics", "op", "site", "positions", "sweep", "from",
         "kind", "invoke", "target", "foil", "generate", "steps", "heads", "expect", "where"]  # fmt: skip


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, path + (i,))
    return out


def _get(node: Any, path: tuple) -> Any:
    for part in path:
        node = node[part]
    return node


def _mutate_data(rng: random.Random, data: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(data) if p]
        path = rng.choice(paths)
        parent, last = _get(data, path[:-1]), path[-1]
        action = rng.randrange(5)
        if action == 0:  # a value of another kind
            parent[last] = copy.deepcopy(rng.choice(_VALUES))
        elif action == 1 and isinstance(parent, dict):  # a typo'd or foreign key
            value = parent.pop(last)
            key = str(last)
            parent[rng.choice([key[:-1] or "x", key + "s", rng.choice(_KEYS), key.upper()])] = value
        elif action == 2 and isinstance(parent, dict):  # a key removed
            parent.pop(last)
        elif action == 3:  # nested deeper, or repeated
            parent[last] = (
                [parent[last]] * rng.randint(1, 3) if rng.random() < 0.5 else {"x": parent[last]}
            )
        else:  # a list grown large
            parent[last] = [copy.deepcopy(parent[last]) for _ in range(rng.randint(2, 200))]
    return data


#: values a damaged dataset row may hold in place of a column's
_ROW_VALUES: list[Any] = [None, "", " Mary", "\ud800", 3, 2**70, 1.5, True, [1], {"a": 1},
                          "x" * 5000, "{io}", "When Mary and John went to the store, {s} gave"]  # fmt: skip


def _dataset_rows(rng: random.Random, data: dict[str, Any]) -> dict[str, Any]:
    """The spec with inline dataset rows over the columns its templates name, some damaged."""
    from specsight.compile.dataset import column_names

    columns = sorted(column_names(data)) or ["prompt"]
    good = {c: f" {c.capitalize()}" for c in columns}
    rows = []
    for _ in range(rng.randint(1, 12)):
        row = dict(good)
        for _ in range(rng.randint(0, 2)):
            column = rng.choice(columns)
            if rng.random() < 0.3:
                row.pop(column, None)
            else:
                row[column] = copy.deepcopy(rng.choice(_ROW_VALUES))
        rows.append(row)
    data = copy.deepcopy(data)
    data["dataset"] = {"rows": rows} if rng.random() < 0.8 else rows
    return data


def _mutate_text(rng: random.Random, text: str) -> str:
    action = rng.randrange(6)
    lines = text.splitlines(keepends=True)
    if action == 0 and lines:  # an anchor and an alias
        i = rng.randrange(len(lines))
        return (
            text + "\nx: &a [1, 2]\ny: *a\n"
            if rng.random() < 0.5
            else "".join(lines[:i] + ["z: !!python/object:os.system x\n"] + lines[i:])
        )
    if action == 1:  # raw bytes damaged
        data = bytearray(text.encode("utf-8"))
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        return data.decode("utf-8", errors="surrogateescape")
    if action == 2 and lines:  # a line dropped or duplicated
        i = rng.randrange(len(lines))
        return "".join(
            lines[:i] + lines[i + 1 :]
            if rng.random() < 0.5
            else lines[:i] + [lines[i]] * 2 + lines[i:]
        )
    if action == 3:  # indentation broken
        return (
            text.replace("  ", "\t", 1) if rng.random() < 0.5 else text.replace("\n  ", "\n   ", 2)
        )
    if action == 4:  # deep nesting
        depth = rng.randint(10, 120)
        return text + "\nname: " + "[" * depth + "]" * depth + "\n"
    return text + rng.choice(["\n---\nspecsight: 1\n", "\n: x\n", "\n{\n", "\n'unterminated\n"])


def mutated(seed: int, example: str) -> str:
    """The text of one mutated example spec (the same for the same seed)."""
    rng = random.Random(seed)
    text = (SPECS / example).read_text(encoding="utf-8")
    data = original = yaml.safe_load(text)
    if rng.random() < 0.6:
        data = _mutate_data(rng, data)
    if rng.random() < 0.15 and isinstance(data, dict):
        data = _dataset_rows(rng, data)
    if data is not original:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if rng.random() < 0.5:
        text = _mutate_text(rng, text)
    return text


@dataclass
class Outcome:
    kind: str  # "ok", "spec-error" or "failure"
    seconds: float
    detail: str = ""


def check_case(text: str, infos: dict[str, Any]) -> Outcome:
    """Load, validate and compile ``text`` against its model's shapes (``infos``: model id ->
    (ModelInfo, tokenizer); others compile against the built-in's); every SpecError must name
    where its issues are."""
    started = time.perf_counter()
    try:
        doc = replace(load_text(text, file="fuzz.yaml", fmt="yaml"), base_dir=str(SPECS))
        spec = validate_spec(doc)
        info, tok = infos.get(spec.model.id) or infos["smollm2-135m"]
        compile_plan(spec, info, tok, doc=doc, budget=Budget(max_cells=20_000))
        kind, detail = "ok", ""
    except SpecError as exc:
        unlocated = [i for i in exc.issues if not (i.message and (i.line or i.path or i.file))]
        kind = "failure" if unlocated else "spec-error"
        detail = exc.render()[:300]
    except RecursionError as exc:
        kind, detail = "failure", f"RecursionError: {exc}"
    except Exception as exc:  # anything else is a bug the fuzzer found
        kind, detail = "failure", f"{type(exc).__name__}: {exc}"[:300]
    return Outcome(kind, time.perf_counter() - started, detail)
