"""Fuzzing in the suite: mutated example specs (wrong types, keys, numbers, unicode, nesting,
anchors, tags, bytes) only ever load and compile or raise a located SpecError, quickly: within
ten times what the unmutated example takes on the same machine (a blow-up, not a slow CPU).
``bench/fuzz_specs.py`` runs the same mutations 10,000 times under a time and memory watchdog."""

from __future__ import annotations

import functools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specsight.models.load import load_model_info
from tests.spec_mutations import EXAMPLES, SPECS, check_case, mutated


@functools.cache
def _infos():
    return {name: load_model_info(name) for name in ("smollm2-135m", "tiny-vit")}


@functools.cache
def _limit(example: str) -> float:
    """Seconds a mutated ``example`` may take: ten times the best of three checks of the
    example itself here, and at least one second."""
    text = (SPECS / example).read_text(encoding="utf-8")
    best = min(check_case(text, _infos()).seconds for _ in range(3))
    return max(1.0, 10 * best)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(seed=st.integers(0, 2**32 - 1), example=st.sampled_from(EXAMPLES))
def test_mutated_specs_fail_only_with_located_spec_errors(seed, example):
    text = mutated(seed, example)
    outcome = check_case(text, _infos())
    assert outcome.kind != "failure", (seed, example, outcome.detail, text[:2000])
    assert outcome.seconds < _limit(example), (seed, example, outcome.seconds)


def test_the_mutations_reach_every_stage():
    """Some cases load and compile, most fail somewhere: the fuzzer is not stuck at one door."""
    kinds = {
        check_case(mutated(seed, example), _infos()).kind
        for seed in range(40)
        for example in EXAMPLES[:3]
    }
    assert kinds == {"ok", "spec-error"}
