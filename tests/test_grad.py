"""Gradients: ``backward: {metric}`` and ``save`` with ``grad: true`` against hand-written
torch autograd on tiny models; frozen parameters; located errors where no gradient exists."""

from __future__ import annotations

import pytest
import torch

import specsight
from specsight.api import compile_plan, load_spec
from specsight.errors import SpecError
from specsight.sites import resolve_site
from tests.conftest import tiny

PROMPTS = ["When Mary and John went to the store", "Hello there"]


def _spec(model, prompt, ops, **extra):
    return {
        "specsight": 1,
        "model": model,
        "invokes": {"x": {"prompt": prompt, "ops": ops}},
        "metrics": {"ld": {"kind": "logit_diff", "invoke": "x", "target": 5, "foil": 7}},
        "backward": {"metric": "ld"},
        **extra,
    }


def _hand_grads(m, prompt, layer, add=None):
    """d(logit 5 - logit 7 at the last position) w.r.t. the embedding output and a layer's
    output, by plain torch autograd."""
    ids = torch.tensor([m.tokenizer.encode(prompt)])
    module = dict(m.model.named_modules())[resolve_site(f"resid_post.{layer}", m.info)[0].module]
    kept = {}

    def hook(_mod, _args, output):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        if add is not None:
            hidden = hidden + torch.tensor(add)
        hidden.retain_grad()
        kept["h"] = hidden
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    handle = module.register_forward_hook(hook)
    try:
        emb = m.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = m.model(inputs_embeds=emb).logits
        (logits[0, -1, 5] - logits[0, -1, 7]).backward()
    finally:
        handle.remove()
        m.model.zero_grad(set_to_none=True)
    return emb.grad[0], kept["h"].grad[0]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_gradients_match_hand_written_autograd(model):
    m = tiny(model)
    ops = [
        {"op": "save", "site": "embed", "grad": True},
        {"op": "save", "site": "resid_post.1", "grad": True},
        {"op": "save", "site": "resid_post.1"},
    ]
    results = specsight.run(_spec(model, PROMPTS, ops), model=m)
    assert set(results.saves) == {"x/embed/grad", "x/resid_post.1/grad", "x/resid_post.1"}
    for i, prompt in enumerate(PROMPTS):
        n = len(m.tokenizer.encode(prompt))
        emb, layer = _hand_grads(m, prompt, 1)
        torch.testing.assert_close(results["x/embed/grad"][i, :n], emb, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            results["x/resid_post.1/grad"][i, :n], layer, atol=1e-5, rtol=1e-4
        )
    assert all(not p.requires_grad or p.grad is None for p in m.model.parameters())
    assert all(p.grad is None for p in m.model.parameters())


def test_gradients_with_a_steering_op_in_the_same_forward():
    m = tiny("tiny-llama")
    vector = (torch.randn(m.info.d_model, generator=torch.Generator().manual_seed(0))).tolist()
    ops = [
        {"op": "add", "site": "resid_post.1", "vector": vector},
        {"op": "save", "site": "resid_post.1", "grad": True, "name": "g"},
    ]
    results = specsight.run(_spec("tiny-llama", PROMPTS[0], ops), model=m)
    _, layer = _hand_grads(m, PROMPTS[0], 1, add=vector)
    torch.testing.assert_close(results["g"], layer, atol=1e-5, rtol=1e-4)


def _codes(spec):
    m = tiny("tiny-llama")
    with pytest.raises(SpecError) as err:
        compile_plan(load_spec(spec), m.info, m.tokenizer)
    return {(i.code, i.path) for i in err.value.issues}


def test_gradient_errors_are_located():
    grad = {"op": "save", "site": "embed", "grad": True}
    spec = _spec("tiny-llama", "hi", [grad])
    spec.pop("backward")
    assert _codes(spec) == {("grad-without-backward", ("invokes", "x", "ops", 0, "grad"))}
    spec = _spec("tiny-llama", "hi", [grad], backward={"metric": "top"})
    spec["metrics"]["top"] = {"kind": "top_k", "invoke": "x"}
    assert ("backward-kind", ("backward", "metric")) in _codes(spec)
    spec = _spec("tiny-llama", "hi", [], backward={"metric": "lb"})
    assert ("unknown-metric", ("backward", "metric")) in _codes(spec)
    spec = _spec("tiny-llama", "hi", [])
    spec["invokes"]["g"] = {"prompt": "hi", "generate": {"max_new_tokens": 2}, "ops": [grad]}
    assert _codes(spec) == {("grad-generate", ("invokes", "g", "ops", 0, "grad"))}
    spec = _spec("tiny-llama", "hi", [])
    spec["invokes"]["y"] = {"prompt": "hi", "ops": [grad]}
    assert _codes(spec) == {("grad-invoke", ("invokes", "y", "ops", 0, "grad"))}


def test_index_tensors_cached_in_inference_mode_serve_a_later_backward():
    """Position and column indices are cached across runs; one made during an inference-mode
    run must still work inside a backward run (with a prompt length no other test uses)."""
    m = tiny("tiny-llama")
    prompt = "Mary and John went to the big old store"
    ops = [{"op": "save", "site": "resid_post.1"}, {"op": "save", "site": "q.1", "heads": [1]}]
    plain = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"x": {"prompt": prompt, "ops": ops}},
    }
    specsight.run(plain, model=m)
    grads = [{**op, "grad": True, "name": f"g{i}"} for i, op in enumerate(ops)]
    results = specsight.run(_spec("tiny-llama", prompt, grads), model=m)
    assert torch.isfinite(results["g0"]).all() and results["g1"].abs().sum() > 0
