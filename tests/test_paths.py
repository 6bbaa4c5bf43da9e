"""Path patching (``op: path_patch``) against a hand-written two-stage implementation on a
split-residual forward (tests/circuit_reference.py): one sender to one receiver, several at
once, swept over senders and items, on tiny GPT-2 and Llama models and the built-in model."""

from __future__ import annotations

import pytest

import specsight
from specsight.errors import SpecError
from tests import circuit_reference as ref
from tests.conftest import CLEAN, CORRUPT, tiny

FAMILIES = ["tiny-llama", "tiny-gpt2"]
SECOND_CLEAN = "When Tom and Anna went to the park, Anna gave a ball to"
SECOND_CORRUPT = "When Tom and Anna went to the park, Tom gave a ball to"


def _spec(op: dict, *, two: bool = False, sweep: dict | None = None) -> dict:
    clean = [CLEAN, SECOND_CLEAN] if two else CLEAN
    corrupt = [CORRUPT, SECOND_CORRUPT] if two else CORRUPT
    patched: dict = {"prompt": corrupt, "ops": [{"op": "path_patch", "from": "clean", **op}]}
    if sweep:
        patched["sweep"] = sweep
    return {
        "specsight": 1,
        "model": "in-memory",
        "invokes": {"clean": {"prompt": clean}, "corrupt": {"prompt": corrupt}, "patched": patched},
        "metrics": {
            "ld": {"kind": "logit_diff", "invoke": "patched", "target": " Mary", "foil": " John"}
        },  # fmt: skip
    }


def _reference(lm, clean: str, corrupt: str, senders: list[str], receivers: list[str]) -> float:
    target, foil = lm.tokenizer.encode(" Mary")[0], lm.tokenizer.encode(" John")[0]
    base, source = lm.tokenizer.encode(corrupt), lm.tokenizer.encode(clean)
    return ref.path_patch_reference(lm, base, source, senders, receivers, target, foil, -1)


CASES = {
    "one-to-one": (["head.0.1"], ["head.2.0.q"]),
    "to-the-logits": (["head.1.3"], ["logits"]),
    "several": (["embed", "head.0.1", "mlp.1"], ["head.2.0.q", "head.3.1.v", "mlp.2", "logits"]),
    "key-and-mlp": (["head.1.0", "head.2.2"], ["head.3.0.k", "mlp.2"]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", FAMILIES)
def test_path_patching_equals_a_hand_written_two_stage_implementation(name, case):
    lm = tiny(name)
    senders, receivers = CASES[case]
    out = specsight.run(_spec({"senders": senders, "receivers": receivers}), model=lm)
    expected = _reference(lm, CLEAN, CORRUPT, senders, receivers)
    assert float(out.metrics["ld"]) == pytest.approx(expected, abs=1e-5 * (1 + abs(expected)))


def test_a_sweep_over_senders_and_items_equals_each_cell_alone():
    lm = tiny("tiny-llama")
    op = {"senders": ["head.{layer}.{head}"], "receivers": ["logits", "mlp.3"]}
    out = specsight.run(_spec(op, two=True, sweep={"layer": [0, 2], "head": "all"}), model=lm)
    values = out.metrics["ld"]  # [layer, head, prompt]
    assert tuple(values.shape) == (2, 4, 2)
    for i, layer in enumerate([0, 2]):
        for head in range(4):
            for p, (clean, corrupt) in enumerate(((CLEAN, CORRUPT), (SECOND_CLEAN, SECOND_CORRUPT))):  # fmt: skip
                expected = _reference(lm, clean, corrupt, [f"head.{layer}.{head}"], op["receivers"])  # fmt: skip
                got = float(values[i, head, p])
                assert got == pytest.approx(expected, abs=1e-5 * (1 + abs(expected))), (layer, head, p)  # fmt: skip


def test_path_patching_one_edge_equals_ablating_that_edge():
    """On the clean run, path patching head.0.1 -> head.2.0.v from the corrupt run is the
    faithfulness run with every edge but that one kept."""
    lm = tiny("tiny-gpt2")
    spec = _spec({"senders": ["head.0.1"], "receivers": ["head.2.0.v"]})
    spec["invokes"]["patched"]["prompt"] = CLEAN
    spec["invokes"]["patched"]["ops"][0]["from"] = "corrupt"
    spec["invokes"]["patched"]["ops"][0]["base"] = "clean"
    kept = [e for e in ref.edge_names(lm) if e != "head.0.1->head.2.0.v"]
    pair = {"clean": "clean", "corrupt": "corrupt", "target": " Mary", "foil": " John"}
    spec["metrics"]["faith"] = {"kind": "faithfulness", **pair, "circuit": {"edges": kept}}
    out = specsight.run(spec, model=lm)
    patched, ablated = float(out.metrics["ld"]), float(out.metrics["faith/circuit"][0])
    assert patched == pytest.approx(ablated, abs=1e-5 * (1 + abs(ablated)))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("senders", "receivers"),
    [
        (["head.20.0"], ["head.23.3.q"]),
        (["head.9.4", "head.10.7"], ["head.14.3.q", "head.23.1.v", "logits"]),
    ],
    ids=["one-to-one", "several"],
)
def test_path_patching_on_the_builtin_model(smollm, senders, receivers):
    out = specsight.run(_spec({"senders": senders, "receivers": receivers}), model=smollm)
    expected = _reference(smollm, CLEAN, CORRUPT, senders, receivers)
    assert float(out.metrics["ld"]) == pytest.approx(expected, abs=1e-4 * (1 + abs(expected)))


@pytest.mark.parametrize(
    ("op", "message", "where"),
    [
        (
            {"senders": ["head.2.0"], "receivers": ["head.1.0.q"]},
            "reads before any sender writes",
            "receivers[0]",
        ),  # fmt: skip
        ({"senders": ["head.0.0"], "receivers": ["head.3.1"]}, "is an output", "receivers[0]"),
        ({"senders": ["head.0.0.q"], "receivers": ["logits"]}, "is an input", "senders[0]"),
        ({"senders": ["head.0.9"], "receivers": ["logits"]}, "no node 'head.0.9'", "senders[0]"),
        (
            {"senders": ["head.0.0"], "receivers": ["logits"], "base": "nope"},
            "no invoke named 'nope'",
            "base",
        ),  # fmt: skip
        (
            {"senders": ["head.0.0"], "receivers": ["logits"], "heads": [1]},
            "takes no 'heads'",
            "ops[0]",
        ),  # fmt: skip
    ],
)
def test_bad_path_patches_are_located_errors(op, message, where):
    with pytest.raises(SpecError, match=message) as info:
        specsight.run(_spec(op), model=tiny("tiny-llama"))
    assert where in str(info.value)


def test_a_path_patch_without_an_unpatched_run_says_how_to_add_one():
    spec = _spec({"senders": ["head.0.0"], "receivers": ["logits"]})
    del spec["invokes"]["corrupt"]
    with pytest.raises(SpecError, match="no single invoke with the same prompt") as info:
        specsight.run(spec, model=tiny("tiny-llama"))
    assert "base" in str(info.value)
