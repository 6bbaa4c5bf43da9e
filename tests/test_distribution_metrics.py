"""kl, loss and accuracy, checked against the model called directly with a hand-written hook:
KL(reference || run) from two softmaxes, the cross-entropy of every next-token prediction, and
whether the target is the top token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import specsight
from specsight.errors import SpecError
from tests.conftest import tiny
from tests.test_dataset import ROWS

FACTORS = [0.0, 0.5, 3.0]


def _spec(metrics: dict) -> dict:
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": {"rows": ROWS},
        "invokes": {
            "clean": {"prompt": "{clean}"},
            "scaled": {
                "prompt": "{clean}",
                "sweep": {"c": FACTORS},
                "ops": [{"op": "scale", "site": "resid_post.1", "factor": "{c}"}],
            },
        },
        "metrics": metrics,
    }


def _logits(lm, prompt: str, factor: float | None = None) -> torch.Tensor:
    handle = None
    if factor is not None:

        def scale(_m, _a, out):
            return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out * factor

        handle = lm.model.model.layers[1].register_forward_hook(scale)
    try:
        with torch.inference_mode():
            return lm.model(torch.tensor([lm.tokenizer.encode(prompt)])).logits[0].float()
    finally:
        if handle is not None:
            handle.remove()


def test_kl_loss_and_accuracy_match_the_model_called_directly():
    lm = tiny("tiny-llama")
    target = " to"
    results = specsight.run(
        _spec(
            {
                "kl": {"kind": "kl", "invoke": "scaled", "reference": "clean"},
                "kl_s": {
                    "kind": "kl",
                    "invoke": "scaled",
                    "reference": "clean",
                    "position": {"token": "{s}"},
                },
                "loss": {"kind": "loss", "invoke": "scaled"},
                "acc": {"kind": "accuracy", "invoke": "scaled", "target": target, "reduce": "sum"},
                "acc_items": {"kind": "accuracy", "invoke": "scaled", "target": "{s}"},
            }
        ),
        model=lm,
    )
    to = lm.tokenizer.encode_plain(target)[0]
    for c, factor in enumerate(FACTORS):
        correct = []
        for i, row in enumerate(ROWS):
            clean, run = _logits(lm, row["clean"]), _logits(lm, row["clean"], factor)
            p, logq = clean[-1].log_softmax(-1), run[-1].log_softmax(-1)
            assert results["kl"][c, i].item() == pytest.approx(
                float((p.exp() * (p - logq)).sum()), abs=1e-5
            )
            s_pos = lm.tokenizer.encode(row["clean"]).index(lm.tokenizer.encode_plain(row["s"])[0])
            p, logq = clean[s_pos].log_softmax(-1), run[s_pos].log_softmax(-1)
            assert results["kl_s"][c, i].item() == pytest.approx(
                float((p.exp() * (p - logq)).sum()), abs=1e-5
            )
            ids = torch.tensor(lm.tokenizer.encode(row["clean"]))
            want_loss = float(F.cross_entropy(run[:-1], ids[1:]))
            assert results["loss"][c, i].item() == pytest.approx(want_loss, abs=1e-5)
            correct.append(float(run[-1].argmax() == to))
        assert results["acc"][c].item() == sum(correct)
    # accuracy over items is their mean by default, with the 0/1 values kept
    assert results.axes("acc_items") == ["c"] and results.axes("acc_items/items") == ["c", "item"]
    torch.testing.assert_close(results["acc_items"], results["acc_items/items"].mean(-1))
    # no change, no divergence
    assert results["kl"][FACTORS.index(0.5)].abs().max() > 0
    assert (
        "KL(clean || scaled)"
        in specsight.compile_plan(
            specsight.load_spec(
                _spec({"kl": {"kind": "kl", "invoke": "scaled", "reference": "clean"}})
            ),
            lm.info,
            lm.tokenizer,
        ).explain()
    )


@pytest.mark.parametrize(
    "metric, expected",
    [
        ({"kind": "kl", "invoke": "scaled", "reference": "clen"}, "no invoke named 'clen'"),
        ({"kind": "kl", "invoke": "scaled", "reference": "scaled"}, "the KL is zero"),
        (
            {"kind": "kl", "invoke": "clean", "reference": "scaled"},
            "it has a sweep, or other prompts",
        ),
    ],
)
def test_kl_misuse_is_located(metric, expected):
    with pytest.raises(SpecError) as info:
        specsight.api.validate(_spec({"m": metric}))
    assert "metrics.m.reference" in str(info.value) and expected in str(info.value)


def test_a_kl_reference_runs_in_an_earlier_stage_and_a_loop_is_refused():
    lm = tiny("tiny-llama")
    spec = _spec({"kl": {"kind": "kl", "invoke": "clean", "reference": "base"}})
    spec["invokes"]["base"] = {
        "prompt": "{clean}",
        "ops": [{"op": "patch", "site": "resid_post.0", "from": "clean"}],
    }
    with pytest.raises(SpecError, match="invokes read from each other in a loop"):
        specsight.compile_plan(specsight.load_spec(spec), lm.info, lm.tokenizer)
