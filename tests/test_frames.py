"""Results as data frames, xarray objects and stacked layers: checked against the tensors and
the manifest's axis entries read directly."""

from __future__ import annotations

import pytest
import torch

import specsight
from specsight.errors import RunError
from tests.conftest import CLEAN, ioi_spec, tiny

pandas = pytest.importorskip("pandas")
xarray = pytest.importorskip("xarray")


@pytest.fixture(scope="module")
def results():
    spec = ioi_spec()
    spec["invokes"]["clean"]["ops"] = [{"op": "save", "site": "resid_post.*"}]
    return specsight.run(spec, model=tiny())


def test_to_pandas_has_one_row_per_cell_with_values_and_labels(results):
    name = next(n for n, t in results.metrics.items() if t.dim() == 2)
    tensor = results[name]
    meta = results.manifest["tensors"][name]
    frame = results.to_pandas(name)
    assert len(frame) == tensor.numel()
    axes = meta["axes"]
    assert list(frame.columns[:1]) == [axes[0]] and frame.columns[-1] == "value"
    for row in frame.sample(10, random_state=0).itertuples(index=False):
        record = row._asdict()
        index = [meta["axis_values"][a].index(record[a]) for a in axes]
        assert record["value"] == pytest.approx(float(tensor[tuple(index)]))
        if "pos_label" in record:
            assert record["pos_label"] == meta["axis_labels"]["pos"][index[axes.index("pos")]]


def test_to_pandas_of_a_scalar_is_one_row(results):
    name = next(n for n, t in results.metrics.items() if t.dim() == 0)
    frame = results.to_pandas(name)
    assert list(frame.columns) == ["value"]
    assert frame["value"][0] == pytest.approx(float(results[name]))


def test_to_xarray_names_and_labels_dimensions(results):
    name = next(n for n, t in results.metrics.items() if t.dim() == 2)
    array = results.to_xarray(name)
    meta = results.manifest["tensors"][name]
    assert list(array.dims) == meta["axes"]
    torch.testing.assert_close(torch.from_numpy(array.values), results[name])
    assert list(array.coords["layer"].values) == meta["axis_values"]["layer"]


def test_the_dataset_has_every_tensor_on_shared_dims(results):
    dataset = results.to_xarray()
    assert set(dataset.data_vars) == {n.replace("/", "_") for n in results.tensors}
    assert not any("/" in str(v) for v in dataset.data_vars)
    assert not any("@" in str(d) for d in dataset.dims)  # one dim per axis name
    for name, tensor in results.tensors.items():
        var = dataset[name.replace("/", "_")]
        meta = results.manifest["tensors"][name]
        assert list(var.dims)[: len(meta["axes"])] == meta["axes"]
        # every cell of the tensor is at its coordinates in the Dataset
        picked = var.sel(
            {a: meta["axis_values"][a] for a in meta["axes"] if a in meta["axis_values"]}
        )
        torch.testing.assert_close(torch.from_numpy(picked.values.copy()), tensor.float())
    assert "pos" in dataset.dims and "position" not in dataset.dims  # saves and sweeps agree


def test_stack_puts_every_layer_on_one_axis(results):
    stacked = results.stack("resid_post")
    n_layers = 4  # tiny-llama
    assert stacked.shape[0] == n_layers
    for layer in range(n_layers):
        torch.testing.assert_close(stacked[layer], results[f"clean/resid_post.{layer}"])
    with pytest.raises(RunError, match="no saves of 'resid_pre"):
        results.stack("resid_pre")
    torch.testing.assert_close(results.stack("resid_post", invoke="clean"), stacked)
    with pytest.raises(RunError, match="by 'corrupt'"):
        results.stack("resid_post", invoke="corrupt")


def test_stack_matches_hand_written_hooks():
    lm = tiny()
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": {"prompt": CLEAN, "ops": [{"op": "save", "site": "resid_post.*"}]}},
    }
    stacked = specsight.run(spec, model=lm).stack("resid_post")
    outputs = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for layer in lm.model.model.layers
    ]
    try:
        with torch.inference_mode():
            lm.model(torch.tensor([lm.tokenizer.encode(CLEAN)]))
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(stacked, torch.stack([o[0] for o in outputs]), rtol=1e-5, atol=1e-5)


# --- a dataset run: the tidy frame and the Dataset against the tensors ------------------------

ROWS = [
    {"clean": CLEAN, "corrupt": CLEAN.replace("John gave", "Mary gave"), "io": " Mary", "s": " John"},
    {"clean": "When Tom and Anna went to the park, Anna gave a book to",
     "corrupt": "When Tom and Anna went to the park, Tom gave a book to", "io": " Tom", "s": " Anna"},
    {"clean": "Then Bob and Alice walked home, Alice gave a drink to",
     "corrupt": "Then Bob and Alice walked home, Bob gave a drink to", "io": " Bob", "s": " Alice"},
]  # fmt: skip


@pytest.fixture(scope="module")
def dataset_run():
    ld = {"kind": "logit_diff", "target": "{io}", "foil": "{s}"}
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": {"rows": ROWS},
        "invokes": {
            "clean": {"prompt": "{clean}"},
            "corrupt": {"prompt": "{corrupt}"},
            "patched": {
                "prompt": "{corrupt}",
                "sweep": {"layer": "all", "pos": [1, -1]},
                "ops": [
                    {"op": "patch", "site": "resid_post.{layer}", "positions": ["{pos}"], "from": "clean"}
                ],
            },
        },
        "metrics": {
            "clean_ld": {**ld, "invoke": "clean", "reduce": "mean"},
            "corrupt_ld": {**ld, "invoke": "corrupt", "reduce": "mean"},
            "patched_ld": {**ld, "invoke": "patched", "reduce": {"ci": "bootstrap"}, "baseline": "corrupt_ld"},
            "per_item": {**ld, "invoke": "patched"},
        },
    }  # fmt: skip
    return specsight.run(spec, model=tiny())


def test_the_tidy_frame_puts_value_stderr_ci_and_effect_side_by_side(dataset_run):
    frame = dataset_run.to_pandas()
    assert list(frame.columns[:4]) == ["metric", "layer", "pos", "item"]
    assert set(frame.metric) == {"clean_ld", "corrupt_ld", "patched_ld", "per_item"}
    patched = frame[frame.metric == "patched_ld"]
    assert len(patched) == dataset_run["patched_ld"].numel()
    meta = dataset_run.manifest["tensors"]["patched_ld"]
    for row in patched.itertuples(index=False):
        cell = (
            meta["axis_values"]["layer"].index(row.layer),
            meta["axis_values"]["pos"].index(row.pos),
        )
        for column, name in [("value", "patched_ld"), ("stderr", "patched_ld/stderr"),
                             ("ci_low", "patched_ld/ci_low"), ("ci_high", "patched_ld/ci_high"),
                             ("effect", "patched_ld/effect")]:  # fmt: skip
            assert getattr(row, column) == pytest.approx(float(dataset_run[name][cell]))
        assert row.pos_label == meta["axis_labels"]["pos"][cell[1]]
    clean = frame[frame.metric == "clean_ld"].iloc[0]
    assert clean.value == pytest.approx(float(dataset_run["clean_ld"]))
    assert pandas.isna(clean.layer) and pandas.isna(clean.effect)
    assert str(frame.layer.dtype) == "Int64"  # integers, though scalars have no layer


def test_the_dataset_columns_are_joined_on_item(dataset_run):
    frame = dataset_run.to_pandas()
    per_item = frame[frame.metric == "per_item"]
    assert len(per_item) == dataset_run["per_item"].numel()
    for row in per_item.itertuples(index=False):
        assert (row.io, row.s, row.clean) == (
            ROWS[row.item]["io"],
            ROWS[row.item]["s"],
            ROWS[row.item]["clean"],
        )
    items = dataset_run.to_pandas(items=True)
    clean = items[items.metric == "clean_ld"].sort_values("item")
    assert list(clean.io) == [r["io"] for r in ROWS]
    torch.testing.assert_close(
        torch.tensor(clean.value.tolist(), dtype=torch.float64),
        dataset_run["clean_ld/items"].double(),
    )


def test_the_per_item_value_is_the_logit_difference_of_that_row(dataset_run):
    """Independent of specsight's frames: the model called directly on item 1's prompt."""
    lm = tiny()
    frame = dataset_run.to_pandas(items=True)
    row = frame[(frame.metric == "clean_ld") & (frame.item == 1)].iloc[0]
    with torch.inference_mode():
        logits = lm.model(torch.tensor([lm.tokenizer.encode(row.clean)])).logits[0, -1]
    target, foil = (lm.tokenizer.encode_plain(row.io)[0], lm.tokenizer.encode_plain(row.s)[0])
    assert row.value == pytest.approx(float(logits[target] - logits[foil]), rel=1e-4, abs=1e-4)


def test_the_dataset_lines_up_a_metric_with_its_companions(dataset_run):
    ds = dataset_run.to_xarray()
    assert ds["patched_ld"].dims == ds["patched_ld_stderr"].dims == ds["patched_ld_effect"].dims
    assert ds["patched_ld_items"].dims == ("layer", "pos", "item")
    assert list(ds.coords["io"].values) == [r["io"] for r in ROWS]  # dataset columns on item
    torch.testing.assert_close(
        torch.from_numpy(ds["patched_ld_stderr"].values), dataset_run["patched_ld/stderr"]
    )
    assert (
        list(ds.coords["pos_label"].values)
        == dataset_run.manifest["tensors"]["patched_ld"]["axis_labels"]["pos"]
    )


def test_a_run_shows_itself_inline_in_a_notebook(dataset_run):
    page = dataset_run._repr_html_()
    assert "<script" not in page and "patched_ld" in page
    # one coloured cell per cell of the layer x pos grid, each with its value on hover
    assert page.count('<td style="background:') == dataset_run["patched_ld"].numel()
    first = float(dataset_run["patched_ld"][0, 0])
    assert f"{first:+.2f}" in page or f"{first:+.3f}" in page
