"""Aggregates over a dataset's items: the statistic, its standard error, a seeded bootstrap
interval, the recovery of means and the mean of recoveries, computed independently here (per-
item values from hand-written hooks, statistics with numpy and the standard library)."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

import specsight
from specsight.api import validate
from specsight.errors import SpecError
from tests.conftest import assert_ratio_close, ratio_tolerance, tiny
from tests.test_dataset import ROWS, _hand_ld, _hand_patch, dataset_spec

#: six items: the three of test_dataset twice over, the second time with the names swapped
SIX = ROWS + [
    {
        "clean": r["clean"]
        .replace(r["io"].strip(), "#")
        .replace(r["s"].strip(), r["io"].strip())
        .replace("#", r["s"].strip()),
        "corrupt": r["corrupt"]
        .replace(r["io"].strip(), "#")
        .replace(r["s"].strip(), r["io"].strip())
        .replace("#", r["s"].strip()),
        "io": r["s"],
        "s": r["io"],
    }
    for r in ROWS
]


def _reduced(reduce, **metric_extra):
    spec = dataset_spec({"rows": SIX})
    for name in ("ld", "clean_ld", "base_ld"):
        spec["metrics"][name]["reduce"] = reduce
    spec["metrics"]["recovery"]["reduce"] = reduce
    spec["metrics"]["rec_means"] = {**spec["metrics"]["recovery"], "of": "means"}
    spec["metrics"]["rec_means"].pop("reduce")
    spec["metrics"]["ld"].update(metric_extra)
    return spec


@pytest.fixture(scope="module")
def hand():
    """Per-item values by hand: patched [layer, item], clean [item], corrupt [item]."""
    lm = tiny("tiny-llama")
    patched = np.array(
        [[_hand_patch(lm, r, layer) for r in SIX] for layer in range(lm.info.n_layers)]
    )
    clean = np.array([_hand_ld(lm, r["clean"], r["io"], r["s"]) for r in SIX])
    corrupt = np.array([_hand_ld(lm, r["corrupt"], r["io"], r["s"]) for r in SIX])
    return patched, clean, corrupt


def test_mean_stderr_items_and_both_recoveries_match_a_hand_computation(hand):
    patched, clean, corrupt = hand
    results = specsight.run(_reduced("mean"), model=tiny())
    assert results.axes("ld") == ["layer"] and results.axes("ld/items") == ["layer", "item"]
    np.testing.assert_allclose(results["ld/items"].numpy(), patched, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results["ld"].numpy(), patched.mean(1), rtol=1e-5, atol=1e-5)
    stderr = [statistics.stdev(row) / len(row) ** 0.5 for row in patched.tolist()]
    np.testing.assert_allclose(results["ld/stderr"].numpy(), stderr, rtol=1e-4, atol=1e-6)
    assert results["clean_ld"].ndim == 0
    assert results["clean_ld"].item() == pytest.approx(clean.mean(), abs=1e-5)
    per_item = (patched - corrupt) / (clean - corrupt)
    # a mean of ratios: within the mean of the items' tolerances
    bound = ratio_tolerance(patched, clean, corrupt).mean(1)
    diff = (results["recovery"].double() - torch.as_tensor(per_item.mean(1))).abs()
    assert bool((diff <= bound).all()), float(diff.max())
    of_means = (patched.mean(1) - corrupt.mean()) / (clean.mean() - corrupt.mean())
    assert_ratio_close(results["rec_means"], patched.mean(1), clean.mean(), corrupt.mean())
    # the two are different numbers: both are named in the results and the summary
    assert not np.allclose(per_item.mean(1), of_means)
    summary = results.summary()
    assert "recovery (mean over 6 items)" in summary
    assert "rec_means (recovery of means over 6 items)" in summary


@pytest.mark.parametrize("stat", ["median", "sum"])
def test_median_and_sum(hand, stat):
    patched = hand[0]
    results = specsight.run(_reduced(stat), model=tiny())
    want = np.median(patched, 1) if stat == "median" else patched.sum(1)
    np.testing.assert_allclose(results["ld"].numpy(), want, rtol=1e-5, atol=1e-5)
    if stat == "sum":
        spread = [statistics.stdev(row) * len(row) ** 0.5 for row in patched.tolist()]
        np.testing.assert_allclose(results["ld/stderr"].numpy(), spread, rtol=1e-4)
    else:  # a bootstrap standard error: positive where items differ
        assert (results["ld/stderr"] > 0).all()


def test_the_bootstrap_interval_is_seeded_and_matches_numpy_on_the_same_draws(hand):
    patched = hand[0]
    reduce = {"stat": "mean", "ci": "bootstrap", "n_boot": 500, "level": 0.9, "seed": 11}
    results = specsight.run(_reduced(reduce), model=tiny())
    again = specsight.run(_reduced(reduce), model=tiny())
    assert torch.equal(results["ld/ci_low"], again["ld/ci_low"])
    # the same draws (torch's seeded generator), statistics by numpy
    index = torch.randint(6, (500, 6), generator=torch.Generator().manual_seed(11)).numpy()
    boot = patched[:, index].mean(-1)
    np.testing.assert_allclose(results["ld/ci_low"].numpy(), np.quantile(boot, 0.05, 1), rtol=1e-4)
    np.testing.assert_allclose(results["ld/ci_high"].numpy(), np.quantile(boot, 0.95, 1), rtol=1e-4)
    assert (results["ld/ci_low"] <= results["ld"]).all() and (
        results["ld"] <= results["ld/ci_high"]
    ).all()
    other = specsight.run(_reduced({**reduce, "seed": 12}), model=tiny())
    assert not torch.equal(other["ld/ci_low"], results["ld/ci_low"])
    meta = results.manifest["tensors"]
    assert meta["ld/ci_low"]["companion_of"] == "ld" and meta["ld/ci_low"]["axes"] == ["layer"]
    assert meta["ld"]["reduce"]["level"] == 0.9


def test_expectations_and_where_work_on_the_aggregate(hand):
    patched = hand[0]
    last = patched.shape[0] - 1
    spec = _reduced("mean")
    spec["expect"] = [
        {
            "metric": "ld",
            "where": {"layer": last},
            "approx": float(patched.mean(1)[last]),
            "atol": 1e-4,
        },
        # the last layer's output at the second name never reaches the last position
        {"metric": "recovery", "where": {"layer": last}, "approx": 0, "atol": 1e-4},
    ]
    results = specsight.run(spec, model=tiny())
    assert all(outcome.ok for outcome in results.expectations)
    spec["expect"] = [{"metric": "ld", "where": {"item": 0}, "greater_than": 0}]
    with pytest.raises(SpecError, match="the result has no axis 'item'"):
        validate(spec)


@pytest.mark.parametrize(
    "metric, expected",
    [
        ({"reduce": {"over": "itme"}}, "metrics.ld.reduce.over: the metric has no axis 'itme'"),
        (
            {"kind": "top_k", "reduce": "mean", "target": None, "foil": None},
            "a top_k metric is not reduced",
        ),
    ],
)
def test_reduce_misuse_is_located(metric, expected):
    spec = dataset_spec()
    spec["metrics"]["ld"].update(metric)
    spec["metrics"]["ld"] = {k: v for k, v in spec["metrics"]["ld"].items() if v is not None}
    spec["metrics"].pop("recovery")
    with pytest.raises(SpecError) as info:
        lm = tiny()
        specsight.compile_plan(specsight.load_spec(spec), lm.info, lm.tokenizer)
    assert expected in str(info.value)


def test_a_metric_of_one_prompt_has_nothing_to_reduce():
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": {"prompt": "When Mary and John went"}},
        "metrics": {"p": {"kind": "prob", "invoke": "a", "token": " Mary", "reduce": "mean"}},
    }
    with pytest.raises(SpecError, match="the metric has no axis 'item' to reduce"):
        lm = tiny()
        specsight.compile_plan(specsight.load_spec(spec), lm.info, lm.tokenizer)


def test_a_list_of_prompts_reduces_over_prompts():
    prompts = [r["clean"] for r in ROWS]
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": {"prompt": prompts}},
        "metrics": {"p": {"kind": "prob", "invoke": "a", "token": " Mary", "reduce": "mean"}},
    }
    lm = tiny()
    results = specsight.run(spec, model=lm)
    mary = lm.tokenizer.encode_plain(" Mary")[0]
    want = []
    for prompt in prompts:
        with torch.inference_mode():
            logits = lm.model(torch.tensor([lm.tokenizer.encode(prompt)])).logits
        want.append(float(logits[0, -1].softmax(-1)[mary]))
    assert results["p"].item() == pytest.approx(np.mean(want), abs=1e-6)
    assert results.axes("p/items") == ["prompt"]


# --------------------------------------------------------------------------- effects


def _ablation_spec(reduce=None, baseline="clean_ld"):
    """Zero each head of layers 0 and 1 on the clean prompts; the effect is measured per item."""
    spec = dataset_spec({"rows": SIX})
    spec["invokes"] = {
        "clean": {"prompt": "{clean}"},
        "ablated": {
            "prompt": "{clean}",
            "sweep": {"layer": [0, 1], "head": "all"},
            "ops": [{"op": "zero", "site": "head_z.{layer}", "heads": ["{head}"]}],
        },
    }
    ld = {"kind": "logit_diff", "target": "{io}", "foil": "{s}"}
    spec["metrics"] = {
        "clean_ld": {**ld, "invoke": "clean"},
        "ablated_ld": {**ld, "invoke": "ablated", "baseline": baseline},
    }
    if reduce is not None:
        spec["metrics"]["ablated_ld"]["reduce"] = reduce
    return spec


def _hand_ablation(lm, row, layer: int, head: int) -> float:
    """A layer's attention output projection input with one head's columns zeroed, by hand."""
    attn = lm.model.model.layers[layer].self_attn
    d_head = lm.info.d_model // lm.info.n_heads

    def zero(_m, args):
        hidden = args[0].clone()
        hidden[..., head * d_head : (head + 1) * d_head] = 0
        return (hidden, *args[1:])

    handle = attn.o_proj.register_forward_pre_hook(zero)
    try:
        return _hand_ld(lm, row["clean"], row["io"], row["s"])
    finally:
        handle.remove()


def test_effects_are_per_item_differences_from_the_baseline_and_rank_the_summary():
    lm = tiny()
    clean = np.array([_hand_ld(lm, r["clean"], r["io"], r["s"]) for r in SIX])
    ablated = np.array(
        [
            [[_hand_ablation(lm, r, layer, h) for r in SIX] for h in range(lm.info.n_heads)]
            for layer in (0, 1)
        ]
    )
    plain = specsight.run(_ablation_spec(), model=lm)
    np.testing.assert_allclose(plain["ablated_ld"].numpy(), ablated, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain["ablated_ld/effect"].numpy(), ablated - clean, atol=1e-5)
    reduced = specsight.run(_ablation_spec("mean"), model=lm)
    effect = (ablated - clean).mean(-1)
    np.testing.assert_allclose(reduced["ablated_ld/effect"].numpy(), effect, atol=1e-5)
    summary = reduced.summary()
    assert "strongest cells of ablated_ld (largest |effect| vs clean_ld)" in summary
    first = summary.split("largest |effect| vs clean_ld):")[1].splitlines()[1]
    layer, head = np.unravel_index(np.abs(effect).argmax(), effect.shape)
    assert first.endswith(f"at layer={layer}, head={head}")
    assert f"(effect {effect[layer, head]:+.3f})" in first
    assert reduced.manifest["tensors"]["ablated_ld/effect"]["axes"] == ["layer", "head"]


@pytest.mark.parametrize(
    "baseline, extra, expected",
    [
        ("clean_lb", {}, "no metric named 'clean_lb' to use as the baseline"),
        ("p", {"p": {"kind": "prob", "invoke": "clean", "token": "{io}"}}, "'p' is a prob metric"),
        ("ablated_ld", {}, "no metric named 'ablated_ld'"),
        (
            "swept",
            {"swept": {"kind": "logit_diff", "invoke": "ablated", "target": "{io}", "foil": "{s}"}},
            "its invoke has a sweep",
        ),
    ],
)
def test_baseline_misuse_is_located(baseline, extra, expected):
    spec = _ablation_spec(baseline=baseline)
    spec["metrics"].update(extra)
    for check in (
        validate,
        lambda s: specsight.compile_plan(specsight.load_spec(s), tiny().info, tiny().tokenizer),
    ):
        with pytest.raises(SpecError) as info:
            check(spec)
        assert "metrics.ablated_ld.baseline" in str(info.value) and expected in str(info.value)
