"""Every saved tensor's axes name every dimension, with the values of the selected positions
and heads, in the manifest and for ``expect: where``."""

from __future__ import annotations

import specsight
from specsight.models.load import load_model
from tests.conftest import CLEAN, tiny


def _run(ops: list[dict], prompt=CLEAN, model=None, **top):
    spec = {"specsight": 1, "model": "tiny-llama", "invokes": {"a": {"prompt": prompt, "ops": ops}}}
    return specsight.run({**spec, **top}, model=model or tiny("tiny-llama"))


def test_head_saves_name_positions_heads_and_head_dim():
    ops = [{"op": "save", "site": "head_z.1", "heads": [0, 2], "positions": [3, -1], "name": "z"}]
    results = _run(ops, expect=[{"saved": "z", "where": {"head": 2}, "greater_than": -1e9}])
    meta = results.manifest["tensors"]["z"]
    assert meta["axes"] == ["pos", "head", "head_dim"]
    assert meta["axis_values"] == {"pos": [3, 13], "head": [0, 2]}
    assert tuple(results["z"].shape) == (2, 2, 16)
    assert results.ok and "z[head=2]" in results.expectations[0].claim


def test_kv_head_saves_count_key_value_heads():
    results = _run([{"op": "save", "site": "k.1", "name": "k"}])
    meta = results.manifest["tensors"]["k"]
    assert meta["axes"] == ["pos", "head", "head_dim"]
    assert meta["axis_values"]["head"] == [0, 1]  # tiny-llama: 2 key/value heads
    assert tuple(results["k"].shape) == (14, 2, 16)


def test_attention_patterns_are_query_head_key():
    lm = load_model("tiny-llama", device="cpu", attn_implementation="eager")
    ops = [{"op": "save", "site": "attn_pattern.1", "heads": [1], "positions": "last", "name": "p"}]
    results = specsight.run(
        {
            "specsight": 1,
            "model": {"id": "tiny-llama", "attn_implementation": "eager"},
            "invokes": {"a": {"prompt": CLEAN, "ops": ops}},
        },
        model=lm,
    )
    meta = results.manifest["tensors"]["p"]
    assert meta["axes"] == ["query", "head", "key"]
    assert meta["axis_values"] == {"query": [13], "head": [1]}
    assert tuple(results["p"].shape) == (1, 1, 14)


def test_positions_that_differ_between_rows_are_not_listed():
    ops = [{"op": "save", "site": "resid_post.1", "positions": "all", "name": "r"}]
    results = _run(ops, prompt=[CLEAN, "Hello there"])
    meta = results.manifest["tensors"]["r"]
    assert meta["axes"] == ["prompt", "pos", "hidden"]
    assert meta["axis_values"] == {"prompt": [0, 1]}
    ops = [{"op": "save", "site": "resid_post.1", "positions": [0, -1], "name": "r"}]
    meta = _run(ops, prompt=[CLEAN, "Hello there"]).manifest["tensors"]["r"]
    assert "pos" not in meta["axis_values"]  # -1 is 13 in one row, 1 in the other
    ops = [{"op": "save", "site": "resid_post.1", "positions": [0], "name": "r"}]
    meta = _run(ops, prompt=[CLEAN, "Hello there"]).manifest["tensors"]["r"]
    assert meta["axis_values"]["pos"] == [0]


def test_generation_saves_have_a_step_axis():
    ops = [{"op": "save", "site": "resid_post.1", "positions": "last", "steps": "all", "name": "g"}]
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": {"prompt": CLEAN, "ops": ops, "generate": {"max_new_tokens": 3}}},
    }
    results = specsight.run(spec, model=tiny("tiny-llama"))
    meta = results.manifest["tensors"]["g"]
    assert meta["axes"] == ["step", "pos", "hidden"]
    assert tuple(results["g"].shape) == (3, 1, 64)
