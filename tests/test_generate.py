"""Generation: step selection, KV-cache positions, per-step saves, steering parity with a
hand-written hook under ``model.generate``, batching with left padding, seeded sampling."""

from __future__ import annotations

import pytest
import torch

import specsight
from specsight.api import compile_plan, load_spec
from specsight.engine import hidden_of, replace_hidden
from specsight.errors import SpecError
from specsight.plan import Generation
from specsight.sites import resolve_site
from tests.conftest import tiny

PROMPTS = ["The quick brown fox jumps", "Hello", "One two three"]


def _spec(model: str, ops: list, prompt=PROMPTS[0], n: int = 6, sampling="greedy", **extra):
    invoke = {"prompt": prompt, "generate": {"max_new_tokens": n, "sampling": sampling}}
    return {"specsight": 1, "model": model, "invokes": {"g": {**invoke, "ops": ops}}, **extra}


def _plan(spec):
    m = tiny(spec["model"])
    return compile_plan(load_spec(spec), m.info, m.tokenizer)


def _errors(spec):
    with pytest.raises(SpecError) as err:
        _plan(spec)
    return err.value.issues


def _steer(m, layer: int, seed: int = 1, scale: float = 4.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m.info.d_model, generator=gen) * scale).tolist()


# --- compile: steps --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "positions, steps, expected",
    [
        ("all", None, (0, 1, 2, 3, 4, 5)),
        ("last", "1:3", (1, 2)),
        (-1, [0, 5], (0, 5)),
        ([2], None, (0,)),  # prompt positions: the prompt pass only
        ("first", "prompt", (0,)),
        ("last", ":2", (0, 1)),
    ],
)
def test_step_selection(positions, steps, expected):
    op = {"op": "zero", "site": "resid_post.0", "positions": positions}
    if steps is not None:
        op["steps"] = steps
    plan = _plan(_spec("tiny-llama", [op]))
    assert {o.steps for o in plan.ops} == {expected}
    (forward,) = plan.forwards
    assert forward.generate == Generation(max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize(
    "op, code, path",
    [
        ({"positions": [2], "steps": [3]}, "unreachable-steps", ("steps",)),
        ({"positions": "first", "steps": "1:4"}, "unreachable-steps", ("steps",)),
        ({"positions": "last", "steps": [6]}, "bad-steps", ("steps", 0)),
        ({"positions": "last", "steps": "2:9"}, "bad-steps", ("steps",)),
    ],
)
def test_unreachable_steps_are_located_errors(op, code, path):
    (issue,) = _errors(_spec("tiny-llama", [{"op": "zero", "site": "resid_post.0", **op}]))
    assert issue.code == code
    assert issue.path == ("invokes", "g", "ops", 0, *path)


def test_generation_rejections():
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {
            "plain": {"prompt": "hi", "ops": [{"op": "zero", "site": "embed", "steps": "all"}]},
            "g": {
                "prompt": "hi",
                "generate": {"max_new_tokens": 2},
                "sweep": {"layer": [0]},
                "ops": [{"op": "zero", "site": "resid_post.{layer}"}],
            },
        },
        "metrics": {"m": {"kind": "top_k", "invoke": "g"}},
    }
    codes = {i.code for i in _errors(spec)}
    assert "steps-without-generate" in codes and "generate-sweep" not in codes
    spec["invokes"]["g"].pop("sweep")
    spec["invokes"]["g"]["ops"] = []
    spec["invokes"]["plain"]["ops"] = []
    assert {i.code for i in _errors(spec)} == {"generate-metric"}


# --- engine -------------------------------------------------------------------------------


def _hand_generate(m, prompt_ids, n, layer=None, vector=None, coeff=1.0):
    """model.generate with a hand-written forward hook adding coeff * vector at a layer."""
    handles = []
    if layer is not None:
        module = dict(m.model.named_modules())[
            resolve_site(f"resid_post.{layer}", m.info)[0].module
        ]
        v = torch.tensor(vector, dtype=torch.float32)

        def hook(_mod, _args, output):
            return replace_hidden(output, hidden_of(output) + coeff * v)

        handles.append(module.register_forward_hook(hook))
    try:
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            out = m.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=m.tokenizer.pad_id,
            )
    finally:
        for h in handles:
            h.remove()
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_greedy_steering_matches_hand_written_hook(model):
    m = tiny(model)
    vector = _steer(m, 1)
    op = {"op": "add", "site": "resid_post.1", "vector": vector, "coeff": 2.0}
    results = specsight.run(_spec(model, [op], n=8), model=m)
    ours = results["g/generated_ids"][0].tolist()
    ids = m.tokenizer.encode(PROMPTS[0])
    assert ours == _hand_generate(m, ids, 8, layer=1, vector=vector, coeff=2.0)
    plain = specsight.run(_spec(model, [], n=8), model=m)["g/generated_ids"][0].tolist()
    assert plain == _hand_generate(m, ids, 8)
    assert ours != plain, "the steering vector should change the greedy output"


@pytest.mark.parametrize("max_batch", [None, 2])
def test_a_swept_generating_invoke_matches_one_hand_written_generation_per_cell(max_batch):
    m = tiny("tiny-llama")
    vector = _steer(m, 1)
    coeffs = [0.0, 1.0, 4.0]
    op = {"op": "add", "site": "resid_post.1", "vector": vector, "coeff": "{coeff}"}
    spec = _spec("tiny-llama", [op], prompt=PROMPTS[:2], n=5)
    spec["invokes"]["g"]["sweep"] = {"coeff": coeffs}
    results = specsight.run(spec, model=m, max_batch=max_batch)
    ids = results["g/generated_ids"]
    assert ids.shape[:2] == (3, 2) and results.axes("g/generated_ids") == [
        "coeff",
        "prompt",
        "new_token",
    ]
    for c, coeff in enumerate(coeffs):
        for p, prompt in enumerate(PROMPTS[:2]):
            want = _hand_generate(
                m, m.tokenizer.encode(prompt), 5, layer=1, vector=vector, coeff=coeff
            )
            assert ids[c, p, : len(want)].tolist() == want
    entries = results.manifest["generated"]["g"]
    assert [e["cell"]["coeff"] for e in entries] == [0.0, 0.0, 1.0, 1.0, 4.0, 4.0]
    assert "g[coeff=4.0, 1]" in results.summary()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_batched_prompts_of_different_lengths_match_one_by_one(model):
    m = tiny(model)
    op = {"op": "add", "site": "resid_post.0", "vector": _steer(m, 0, scale=2.0)}
    batched = specsight.run(_spec(model, [op], prompt=PROMPTS, n=6), model=m)
    assert batched["g/generated_ids"].shape == (3, 6)
    for i, prompt in enumerate(PROMPTS):
        alone = specsight.run(_spec(model, [op], prompt=prompt, n=6), model=m)
        assert batched["g/generated_ids"][i].tolist() == alone["g/generated_ids"][0].tolist()
    texts = [e["text"] for e in batched.manifest["generated"]["g"]]
    assert len(texts) == 3 and "generated" in batched.summary()


def test_per_step_saves_follow_the_kv_cache():
    """Step 0 saves the prompt's positions, step s the new token s-1: the same values as a
    plain forward over the prompt and the tokens generated so far."""
    m = tiny("tiny-llama")
    n = 4
    spec = _spec(
        "tiny-llama", [{"op": "save", "site": "resid_post.1", "name": "h"}], prompt=PROMPTS, n=n
    )
    results = specsight.run(spec, model=m)
    saved = results["h"]  # [prompt, step, position, hidden]
    assert saved.shape[:2] == (3, n) and results.axes("h")[:2] == ["prompt", "step"]
    module = dict(m.model.named_modules())[resolve_site("resid_post.1", m.info)[0].module]
    seen: dict[str, torch.Tensor] = {}
    for i, prompt in enumerate(PROMPTS):
        ids = m.tokenizer.encode(prompt)
        full = ids + results["g/generated_ids"][i].tolist()[: n - 1]
        handle = module.register_forward_hook(
            lambda _m, _a, out: seen.__setitem__("h", hidden_of(out)[0].clone())
        )
        try:
            with torch.inference_mode():
                m.model(input_ids=torch.tensor([full]))
        finally:
            handle.remove()
        torch.testing.assert_close(
            saved[i, 0, : len(ids)], seen["h"][: len(ids)], atol=1e-4, rtol=1e-4
        )
        assert torch.isnan(saved[i, 0, len(ids) :]).all()  # padding of the prompt axis
        for step in range(1, n):
            torch.testing.assert_close(
                saved[i, step, 0], seen["h"][len(ids) + step - 1], atol=1e-4, rtol=1e-4
            )


def test_prompt_only_op_changes_only_the_prompt_pass():
    m = tiny("tiny-llama")
    spec = _spec(
        "tiny-llama",
        [
            {"op": "zero", "site": "resid_post.0", "positions": [1]},
            {"op": "save", "site": "resid_post.0", "positions": "last", "name": "h"},
        ],
        n=3,
    )
    plan = _plan(spec)
    assert [o.steps for o in plan.ops] == [(0,), (0, 1, 2)]
    results = specsight.run(spec, model=m)
    assert results["h"].shape == (3, 1, m.info.d_model)


def test_sampling_is_deterministic_with_a_seed():
    m = tiny("tiny-llama")

    def sample(seed):
        sampling = {"temperature": 2.0, "top_p": 0.95, "seed": seed}
        spec = _spec("tiny-llama", [], prompt=PROMPTS, n=10, sampling=sampling)
        return specsight.run(spec, model=m)["g/generated_ids"]

    first = sample(3)
    assert torch.equal(first, sample(3))
    assert not torch.equal(first, sample(4))


def test_tiny_steering_twin_runs_with_saved_vectors():
    from tests.conftest import GOLDEN

    m = tiny("tiny-llama")
    results = specsight.run(GOLDEN / "specs" / "steering_generate_tiny.yaml", model=m)
    assert results["steered/generated_ids"].shape == (2, 8)
    assert results["new_tokens"].shape == (2, 7, 1, m.info.d_model)
    assert not torch.isnan(results["new_tokens"]).any()
    again = specsight.run(GOLDEN / "specs" / "steering_generate_tiny.yaml", model=m)
    assert torch.equal(results["steered/generated_ids"], again["steered/generated_ids"])


def test_generation_plan_json_round_trip():
    from specsight.plan import Plan

    ops = [{"op": "save", "site": "resid_post.0", "positions": "last", "steps": "1:3"}]
    plan = _plan(_spec("tiny-llama", ops, sampling={"temperature": 0.5, "top_p": 0.9, "seed": 2}))
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.forwards[0].generate.do_sample is True
