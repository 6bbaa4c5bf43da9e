"""The manifest's record of what a run drew at random (``draws``), checked by hand: the
empirical std of ``std_of`` is the std of the reference rows' embeddings computed from the model
directly, the recorded seeds reproduce the noise (a hook adding ``std * randn`` with them gives
the run's probabilities), and the resample permutation moves every item and is what the run
read (a hand-written patch from item ``permutation[i]`` gives the run's values)."""

from __future__ import annotations

import pytest
import torch

import specsight
from tests.conftest import CLEAN, tiny

ROWS = [
    {"p": CLEAN},
    {"p": "Then Bob and Alice walked home, Alice gave a drink to"},
    {"p": "When Tom and Anna went to the park, Anna gave a book to"},
    {"p": "The cat sat on the mat and then it went to"},
]
NOISE = {
    "op": "noise",
    "site": "embed",
    "positions": [1, 2],
    "std_of": "clean",
    "scale": 3,
    "seed": 5,
}
RESAMPLE = {
    "op": "resample_ablate",
    "site": "resid_post.1",
    "positions": [-1],
    "from": "clean",
    "seed": 2,
}


@pytest.fixture(scope="module")
def run():
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": {"rows": ROWS},
        "invokes": {
            "clean": {"prompt": "{p}"},
            "noisy": {"prompt": "{p}", "ops": [NOISE]},
            "res": {"prompt": "{p}", "ops": [RESAMPLE]},
        },
        "metrics": {
            "noisy_p": {"kind": "prob", "invoke": "noisy", "token": " Mary"},
            "res_p": {"kind": "prob", "invoke": "res", "token": " Mary"},
        },
    }
    return specsight.run(spec, model=tiny())


def _embed_module(lm):
    return lm.model.get_input_embeddings()


def _last_prob(lm, tokens, hook_module=None, hook=None) -> float:
    handle = hook_module.register_forward_hook(hook) if hook_module is not None else None
    try:
        with torch.inference_mode():
            logits = lm.model(torch.tensor([tokens])).logits[0, -1]
    finally:
        if handle is not None:
            handle.remove()
    return float(logits.float().softmax(-1)[lm.tokenizer.encode_plain(" Mary")[0]])


def test_noise_records_its_seeds_and_the_std_it_measured(run):
    lm = tiny()
    [noise] = [d for d in run.manifest["draws"] if d["kind"] == "noise"]
    assert noise["op"] == "invokes.noisy.ops[0]" and noise["std_of"] == "clean"
    prompts = [lm.tokenizer.encode(r["p"]) for r in ROWS]
    with torch.inference_mode():
        values = torch.cat([_embed_module(lm)(torch.tensor(t)).double() for t in prompts])
    assert noise["empirical_std"] == pytest.approx(float(values.std()), rel=1e-6)
    assert noise["std"] == pytest.approx(3 * noise["empirical_std"], rel=1e-12)
    assert len(noise["seeds"]) == len(ROWS) and len(set(noise["seeds"])) == len(ROWS)
    for item, tokens in enumerate(prompts):
        seed = noise["seeds"][item]

        def add(_module, _inputs, out, seed=seed):
            draw = torch.randn(out[0, [1, 2]].shape, generator=torch.Generator().manual_seed(seed))
            out = out.clone()
            out[0, [1, 2]] += (draw * noise["std"]).to(out.dtype)
            return out

        by_hand = _last_prob(lm, tokens, _embed_module(lm), add)
        assert float(run["noisy_p"][item]) == pytest.approx(by_hand, rel=1e-4, abs=1e-6)


def test_resample_records_the_permutation_it_read(run):
    lm = tiny()
    [resample] = [d for d in run.manifest["draws"] if d["kind"] == "resample_ablate"]
    permutation = resample["permutation"]
    assert sorted(permutation) == list(range(len(ROWS)))
    assert all(permutation[i] != i for i in range(len(ROWS)))  # no item reads itself
    prompts = [lm.tokenizer.encode(r["p"]) for r in ROWS]
    layer = lm.model.model.layers[1]
    captured = {}

    def keep(_m, _i, out):
        captured["h"] = (out[0] if isinstance(out, tuple) else out)[0, -1].clone()

    for item, tokens in enumerate(prompts):
        _last_prob(lm, prompts[permutation[item]], layer, keep)
        source = captured["h"]

        def put(_m, _i, out, source=source):
            hidden = (out[0] if isinstance(out, tuple) else out).clone()
            hidden[0, -1] = source
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        by_hand = _last_prob(lm, tokens, layer, put)
        assert float(run["res_p"][item]) == pytest.approx(by_hand, rel=1e-4, abs=1e-6)
