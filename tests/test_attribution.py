"""Attribution patching: gradient x (clean - corrupt) per [site, pos] against hand-computed
autograd and against exact activation patching (rank correlation) on tiny models."""

from __future__ import annotations

import pytest
import torch

import specsight
from specsight.api import compile_plan, load_spec
from specsight.errors import SpecError
from tests.conftest import CLEAN, CORRUPT, ioi_spec, tiny


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _spec(model: str) -> dict:
    atp = {"kind": "attribution", "clean": "clean", "corrupt": "corrupt", "target": 5, "foil": 7}
    return ioi_spec(
        model,
        patched="patched",
        baseline="corrupt",
        target=5,
        foil=7,
        clean_ld=False,
        metrics={"atp": atp},
    )


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_attribution_ranks_cells_like_exact_patching(model):
    m = tiny(model)
    results = specsight.run(_spec(model), model=m)
    atp = results["atp"]
    exact = results["ld"] - results["base_ld"]
    assert atp.shape == exact.shape == (m.info.n_layers, 14)
    assert results.axes("atp") == ["site", "pos"]
    # the prompts agree before position 9: patching there changes nothing, and AtP says 0
    assert atp[:, :9].abs().max() == 0 and exact[:, :9].abs().max() < 1e-5
    rho = _spearman(atp[:, 9:], exact[:, 9:])
    assert rho > 0.8, rho
    # the last layer's last position: the logit difference is nearly linear there
    torch.testing.assert_close(atp[-1, -1], exact[-1, -1], rtol=0.3, atol=1e-3)


def test_attribution_matches_hand_written_autograd():
    m = tiny("tiny-llama")
    results = specsight.run(_spec("tiny-llama"), model=m)
    layers = m.model.model.layers
    caches: dict[str, list[torch.Tensor]] = {"clean": [], "corrupt": []}
    for name, prompt in (("clean", CLEAN), ("corrupt", CORRUPT)):
        handles = [
            layer.register_forward_hook(
                lambda _m, _a, out, key=name: (out.retain_grad(), caches[key].append(out))[-1]
            )
            for layer in layers
        ]
        try:
            emb = m.model.get_input_embeddings()(torch.tensor([m.tokenizer.encode(prompt)]))
            logits = m.model(inputs_embeds=emb.detach().requires_grad_(True)).logits
            if name == "corrupt":
                (logits[0, -1, 5] - logits[0, -1, 7]).backward()
        finally:
            for h in handles:
                h.remove()
            m.model.zero_grad(set_to_none=True)
    expected = torch.stack(
        [
            (cor.grad[0] * (cl[0] - cor[0])).sum(-1)
            for cl, cor in zip(caches["clean"], caches["corrupt"])
        ]
    ).detach()
    torch.testing.assert_close(results["atp"], expected, atol=1e-5, rtol=1e-4)


def test_attribution_errors():
    m = tiny("tiny-llama")
    spec = _spec("tiny-llama")
    spec["invokes"]["corrupt"]["prompt"] = "Mary gave a drink to"
    spec["backward"] = {"metric": "base_ld"}
    with pytest.raises(SpecError) as err:
        compile_plan(load_spec(spec), m.info, m.tokenizer)
    codes = {(i.code, i.path) for i in err.value.issues}
    assert ("bad-attribution", ("metrics", "atp", "corrupt")) in codes
    assert ("one-backward", ("metrics", "atp", "kind")) in codes
