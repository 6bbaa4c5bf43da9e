"""Per-item positions: ``{token: "{subject}", part: first | last | all}`` and positions read
from a column (an int, a slice string, a list), checked against the tokens found by hand and the
residual stream captured by a hand-written hook; the manifest records each row's positions and
the frames report them instead of slot numbers."""

from __future__ import annotations

import pytest
import torch

import specsight
from tests.conftest import tiny

ROWS = [
    {"p": "When Mary and John went to the store, John gave a drink to", "subject": " Mary and John",
     "last": 3, "span": "1:4"},
    {"p": "Then Bob and Alice walked home, Alice gave a drink to", "subject": " Bob and Alice",
     "last": 4, "span": "0:2"},
]  # fmt: skip


def _run(positions):
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": {"rows": ROWS},
        "invokes": {
            "a": {
                "prompt": "{p}",
                "ops": [
                    {"op": "save", "site": "resid_post.1", "positions": positions, "name": "r"}
                ],
            }
        },
    }
    return specsight.run(spec, model=tiny())


def _span(lm, row) -> list[int]:
    """The positions of the subject's tokens, found by hand."""
    tokens, needle = lm.tokenizer.encode(row["p"]), lm.tokenizer.encode_plain(row["subject"])
    start = next(i for i in range(len(tokens)) if tokens[i : i + len(needle)] == needle)
    return list(range(start, start + len(needle)))


def _resid(lm, row) -> torch.Tensor:
    out = {}

    def keep(_module, _inputs, output) -> None:
        out["h"] = (output[0] if isinstance(output, tuple) else output)[0].clone()

    handle = lm.model.model.layers[1].register_forward_hook(keep)
    try:
        with torch.inference_mode():
            lm.model(torch.tensor([lm.tokenizer.encode(row["p"])]))
    finally:
        handle.remove()
    return out["h"]


@pytest.mark.parametrize(
    "part, pick", [("last", lambda s: s[-1:]), ("first", lambda s: s[:1]), ("all", lambda s: s)]
)
def test_a_part_of_an_items_multi_token_text(part, pick):
    lm = tiny()
    results = _run({"token": "{subject}", "part": part})
    meta = results.manifest["tensors"]["r"]
    expected = [pick(_span(lm, row)) for row in ROWS]
    assert all(len(_span(lm, row)) > 1 for row in ROWS)  # the subjects are several tokens
    if len({tuple(e) for e in expected}) > 1:
        assert meta["row_positions"] == expected and "pos" not in meta["axis_values"]
    for item, row in enumerate(ROWS):
        hidden = _resid(lm, row)
        for slot, position in enumerate(expected[item]):
            torch.testing.assert_close(
                results["r"][item, slot], hidden[position], rtol=1e-5, atol=1e-5
            )


def test_positions_from_a_column():
    lm = tiny()
    for selector, expected in [
        (["{last}"], [[3], [4]]),
        ("{span}", [[1, 2, 3], [0, 1]]),
    ]:
        results = _run(selector)
        meta = results.manifest["tensors"]["r"]
        assert meta["row_positions"] == expected, selector
        for item, row in enumerate(ROWS):
            hidden = _resid(lm, row)
            got = results["r"][item, : len(expected[item])]
            torch.testing.assert_close(got, hidden[expected[item]], rtol=1e-5, atol=1e-5)


def test_frames_report_the_real_positions_not_slots():
    pandas = pytest.importorskip("pandas")
    results = _run({"token": "{subject}", "part": "last"})
    frame = results.to_pandas("r")
    lm = tiny()
    assert isinstance(frame, pandas.DataFrame)
    for item, row in enumerate(ROWS):
        assert set(frame[frame["item"] == item]["pos"]) == {_span(lm, row)[-1]}
    dataset = results.to_xarray()
    assert dataset["r_positions"].values.tolist() == [[_span(lm, row)[-1]] for row in ROWS]


def test_a_column_value_that_is_no_position_is_a_located_error():
    rows = [{**ROWS[0], "last": "middle"}]
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": {"rows": rows},
        "invokes": {
            "a": {
                "prompt": "{p}",
                "ops": [{"op": "save", "site": "resid_post.1", "positions": ["{last}"]}],
            }
        },
    }
    with pytest.raises(specsight.SpecError) as caught:
        specsight.run(spec, model=tiny())
    text = str(caught.value)
    assert "invokes.a.ops[0].positions[0]" in text and "'middle' is not a position" in text
    assert "sweep" not in text
