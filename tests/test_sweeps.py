"""Sweeps: grid expansion (product, zip, ranges), chunking by batch size and memory budget,
prefix reuse exactness, result shapes, recovery, heatmaps and progress."""

from __future__ import annotations

import pytest
import torch

import specsight
from specsight.compile import GridError, expand_grid
from specsight.errors import SpecError
from specsight.models.load import load_model_info
from specsight.plan.ops import Patch
from tests.conftest import CLEAN, CORRUPT, ioi_spec, tiny


def ioi(model: str = "tiny-llama", sweep: dict | None = None, **invoke_extra) -> dict:
    return ioi_spec(model, sweep=sweep, baseline="base", recovery="rec", invoke_extra=invoke_extra)


def compiled(spec: dict, **options):
    from specsight.compile import Budget, compile_plan

    info, tokenizer = load_model_info(spec["model"])
    return compile_plan(specsight.load_spec(spec), info, tokenizer, budget=Budget(**options))


# --- grids ---------------------------------------------------------------------------------


def test_product_grid_order_first_axis_slowest():
    grid = expand_grid({"layer": "1:3", "pos": [0, -1]}, n_layers=4, seq_len=5)
    assert grid.axes == ("layer", "pos") and grid.shape == (2, 2)
    assert grid.cells() == [
        {"layer": 1, "pos": 0},
        {"layer": 1, "pos": 4},
        {"layer": 2, "pos": 0},
        {"layer": 2, "pos": 4},
    ]


def test_zip_grid_and_its_single_axis():
    grid = expand_grid({"layer": [0, 2], "factor": [0.5, 2.0]}, n_layers=4, seq_len=5, zipped=True)
    assert grid.axes == ("layer+factor",) and grid.shape == (2,)
    assert grid.cells() == [{"layer": 0, "factor": 0.5}, {"layer": 2, "factor": 2.0}]
    assert grid.axis_values() == {"layer+factor": ["layer=0, factor=0.5", "layer=2, factor=2.0"]}
    with pytest.raises(GridError, match="same number of values"):
        expand_grid({"layer": [0, 1], "factor": [1.0]}, n_layers=4, seq_len=5, zipped=True)


def test_head_axis_and_numeric_ranges():
    assert expand_grid({"head": "all"}, n_layers=4, seq_len=3, n_heads=4).values == ((0, 1, 2, 3),)
    assert expand_grid({"k": "2:5"}, n_layers=4, seq_len=3).values == ((2, 3, 4),)
    with pytest.raises(GridError, match="only applies to layer, pos and head"):
        expand_grid({"k": "all"}, n_layers=4, seq_len=3)


def test_numeric_variable_on_an_op_field_matches_single_runs():
    loaded = tiny("tiny-llama")
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {
            "a": {
                "prompt": CLEAN,
                "sweep": {"factor": [0.0, 0.5, 3.0]},
                "ops": [{"op": "scale", "site": "mlp_out.1", "factor": "{factor}"}],
            }
        },
        "metrics": {"p": {"kind": "prob", "invoke": "a", "token": " Mary"}},
    }
    swept = specsight.run(spec, model=loaded)["p"]
    assert swept.shape == (3,)
    for i, factor in enumerate([0.0, 0.5, 3.0]):
        single = dict(
            spec,
            invokes={
                "a": {
                    "prompt": CLEAN,
                    "ops": [{"op": "scale", "site": "mlp_out.1", "factor": factor}],
                }
            },
        )
        torch.testing.assert_close(
            swept[i], specsight.run(single, model=loaded)["p"], rtol=0, atol=1e-6
        )


# --- chunking and prefix reuse -------------------------------------------------------------


def test_chunks_respect_max_batch_and_start_at_the_lowest_touched_layer_and_position():
    plan = compiled(ioi(), max_batch=10)
    stage1 = [f for f in plan.forwards if f.stage == 1]
    assert sorted(r for f in stage1 for r in f.rows) == sorted(
        i for i, row in enumerate(plan.rows) if row.invoke == "corrupt"
    )
    for f in plan.forwards:  # a late start computes fewer positions: more rows fit
        assert len(f.rows) * (f.seq_len - f.position_start) <= 10 * f.seq_len
        assert len(f.rows) <= (40 if f.from_base else 10)
    # rows are grouped so that chunks skip deep prefixes and start late
    assert max(f.shared_prefix for f in stage1) >= 2
    assert max(f.position_start for f in stage1) > 0
    layers = {op.row: op.layer for op in plan.ops if isinstance(op, Patch)}
    starts = {op.row: op.positions[0] for op in plan.ops if isinstance(op, Patch)}
    for forward in stage1:
        assert forward.shared_prefix == min(layers[r] for r in forward.rows)
        assert forward.position_start == min(starts[r] for r in forward.rows)


def test_memory_budget_sizes_chunks():
    roomy = compiled(ioi(), memory=1 << 30, cap=64)
    tight = compiled(ioi(), memory=200_000, cap=64)

    def full_rows(plan):  # rows x positions computed, in rows of every position
        return max(len(f.rows) * (f.seq_len - f.position_start) / f.seq_len for f in plan.forwards)

    assert roomy.max_batch == 64 and full_rows(roomy) <= 64
    assert 1 <= tight.max_batch < 10 and full_rows(tight) < 10
    assert compiled(ioi(), max_batch=7).max_batch == 7


def test_prefix_reuse_across_different_prompts_only_from_their_untouched_runs():
    spec = ioi()
    spec["invokes"]["corrupt"]["prompt"] = [
        CORRUPT,
        "When John and Mary went to the store, Mary gave a drink to",
    ]
    spec["metrics"].pop("rec")
    plan = compiled(spec, max_batch=64)
    assert any(len({plan.rows[r].tokens for r in f.rows}) == 2 for f in plan.forwards)
    for forward in plan.forwards:
        tokens = {plan.rows[r].tokens for r in forward.rows}
        if forward.from_base:  # each row reads its own sequence's untouched run
            assert len({len(t) for t in tokens}) == 1
        else:  # one row runs the shared layers for all: they must be identical
            assert forward.shared_prefix == 0 or len(tokens) == 1
    plain = compiled(spec, max_batch=64, position_reuse=False)
    for forward in plain.forwards:
        tokens = {plan.rows[r].tokens for r in forward.rows}
        assert not forward.from_base and (forward.shared_prefix == 0 or len(tokens) == 1)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
@pytest.mark.parametrize("max_batch", [3, 16, 64])
def test_prefix_reuse_matches_the_naive_loop(name, max_batch):
    loaded = tiny(name)
    naive = specsight.run(ioi(name), model=loaded, max_batch=1)["ld"]
    reused = specsight.run(ioi(name), model=loaded, max_batch=max_batch)
    off = specsight.run(ioi(name), model=loaded, max_batch=max_batch, prefix_reuse=False)
    assert reused.manifest["plan"]["forwards"] < naive.numel() + 1
    torch.testing.assert_close(reused["ld"], naive, rtol=0, atol=1e-4)
    torch.testing.assert_close(off["ld"], naive, rtol=0, atol=1e-4)


def test_prefix_reuse_with_saves_and_input_sites():
    loaded = tiny("tiny-llama")
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {
            "a": {
                "prompt": CLEAN,
                "sweep": {"layer": "1:4"},
                "ops": [
                    {"op": "zero", "site": "resid_pre.{layer}", "positions": "last"},
                    {"op": "save", "site": "resid_post.{layer}", "positions": "last"},
                ],
            }
        },
        "metrics": {"top": {"kind": "top_k", "invoke": "a", "k": 3}},
    }
    plan = compiled(spec, max_batch=8)
    assert plan.forwards[0].shared_prefix == 1
    reused = specsight.run(spec, model=loaded, max_batch=8)
    naive = specsight.run(spec, model=loaded, max_batch=8, prefix_reuse=False)
    torch.testing.assert_close(reused["top"], naive["top"], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        reused["a/resid_post.{layer}"], naive["a/resid_post.{layer}"], rtol=0, atol=1e-6
    )
    assert reused["a/resid_post.{layer}"].shape == (3, 1, loaded.info.d_model)


# --- results -------------------------------------------------------------------------------


def test_sweep_results_have_named_axes_and_recovery(tmp_path):
    loaded = tiny("tiny-llama")
    results = specsight.run(ioi(), model=loaded, out=tmp_path)
    ld, rec = results["ld"], results["rec"]
    assert ld.shape == (4, 14) and results.axes("ld") == ["layer", "pos"]
    meta = results.manifest["tensors"]["ld"]
    assert meta["axis_values"]["layer"] == [0, 1, 2, 3]
    assert meta["axis_labels"]["pos"][9] == "9: Mary"
    expected = (ld - results["base_ld"]) / (results["clean_ld"] - results["base_ld"])
    torch.testing.assert_close(rec, expected)
    # the last layer's output at the last position decides the answer: full recovery
    torch.testing.assert_close(rec[3, 13], torch.tensor(1.0), rtol=0, atol=1e-4)
    assert (tmp_path / "ld.png").stat().st_size > 1000
    assert (tmp_path / "rec.png").exists()
    assert not (tmp_path / "clean_ld.png").exists()
    assert "strongest cells of ld" in results.summary()


def test_zip_sweep_results():
    loaded = tiny("tiny-llama")
    results = specsight.run(
        ioi(sweep={"layer": [0, 1, 3], "pos": [9, 9, 13]}, sweep_mode="zip"), model=loaded
    )
    assert results["ld"].shape == (3,)
    assert results.axes("ld") == ["layer+pos"]
    full = specsight.run(ioi(), model=loaded)["ld"]
    torch.testing.assert_close(
        results["ld"], torch.stack([full[0, 9], full[1, 9], full[3, 13]]), rtol=0, atol=1e-5
    )


def test_recovery_errors_are_located():
    spec = ioi()
    spec["metrics"]["rec"] = {
        "kind": "recovery",
        "patched": "ld",
        "clean": "clean_lx",
        "corrupt": "ld",
    }
    with pytest.raises(SpecError) as exc:
        compiled(spec)
    text = exc.value.render()
    assert (
        "metrics.rec.clean: no metric named 'clean_lx'" in text
        and "did you mean 'clean_ld'?" in text
    )
    assert "metrics.rec.corrupt: the corrupt metric 'ld' must be one value" in text


def test_progress_reports_rows_done():
    loaded = tiny("tiny-llama")
    seen = []
    specsight.run(
        ioi(), model=loaded, max_batch=16, progress=lambda done, total: seen.append((done, total))
    )
    assert seen[-1] == (58, 58)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) >= 4
