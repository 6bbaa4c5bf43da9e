"""Steering vectors from contrastive data (``vector: {mean_diff: [positive, negative]}``), as a
hand-written CAA script computes them: the mean of the positive prompts' values at a site minus
the negative prompts', pooled or per position, scaled to length 1 or to the site's own length,
added with a swept coefficient; and located errors for sets that do not fit."""

from __future__ import annotations

import pytest
import torch

import specsight
from specsight.errors import SpecError
from tests.conftest import tiny

POSITIVE = ["I love this, it is wonderful", "What a great and happy day", "This is excellent"]
NEGATIVE = ["I hate this, it is awful", "What a terrible and sad day", "This is horrible"]
STEERED = "I think that the movie was"
LAYER, COEFFS = 1, [0.0, 2.0, -3.0]


def _spec(vector: dict, positions: list | str = (-1,), op: str = "add") -> dict:
    saved = {"op": "save", "site": f"resid_post.{LAYER}", "positions": list(positions)}
    steer = {"op": op, "site": f"resid_post.{LAYER}", "positions": [-2, -1]}
    steer.update({"vector": vector, "coeff": "{c}"} if op == "add" else {"value": vector})
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {
            "pos": {"prompt": POSITIVE, "ops": [{**saved, "name": "p"}]},
            "neg": {"prompt": NEGATIVE, "ops": [{**saved, "name": "n"}]},
            "steered": {
                "prompt": STEERED,
                **({"sweep": {"c": COEFFS}} if op == "add" else {}),
                "ops": [steer, {"op": "save", "site": "logits", "positions": [-1], "name": "out"}],
            },
        },
    }


def _by_hand(lm, reduce: str, norm: str, op: str = "add") -> list[torch.Tensor]:
    """The CAA script: hooks collect the last residual values of each set, the difference of
    their means is added (or set) at the steered prompt's last two positions."""
    layer = lm.model.model.layers[LAYER]
    kept: list[torch.Tensor] = []

    def keep(_m, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        kept.append(hidden[0, -1:].detach().float())

    def mean_of(prompts):
        kept.clear()
        handle = layer.register_forward_hook(keep)
        for text in prompts:
            lm.model(torch.tensor([lm.tokenizer.encode(text)]))
        handle.remove()
        rows = torch.stack(kept)  # [prompts, 1, width]
        return rows.mean(0) if reduce == "none" else rows.reshape(-1, rows.shape[-1]).mean(0)

    out = []
    with torch.inference_mode():
        diff = mean_of(POSITIVE) - mean_of(NEGATIVE)
        for coeff in COEFFS if op == "add" else [None]:

            def steer(_m, _args, output, coeff=coeff):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden = hidden.clone()
                vector = diff / diff.norm(dim=-1, keepdim=True) if norm == "unit" else diff
                if norm == "match_site":
                    vector = diff / diff.norm(dim=-1, keepdim=True)
                    vector = vector * hidden[0, -2:].norm(dim=-1).mean()
                if op == "add":
                    hidden[0, -2:] = hidden[0, -2:] + coeff * vector
                else:
                    hidden[0, -2:] = vector.expand(2, -1)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            handle = layer.register_forward_hook(steer)
            logits = lm.model(torch.tensor([lm.tokenizer.encode(STEERED)])).logits[0, -1]
            handle.remove()
            out.append(logits)
    return out


@pytest.mark.parametrize("reduce", ["mean", "none"])
@pytest.mark.parametrize("norm", ["none", "unit", "match_site"])
def test_a_mean_difference_steers_as_a_hand_written_caa_script(reduce, norm):
    lm = tiny("tiny-llama")
    vector = {"mean_diff": ["p", "n"], "reduce": reduce, "norm": norm}
    got = specsight.run(_spec(vector), model=lm).saves["out"]  # [c, 1, vocab]
    for i, expected in enumerate(_by_hand(lm, reduce, norm)):
        torch.testing.assert_close(got[i, 0], expected, rtol=1e-5, atol=1e-5)


def test_a_mean_difference_can_be_set():
    lm = tiny("tiny-llama")
    vector = {"mean_diff": ["p", "n"], "norm": "match_site"}
    got = specsight.run(_spec(vector, op="set"), model=lm).saves["out"]
    torch.testing.assert_close(
        got[0], _by_hand(lm, "mean", "match_site", op="set")[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    ("vector", "positions", "code", "where"),
    [
        ({"mean_diff": ["p", "nn"]}, [-1], "unknown-saved", ("mean_diff", 1)),
        ({"mean_diff": ["p", "n"], "reduce": "none"}, [-3, -2, -1], "position-count", ("mean_diff", 0)),
        ({"mean_diff": ["p", "n"], "norm": "both"}, [-1], "bad-value", ("norm",)),
        ({"mean_diff": ["p"]}, [-1], "bad-value", ("mean_diff",)),
    ],
)  # fmt: skip
def test_sets_that_do_not_fit_are_located_errors(vector, positions, code, where):
    with pytest.raises(SpecError) as err:
        specsight.run(_spec(vector, positions=positions), model=tiny("tiny-llama"))
    issues = err.value.issues
    assert any(i.path == ("invokes", "steered", "ops", 0, "vector", *where) for i in issues), (
        err.value.render()
    )
    assert code in {i.code for i in issues} or code in err.value.render(), err.value.render()


def test_a_set_of_another_width_is_a_located_error():
    spec = _spec({"mean_diff": ["p", "n"]})
    spec["invokes"]["neg"]["ops"][0]["site"] = f"mlp_act.{LAYER}"
    with pytest.raises(SpecError) as err:
        specsight.run(spec, model=tiny("tiny-llama"))
    (issue,) = err.value.issues
    assert issue.code == "vector-size"
    assert issue.path == ("invokes", "steered", "ops", 0, "vector", "mean_diff", 1)


def test_a_mean_difference_runs_remotely_as_it_runs_locally(tmp_path):
    """Through the client and the server's app (in process, tiny-llama): the same tensors."""
    import json

    from specsight.remote.submit import run_remote
    from tests.test_remote_client import URL, FakeServer, assert_same_tensors

    path = tmp_path / "caa.json"
    path.write_text(json.dumps(_spec({"mean_diff": ["p", "n"], "norm": "match_site"})))
    fake = FakeServer()
    with fake.client() as client:
        remote = run_remote(path, URL, client=client)
    assert_same_tensors(remote, specsight.run(path))
