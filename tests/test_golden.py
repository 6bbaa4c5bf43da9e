"""Golden files pin compiled plans: `Plan.explain()` of each example spec on tiny models.

Regenerate with `make golden` (pytest tests/test_golden.py --update-golden) and review the diff.
"""

from __future__ import annotations

import contextlib

import pytest
import yaml

from specsight.api import compile_plan, load_spec
from specsight.models.load import load_model_info
from specsight.plan.ops import Capture, Patch
from tests.conftest import GOLDEN, SPECS

# The steering examples need layer 6 and multi-token words of the real model's vocabulary, the
# dataset examples layers 20-29 and the real vocabulary, the SAE example the built-in SAE;
# their tiny-model twins live in tests/golden/specs.
TINY_SPECS = GOLDEN / "specs"
#: examples already written for a tiny model (images beside the spec), compiled as they are
OWN_MODEL = {"vit_patching": ("tiny-vit",)}
CASES = [
    (spec_path.stem, model)
    for spec_path in sorted(SPECS.glob("*.yaml")) + sorted(TINY_SPECS.glob("*.yaml"))
    if spec_path.stem
    not in (
        "steering_add",
        "steering_generate",
        "steering_caa",
        "ioi_dataset",
        "ioi_dla",
        "causal_tracing",
        "sae_features",
        "ioi_circuit",
    )
    for model in OWN_MODEL.get(spec_path.stem, ("tiny-llama", "tiny-gpt2"))
]


def _compiled(stem: str, model: str, max_batch: int = 16):
    path = SPECS / f"{stem}.yaml"
    if stem in OWN_MODEL:
        info, tokenizer = load_model_info(model)
        return compile_plan(load_spec(path), info, tokenizer, max_batch=max_batch)
    data = yaml.safe_load((path if path.exists() else TINY_SPECS / f"{stem}.yaml").read_text())
    data["model"] = model
    data.pop("expect", None)  # the examples' claims are about the built-in model's numbers
    spec = load_spec(data)
    info, tokenizer = load_model_info(model)
    with contextlib.chdir(SPECS):  # a dict's dataset file is relative to the working folder
        return compile_plan(spec, info, tokenizer, max_batch=max_batch)


@pytest.mark.parametrize("stem, model", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_plan_explain_matches_golden(stem, model, update_golden):
    text = _compiled(stem, model).explain() + "\n"
    golden = GOLDEN / "plans" / f"{stem}.{model}.txt"
    if update_golden or not golden.exists():
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
        if not update_golden:
            pytest.fail(f"created missing golden file {golden}; review and commit it")
    assert text == golden.read_text(), (
        f"plan changed; if intended run `make golden` and review {golden}"
    )


@pytest.mark.parametrize("stem, model", CASES[:2], ids=[f"{s}-{m}" for s, m in CASES[:2]])
def test_plan_json_round_trip(stem, model):
    from specsight.plan import Plan

    plan = _compiled(stem, model)
    assert Plan.from_json(plan.to_json()) == plan


def test_ioi_sweep_layout_on_tiny_llama():
    plan = _compiled("ioi_patching", "tiny-llama", max_batch=16)
    corrupt_rows = [r for r in plan.rows if r.invoke == "corrupt"]
    assert len(corrupt_rows) == 4 * 14
    # sources run in an earlier stage than the rows that patch from them
    stage_of = {
        f.stage for f in plan.forwards if any(plan.rows[r].invoke == "clean" for r in f.rows)
    }
    assert stage_of == {0}
    assert all(
        len(f.rows) * (f.seq_len - f.position_start) <= 16 * f.seq_len for f in plan.forwards
    )
    metric = next(m for m in plan.metrics if m.name == "logit_diff")
    assert metric.axes == ("layer", "pos") and metric.shape == (4, 14)
    # every patch reads a capture of the clean run at its own site
    captures = {op.store: op for op in plan.ops if isinstance(op, Capture)}
    for op in plan.ops:
        if isinstance(op, Patch):
            source = captures[op.source]
            assert (source.module, source.io) == (op.module, op.io)
            assert plan.rows[source.row].invoke == "clean"
