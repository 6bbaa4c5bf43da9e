"""Engine tests on tiny models: parity with the plain forward, batching, every op against
hand-written torch hooks, and hook cleanup after success and failure."""

from __future__ import annotations

import pytest
import torch

import specsight
from specsight.errors import RunError
from tests.conftest import tiny

PROMPT = "When Mary and John went to the store, John gave a drink to"
PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is in",
    "Mary went to Paris and then to the city of love",
]


def spec(model: str, invokes: dict, metrics: dict | None = None) -> dict:
    return {"specsight": 1, "model": model, "invokes": invokes, "metrics": metrics or {}}


def plain_logits(loaded, prompt: str) -> torch.Tensor:
    ids = torch.tensor([loaded.tokenizer.encode(prompt)])
    with torch.inference_mode():
        return loaded.model(input_ids=ids).logits[0]


def hooked_logits(loaded, prompt: str, module: str, fn, *, pre: bool = False) -> torch.Tensor:
    """Hand-written torch: one hook that rewrites a module's output (or input) tensor."""
    mod = dict(loaded.model.named_modules())[module]
    if pre:
        handle = mod.register_forward_pre_hook(lambda m, args: (fn(args[0].clone()), *args[1:]))
    else:
        handle = mod.register_forward_hook(
            lambda m, a, out: (
                fn(out.clone()) if torch.is_tensor(out) else (fn(out[0].clone()), *out[1:])
            )
        )
    try:
        return plain_logits(loaded, prompt)
    finally:
        handle.remove()


def all_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_no_ops_reproduces_plain_forward_exactly(name):
    loaded = tiny(name)
    results = specsight.run(
        spec(name, {"a": {"prompt": PROMPT, "ops": [{"op": "save", "site": "logits"}]}}),
        model=loaded,
    )
    expected = plain_logits(loaded, PROMPT)
    assert torch.equal(results["a/logits"], expected)
    top = specsight.run(
        spec(name, {"a": {"prompt": PROMPT}}, {"top": {"kind": "top_k", "invoke": "a", "k": 5}}),
        model=loaded,
    )
    # Metrics only need the last position's logits, so the engine unembeds just that one, as
    # the plain forward does with logits_to_keep=1 (what generation uses): bit-identical to it,
    # and equal to the all-positions forward up to float rounding.
    ids_in = torch.tensor([loaded.tokenizer.encode(PROMPT)])
    with torch.inference_mode():
        last = loaded.model(input_ids=ids_in, logits_to_keep=1).logits[0, -1]
    probs, ids = torch.softmax(last, -1).topk(5)
    assert torch.equal(top["top/ids"], ids)
    assert torch.equal(top["top"], probs)
    torch.testing.assert_close(top["top"], torch.softmax(expected[-1], -1)[ids], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_batched_prompts_of_different_lengths_match_one_by_one(name):
    loaded = tiny(name)
    lengths = {len(loaded.tokenizer.encode(p)) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS), "prompts must differ in length for this test"
    results = specsight.run(
        spec(
            name,
            {"many": {"prompt": PROMPTS, "ops": [{"op": "save", "site": "logits"}]}},
            {"lp": {"kind": "logprob", "invoke": "many", "tokens": [" Mary", " Paris"]}},
        ),
        model=loaded,
    )
    saved = results["many/logits"]  # [prompt, position (NaN-padded), vocab]
    assert results.manifest["tensors"]["many/logits"]["padded_with_nan"]
    for i, prompt in enumerate(PROMPTS):
        alone = plain_logits(loaded, prompt)
        n = alone.shape[0]
        torch.testing.assert_close(saved[i, :n], alone, rtol=0, atol=1e-5)
        assert torch.isnan(saved[i, n:]).all()
        ids = [loaded.tokenizer.encode_plain(t)[0] for t in (" Mary", " Paris")]
        expected = torch.log_softmax(alone[-1], -1)[ids]
        torch.testing.assert_close(results["lp"][i], expected, rtol=0, atol=1e-5)


def _run_op(loaded, op: dict, name: str = "tiny-llama") -> torch.Tensor:
    results = specsight.run(
        spec(name, {"a": {"prompt": PROMPT, "ops": [op, {"op": "save", "site": "logits"}]}}),
        model=loaded,
    )
    return results["a/logits"]


def test_zero_matches_hand_written_hook():
    loaded = tiny("tiny-llama")

    def fn(h):
        h[0, [2, 5]] = 0
        return h

    got = _run_op(loaded, {"op": "zero", "site": "resid_post.1", "positions": [2, 5]})
    expected = hooked_logits(loaded, PROMPT, "model.layers.1", fn)
    assert torch.equal(got, expected)
    assert not torch.allclose(got, plain_logits(loaded, PROMPT))


def test_scale_matches_hand_written_hook():
    loaded = tiny("tiny-llama")

    def fn(h):
        h[0, -1] = h[0, -1] * 3.0
        return h

    got = _run_op(loaded, {"op": "scale", "site": "mlp_out.2", "positions": "last", "factor": 3})
    assert torch.equal(got, hooked_logits(loaded, PROMPT, "model.layers.2.mlp", fn))


def test_add_inline_vector_matches_hand_written_hook():
    loaded = tiny("tiny-llama")
    vector = [((i * 37) % 11 - 5) / 10 for i in range(loaded.info.d_model)]

    def fn(h):
        h[0, 3:6] = h[0, 3:6] + torch.tensor(vector) * 2.0
        return h

    got = _run_op(
        loaded,
        {"op": "add", "site": "resid_post.0", "positions": "3:6", "vector": vector, "coeff": 2},
    )
    torch.testing.assert_close(
        got, hooked_logits(loaded, PROMPT, "model.layers.0", fn), rtol=0, atol=1e-6
    )


def test_add_vector_from_npy_file_beside_the_spec(tmp_path):
    import numpy as np
    import yaml

    loaded = tiny("tiny-llama")
    vector = np.linspace(-1, 1, loaded.info.d_model).astype("float32")
    np.save(tmp_path / "steer.npy", vector)
    (tmp_path / "s.yaml").write_text(
        yaml.safe_dump(
            spec(
                "tiny-llama",
                {
                    "a": {
                        "prompt": PROMPT,
                        "ops": [
                            {"op": "add", "site": "resid_post.1", "vector": {"file": "steer.npy"}},
                            {"op": "save", "site": "logits"},
                        ],
                    }
                },
            )
        )
    )

    def fn(h):
        h[0] = h[0] + torch.from_numpy(vector)
        return h

    got = specsight.run(tmp_path / "s.yaml", model=loaded)["a/logits"]
    torch.testing.assert_close(
        got, hooked_logits(loaded, PROMPT, "model.layers.1", fn), rtol=0, atol=1e-6
    )


def test_set_and_patch_match_hand_written_hooks():
    loaded = tiny("tiny-llama")
    clean = "When Mary and John went to the store, Mary gave a drink to"
    captured = {}
    mod = loaded.model.model.layers[2]
    handle = mod.register_forward_hook(lambda m, a, out: captured.update(h=out[0].clone()))
    plain_logits(loaded, clean)
    handle.remove()

    def patch(h):
        h[0, 9] = captured["h"][9]
        return h

    results = specsight.run(
        spec(
            "tiny-llama",
            {
                "clean": {"prompt": clean},
                "corrupt": {
                    "prompt": PROMPT,
                    "ops": [
                        {"op": "patch", "site": "resid_post.2", "positions": [9], "from": "clean"},
                        {"op": "save", "site": "logits"},
                    ],
                },
            },
        ),
        model=loaded,
    )
    assert torch.equal(
        results["corrupt/logits"], hooked_logits(loaded, PROMPT, "model.layers.2", patch)
    )

    value = [0.5] * loaded.info.d_model

    def set_fn(h):
        h[0, 0] = 0.5
        return h

    got = _run_op(loaded, {"op": "set", "site": "attn_out.1", "positions": 0, "value": value})
    assert torch.equal(got, hooked_logits(loaded, PROMPT, "model.layers.1.self_attn", set_fn))


def test_patch_with_token_selectors_across_prompts():
    loaded = tiny("tiny-llama")
    results = specsight.run(
        spec(
            "tiny-llama",
            {
                "src": {
                    "prompt": "The Eiffel Tower is in Paris",
                    "ops": [
                        {"op": "save", "site": "resid_post.1", "positions": {"token": " Paris"}}
                    ],
                },
                "dst": {
                    "prompt": PROMPT,
                    "ops": [
                        {
                            "op": "patch",
                            "site": "resid_post.1",
                            "positions": {"token": " John", "occurrence": 2},
                            "source_positions": {"token": " Paris"},
                            "from": "src",
                        },
                        {
                            "op": "save",
                            "site": "resid_post.1",
                            "positions": {"token": " John", "occurrence": -1},
                        },
                    ],
                },
            },
        ),
        model=loaded,
    )
    torch.testing.assert_close(
        results["dst/resid_post.1"], results["src/resid_post.1"], rtol=0, atol=0
    )


def test_resid_mid_edit_changes_the_residual_itself():
    """Zeroing resid_mid (a norm's input) must change the residual, not only the norm's view."""
    loaded = tiny("tiny-llama")
    got = _run_op(loaded, {"op": "zero", "site": "resid_mid.1", "positions": "all"})
    layer = loaded.model.model.layers[1]

    def manual(hidden_states, *args, **kwargs):
        residual = hidden_states
        h = layer.input_layernorm(hidden_states)
        h, _ = layer.self_attn(hidden_states=h, **kwargs)
        h = torch.zeros_like(residual + h)  # resid_mid zeroed
        return h + layer.mlp(layer.post_attention_layernorm(h))

    layer.forward = manual  # the reference, by hand (and taken away after: a shared model)
    try:
        expected = plain_logits(loaded, PROMPT)
    finally:
        del layer.forward
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_saved_value_feeds_add_with_mean():
    loaded = tiny("tiny-llama")
    results = specsight.run(
        spec(
            "tiny-llama",
            {
                "src": {
                    "prompt": ["I love it", "We love them all"],
                    "ops": [{"op": "save", "site": "resid_post.0", "name": "love"}],
                },
                "dst": {
                    "prompt": PROMPT,
                    "ops": [
                        {
                            "op": "add",
                            "site": "resid_post.0",
                            "positions": "last",
                            "vector": {"saved": "love", "reduce": "mean"},
                        },
                        {"op": "save", "site": "logits"},
                    ],
                },
            },
        ),
        model=loaded,
    )
    saved = results["love"]  # [prompt, position (NaN padded), hidden]
    mean = torch.cat([row[~torch.isnan(row).any(-1)] for row in saved]).mean(0)

    def fn(h):
        h[0, -1] = h[0, -1] + mean
        return h

    torch.testing.assert_close(
        results["dst/logits"],
        hooked_logits(loaded, PROMPT, "model.layers.0", fn),
        rtol=0,
        atol=1e-5,
    )


def test_sweep_cells_match_single_runs_and_chunking_does_not_matter():
    loaded = tiny("tiny-llama")
    body = {
        "clean": {"prompt": "When Mary and John went to the store, Mary gave a drink to"},
        "corrupt": {
            "prompt": PROMPT,
            "sweep": {"layer": "all", "pos": [0, 9, 13]},
            "ops": [
                {
                    "op": "patch",
                    "site": "resid_post.{layer}",
                    "positions": ["{pos}"],
                    "from": "clean",
                }
            ],
        },
    }
    metrics = {
        "ld": {"kind": "logit_diff", "invoke": "corrupt", "target": " Mary", "foil": " John"}
    }
    big = specsight.run(spec("tiny-llama", body, metrics), model=loaded)["ld"]
    small = specsight.run(spec("tiny-llama", body, metrics), model=loaded, max_batch=5)["ld"]
    assert big.shape == (loaded.info.n_layers, 3)
    torch.testing.assert_close(big, small, rtol=0, atol=1e-5)
    for layer in (0, 3):
        single = specsight.run(
            spec(
                "tiny-llama",
                {
                    "clean": body["clean"],
                    "corrupt": {
                        "prompt": PROMPT,
                        "ops": [
                            {
                                "op": "patch",
                                "site": f"resid_post.{layer}",
                                "positions": [9],
                                "from": "clean",
                            }
                        ],
                    },
                },
                metrics,
            ),
            model=loaded,
        )["ld"]
        torch.testing.assert_close(big[layer, 1], single, rtol=0, atol=1e-5)


def test_hooks_are_removed_after_success_and_after_failure():
    loaded = tiny("tiny-llama")
    before = all_hooks(loaded.model)
    _run_op(loaded, {"op": "zero", "site": "resid_post.1"})
    assert all_hooks(loaded.model) == before
    bad = spec(
        "tiny-llama",
        {
            "a": {
                "prompt": PROMPT,
                "ops": [
                    {"op": "add", "site": "model.layers.1.mlp.up_proj", "vector": [1.0, 2.0, 3.0]}
                ],
            }
        },
    )
    with pytest.raises(RunError, match="ops\\[0\\].*add"):
        specsight.run(bad, model=loaded)
    assert all_hooks(loaded.model) == before


def test_raw_module_input_site():
    loaded = tiny("tiny-llama")

    def fn(h):
        h[0, :, :8] = 0
        return h

    # Raw input sites act on the module's positional input in place; compare with a pre-hook.
    got = _run_op(
        loaded,
        {
            "op": "scale",
            "site": "model.layers.2.mlp.down_proj.input",
            "factor": 0.0,
            "positions": "all",
        },
    )
    expected = hooked_logits(
        loaded, PROMPT, "model.layers.2.mlp.down_proj", lambda h: h * 0.0, pre=True
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
