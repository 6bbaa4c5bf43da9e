"""Runs in blocks of items: a dataset run over more rows than a block holds is compiled and run
a block of items at a time. Its values are checked against hand-written hooks, and every tensor
against the same spec run as one plan (within float32 rounding: blocks batch rows differently;
token ids exactly)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import specsight
from specsight.compile import describe_blocks, why_one_plan
from specsight.errors import SpecError
from tests.conftest import assert_ratio_close, ratio_tolerance, tiny
from tests.test_dataset import ROWS, _hand_ld, _hand_patch, dataset_spec

SHORT = {
    "clean": "So Bob met Alice, Alice gave a book to",
    "corrupt": "So Bob met Alice, Bob gave a book to",
    "io": " Bob",
    "s": " Alice",
}
#: more items than ROWS, and shorter prompts among them: saved positions are padded per block
ITEMS = [dict(row, n=str(i)) for i, row in enumerate([*ROWS, SHORT] * 2 + [ROWS[0]])]


def _mixed_spec() -> dict:
    """Per-item patching plus what a join must get right: an invoke that runs once, a save
    padded to the longest prompt, a median with a bootstrap interval, a baseline's effect,
    seeded noise per item, top-k ids, and a claim over every item."""
    spec = dataset_spec({"rows": ITEMS})
    spec["invokes"]["once"] = {"prompt": "The capital of France is"}
    spec["invokes"]["noisy"] = {
        "prompt": "{corrupt}",
        "ops": [
            {"op": "noise", "site": "embed", "positions": [IO2_POS], "std": 0.5, "seed": 3},
            {"op": "save", "site": "resid_post.1", "name": "noisy_resid"},
        ],
    }
    ld = {"kind": "logit_diff", "target": "{io}", "foil": "{s}"}
    spec["metrics"]["ld"]["reduce"] = {"over": "item", "stat": "median", "ci": "bootstrap"}
    spec["metrics"]["noisy_ld"] = {**ld, "invoke": "noisy", "reduce": "mean", "baseline": "base_ld"}
    spec["metrics"]["once_top"] = {"kind": "top_k", "invoke": "once", "k": 3}
    spec["metrics"]["clean_top"] = {"kind": "top_k", "invoke": "clean", "k": 2}
    spec["expect"] = [{"metric": "clean_ld", "greater_than": -100.0}]
    return spec


IO2_POS = {"token": "{io}", "occurrence": 2}


def _tolerances(one: specsight.Results, tol: float = 1e-5) -> dict[str, torch.Tensor]:
    """Tolerances of the derived values, from what they are computed from in ``one``: the
    recovery is a ratio (a small denominator amplifies its ingredients' rounding), an effect
    a difference of two values (each rounded on its own scale)."""
    recovery = ratio_tolerance(one["ld/items"], one["clean_ld"], one["base_ld"], tol)
    noisy, base = one["noisy_ld/items"].double().abs(), one["base_ld"].double().abs()
    effect = tol * (2 + noisy + base)
    return {"recovery": recovery, "noisy_ld/effect": effect.mean(-1)}


def _assert_same(one: specsight.Results, blocked: specsight.Results) -> None:
    names = list(one.manifest["tensors"])
    assert names == list(blocked.manifest["tensors"])
    derived = _tolerances(one)
    for name in names:
        exact = not one[name].is_floating_point()
        if name in derived:
            diff = (blocked[name].double() - one[name].double()).abs()
            assert bool((diff <= derived[name]).all()), (name, float(diff.max()))
        else:
            tol = 0 if exact else 1e-5
            torch.testing.assert_close(blocked[name], one[name], rtol=tol, atol=tol, equal_nan=True)
        meta_one, meta_blocked = one.manifest["tensors"][name], blocked.manifest["tensors"][name]
        assert meta_blocked["axes"] == meta_one["axes"], name
        assert meta_blocked["axis_values"] == meta_one["axis_values"], name


def test_blocks_give_the_hand_written_values_item_by_item():
    lm = tiny("tiny-llama")
    spec = dataset_spec({"rows": ITEMS})
    spec["metrics"]["ld"]["reduce"] = "mean"
    per_item = 2 + lm.info.n_layers  # clean, base and one patched row per layer
    results = specsight.run(spec, model=lm, block_rows=2 * per_item)
    assert results.manifest["plan"]["blocks"] == math.ceil(len(ITEMS) / 2)
    assert results.manifest["plan"]["rows"] == per_item * len(ITEMS)
    want = torch.tensor(
        [[_hand_patch(lm, row, layer) for row in ITEMS] for layer in range(lm.info.n_layers)]
    )
    torch.testing.assert_close(results["ld/items"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["ld"], want.mean(-1), rtol=1e-5, atol=1e-5)
    clean = torch.tensor([_hand_ld(lm, r["clean"], r["io"], r["s"]) for r in ITEMS])
    base = torch.tensor([_hand_ld(lm, r["corrupt"], r["io"], r["s"]) for r in ITEMS])
    assert_ratio_close(results["recovery"], want, clean, base)
    assert results.manifest["dataset"]["used"] == len(ITEMS)


@pytest.mark.parametrize("block_items", [1, 4, 5])
def test_blocks_equal_one_plan(block_items):
    lm = tiny("tiny-llama")
    spec = _mixed_spec()
    one = specsight.run(copy.deepcopy(spec), model=lm)
    assert "blocks" not in one.manifest["plan"]
    per_item = 4 + lm.info.n_layers  # clean, base, noisy, patched per layer
    blocked = specsight.run(spec, model=lm, block_rows=block_items * per_item + 1)
    assert blocked.manifest["plan"]["blocks"] == math.ceil(len(ITEMS) / block_items)
    _assert_same(one, blocked)
    assert blocked["noisy_resid"].isnan().any()  # the short prompts' positions are padding
    assert blocked.expectations[0].ok
    # the invoke that runs once (one row) runs again in every block
    extra = blocked.manifest["plan"]["blocks"] - 1
    assert blocked.manifest["plan"]["rows"] == one.manifest["plan"]["rows"] + extra
    # next tokens are recorded for the first block's prompts (up to 16 per invoke)
    assert blocked.next_tokens.keys() == one.next_tokens.keys()
    for invoke, tokens in blocked.next_tokens.items():
        assert tokens == one.next_tokens[invoke][: len(tokens)]
        assert len(tokens) == (1 if invoke == "once" else min(block_items, len(ITEMS)))


def test_a_later_block_names_the_item_in_the_whole_dataset():
    lm = tiny("tiny-llama")
    rows = [dict(r) for r in ITEMS]
    rows[7]["io"] = " Kate"  # three tokens for this tokenizer
    with pytest.raises(SpecError) as caught:
        specsight.run(dataset_spec({"rows": rows}), model=lm, block_rows=6)
    assert "item 7, {io} = ' Kate'" in str(caught.value)


@pytest.mark.parametrize(
    ("op", "reason"),
    [
        ({"op": "mean_ablate", "site": "mlp_out.0", "from": "clean"}, "mean_ablate"),
        ({"op": "resample_ablate", "site": "mlp_out.0", "from": "clean"}, "resample_ablate"),
        ({"op": "noise", "site": "embed", "std_of": "clean", "scale": 3}, "std over items"),
        ({"op": "add", "site": "resid_post.0", "vector": {"saved": "v"}}, "saved value"),
    ],
)
def test_specs_whose_items_read_each_other_run_as_one_plan(op, reason):
    spec = dataset_spec()
    spec["invokes"]["base"]["ops"] = [op]
    why = why_one_plan(specsight.load_spec(spec))
    assert why is not None and reason in why
    assert why_one_plan(specsight.load_spec(dataset_spec())) is None


def test_one_plan_runs_are_not_split():
    lm = tiny("tiny-llama")
    spec = dataset_spec({"rows": ITEMS})
    spec["invokes"]["base"]["ops"] = [{"op": "mean_ablate", "site": "mlp_out.0", "from": "clean"}]
    results = specsight.run(spec, model=lm, block_rows=6)
    assert "blocks" not in results.manifest["plan"]


def test_plan_says_how_a_large_dataset_runs():
    lm = tiny("tiny-llama")
    spec = specsight.load_spec(dataset_spec({"rows": ITEMS}))
    plan = specsight.compile_plan(spec, lm.info, lm.tokenizer, max_batch=8)
    per_item = 2 + lm.info.n_layers
    assert describe_blocks(spec, plan) is None  # 54 rows: one plan
    text = describe_blocks(spec, plan, block_rows=2 * per_item)
    assert text == f"runs in 5 blocks of up to 2 items (at most {2 * per_item} rows each)"
    ablated = dataset_spec({"rows": ITEMS})
    ablated["invokes"]["base"]["ops"] = [
        {"op": "mean_ablate", "site": "mlp_out.0", "from": "clean"}
    ]
    ablated = specsight.load_spec(ablated)
    plan = specsight.compile_plan(ablated, lm.info, lm.tokenizer, max_batch=8)
    assert describe_blocks(ablated, plan, block_rows=10) == (
        "runs as one plan of 54 rows: invoke 'base' has mean_ablate (it reads other items)"
    )


def test_a_position_sweep_over_items_runs_as_one_plan():
    spec = dataset_spec({"rows": ITEMS})
    spec["invokes"]["patched"]["sweep"] = {"layer": "all", "pos": [-1, -2]}
    spec["invokes"]["patched"]["ops"][0]["positions"] = ["{pos}"]
    spec["invokes"]["patched"]["ops"][0].pop("source_positions")
    loaded = specsight.load_spec(spec)
    assert "sweeps positions" in why_one_plan(loaded)
    results = specsight.run(spec, model=tiny("tiny-llama"), block_rows=6)
    assert "blocks" not in results.manifest["plan"]
    assert results.manifest["tensors"]["ld"]["axis_values"]["pos"] == [-1, -2]


def test_an_empty_prompt_in_a_later_block_names_its_item():
    rows = [dict(r) for r in ITEMS]
    rows[6]["clean"] = ""
    with pytest.raises(SpecError) as caught:
        specsight.run(dataset_spec({"rows": rows}), model=tiny("tiny-llama"), block_rows=6)
    assert "item 6: prompt encodes to no tokens" in str(caught.value)
