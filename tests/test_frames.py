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
    dataset = results.to_xarray()
    assert set(dataset.data_vars) == set(results.tensors)


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
