"""Sweeps, prefix reuse, zip and head sweeps and batched generation checked against hand-written
PyTorch hooks on the same weights, not against other specsight runs; and what each canonical
site means, checked per family from the residual stream's arithmetic and a plain pre-hook."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import specsight
from tests.conftest import CLEAN, CORRUPT, ioi_spec, tiny

MARY_JOHN = (" Mary", " John")


def _ids(lm, text: str) -> torch.Tensor:
    return torch.tensor([lm.tokenizer.encode(text)])


def _logit_diff(lm, logits: torch.Tensor) -> float:
    mary, john = (lm.tokenizer.encode_plain(t)[0] for t in MARY_JOHN)
    return float(logits[0, -1, mary] - logits[0, -1, john])


def _layers(lm) -> torch.nn.ModuleList:
    model = lm.model
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def _hand_patch(lm, layer: int, pos: int) -> float:
    """The corrupted run with layer ``layer``'s output at ``pos`` taken from the clean run."""
    block = _layers(lm)[layer]
    kept = {}

    def keep(_m, _a, out):
        kept["h"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    def patch(_m, _a, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        hidden[:, pos] = kept["h"][:, pos]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    with torch.inference_mode():
        handle = block.register_forward_hook(keep)
        try:
            lm.model(_ids(lm, CLEAN))
        finally:
            handle.remove()
        handle = block.register_forward_hook(patch)
        try:
            return _logit_diff(lm, lm.model(_ids(lm, CORRUPT)).logits)
        finally:
            handle.remove()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize(
    "prefix_reuse, position_reuse", [(True, True), (True, False), (False, False)]
)
def test_a_patching_sweep_equals_one_hand_written_patch_per_cell(
    model, prefix_reuse, position_reuse
):
    lm = tiny(model)
    results = specsight.run(
        ioi_spec(model), model=lm, prefix_reuse=prefix_reuse, position_reuse=position_reuse
    )
    grid = results["ld"]
    assert tuple(grid.shape) == (4, 14)
    for layer in range(4):
        for pos in range(14):
            assert abs(float(grid[layer, pos]) - _hand_patch(lm, layer, pos)) < 1e-4, (layer, pos)


def test_a_zip_sweep_equals_hand_written_patches():
    lm = tiny("tiny-llama")
    cells = [(0, 9), (1, 13), (3, 5)]
    sweep = {"layer": [c[0] for c in cells], "pos": [c[1] for c in cells]}
    results = specsight.run(ioi_spec(sweep=sweep, invoke_extra={"sweep_mode": "zip"}), model=lm)
    got = results["ld"]
    assert results.axes("ld") == ["layer+pos"] and tuple(got.shape) == (3,)
    for i, (layer, pos) in enumerate(cells):
        assert abs(float(got[i]) - _hand_patch(lm, layer, pos)) < 1e-4


def test_a_head_sweep_equals_hand_written_head_patches():
    """Patching one head's z (the o_proj input columns of that head) from the clean run."""
    lm = tiny("tiny-llama")
    spec = ioi_spec(sweep={"head": "all"})
    spec["invokes"]["corrupt"]["ops"] = [
        {"op": "patch", "site": "head_z.2", "heads": "{head}", "from": "clean"}
    ]
    got = specsight.run(spec, model=lm)["ld"]
    o_proj = lm.model.model.layers[2].self_attn.o_proj
    d_head = lm.model.config.hidden_size // lm.model.config.num_attention_heads
    kept: dict[str, torch.Tensor] = {}

    def keep(_m, args):
        kept["z"] = args[0].detach().clone()

    for head in range(4):
        cols = slice(head * d_head, (head + 1) * d_head)

        def patch(_m, args, cols=cols):
            z = args[0].clone()
            z[..., cols] = kept["z"][..., cols]
            return (z,)

        with torch.inference_mode():
            handle = o_proj.register_forward_pre_hook(keep)
            lm.model(_ids(lm, CLEAN))
            handle.remove()
            handle = o_proj.register_forward_pre_hook(patch)
            expected = _logit_diff(lm, lm.model(_ids(lm, CORRUPT)).logits)
            handle.remove()
        assert abs(float(got[head]) - expected) < 1e-4, head


def test_batched_steered_generation_equals_each_prompt_alone_with_a_hook():
    lm = tiny("tiny-llama")
    vector = torch.linspace(-2.0, 2.0, 64)
    prompts = [CLEAN, "The Eiffel Tower is in", "Hello there, my friend"]
    ops = [{"op": "add", "site": "resid_post.1", "vector": vector.tolist(), "coeff": 1.5}]
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"s": {"prompt": prompts, "ops": ops, "generate": {"max_new_tokens": 8}}},
    }
    generated = specsight.run(spec, model=lm).manifest["generated"]["s"]

    def steer(_m, _a, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden + 1.5 * vector
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    for prompt, entry in zip(prompts, generated):
        handle = lm.model.model.layers[1].register_forward_hook(steer)
        try:
            with torch.inference_mode():
                out = lm.model.generate(
                    _ids(lm, prompt),
                    max_new_tokens=8,
                    do_sample=False,
                    pad_token_id=lm.tokenizer.pad_id,
                )
        finally:
            handle.remove()
        new = out[0, len(lm.tokenizer.encode(prompt)) :].tolist()
        eos = lm.model.generation_config.eos_token_id
        if eos in new:
            new = new[: new.index(eos) + 1]
        assert entry["ids"] == new, prompt


# --------------------------------------------------------------------------- what sites mean

#: the module whose input is mlp_act, reached by attribute (not through the site tables)
DOWN_PROJ: dict[str, Callable] = {
    "tiny-llama": lambda m: m.model.layers[1].mlp.down_proj,
    "tiny-mistral": lambda m: m.model.layers[1].mlp.down_proj,
    "tiny-qwen2": lambda m: m.model.layers[1].mlp.down_proj,
    "tiny-qwen3": lambda m: m.model.layers[1].mlp.down_proj,
    "tiny-gemma2": lambda m: m.model.layers[1].mlp.down_proj,
    "tiny-olmo2": lambda m: m.model.layers[1].mlp.down_proj,
    "tiny-phi3": lambda m: m.model.layers[1].mlp.down_proj,
    "tiny-gpt2": lambda m: m.transformer.h[1].mlp.c_proj,
    "tiny-gpt-neo": lambda m: m.transformer.h[1].mlp.c_proj,
    "tiny-gpt-neox": lambda m: m.gpt_neox.layers[1].mlp.dense_4h_to_h,
}
SEQUENTIAL = [m for m in DOWN_PROJ if m != "tiny-gpt-neox"] + ["tiny-mixtral"]


def _saves(model: str, sites: list[str]) -> dict[str, torch.Tensor]:
    ops = [{"op": "save", "site": site, "name": site} for site in sites]
    spec = {"specsight": 1, "model": model, "invokes": {"a": {"prompt": CLEAN, "ops": ops}}}
    return specsight.run(spec, model=tiny(model)).saves


@pytest.mark.parametrize("model", SEQUENTIAL)
def test_the_residual_stream_adds_up(model):
    """resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out (what is added to
    the residual, post-norms included), and resid_pre of the next layer is resid_post."""
    s = _saves(model, ["resid_pre.1", "attn_out.1", "resid_mid.1", "mlp_out.1", "resid_post.1",
                       "resid_pre.2"])  # fmt: skip
    torch.testing.assert_close(
        s["resid_mid.1"], s["resid_pre.1"] + s["attn_out.1"], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        s["resid_post.1"], s["resid_mid.1"] + s["mlp_out.1"], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(s["resid_pre.2"], s["resid_post.1"], atol=0, rtol=0)


def test_the_parallel_residual_adds_up():
    """GPT-NeoX adds attention and MLP outputs to the same residual."""
    s = _saves("tiny-gpt-neox", ["resid_pre.1", "attn_out.1", "mlp_out.1", "resid_post.1"])
    expected = s["resid_pre.1"] + s["attn_out.1"] + s["mlp_out.1"]
    torch.testing.assert_close(s["resid_post.1"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", list(DOWN_PROJ))
def test_mlp_act_is_the_down_projections_input(model):
    lm = tiny(model)
    kept = {}
    handle = DOWN_PROJ[model](lm.model).register_forward_pre_hook(
        lambda _m, args: kept.setdefault("x", args[0].detach().clone())
    )
    try:
        with torch.inference_mode():
            lm.model(_ids(lm, CLEAN))
    finally:
        handle.remove()
    got = _saves(model, ["mlp_act.1"])["mlp_act.1"]
    torch.testing.assert_close(got, kept["x"][0], atol=0, rtol=0)


@pytest.mark.parametrize("model", list(DOWN_PROJ))
def test_embed_final_norm_and_logits_mean_what_they_say(model):
    """embed is the token embedding of the ids; logits are the unembedding of final_norm and,
    but for a final soft cap (Gemma 2 applies tanh(x / cap) * cap after it), the model's own
    output."""
    lm = tiny(model)
    ids = _ids(lm, CLEAN)
    with torch.inference_mode():
        embedded = lm.model.get_input_embeddings()(ids)[0]
        output = lm.model(ids).logits[0]
    s = _saves(model, ["embed", "final_norm", "logits"])
    torch.testing.assert_close(s["embed"], embedded, atol=0, rtol=0)
    with torch.inference_mode():
        unembedded = lm.model.get_output_embeddings()(s["final_norm"])
    torch.testing.assert_close(s["logits"], unembedded, atol=1e-5, rtol=1e-5)
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    capped = torch.tanh(s["logits"] / cap) * cap if cap else s["logits"]
    torch.testing.assert_close(capped, output, atol=1e-5, rtol=1e-5)


TEXT_MODELS = [
    "tiny-llama",
    "tiny-gpt2",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-gpt-neo",
    "tiny-gpt-neox",
    "tiny-mixtral",
    "tiny-gemma2",
    "tiny-phi3",
    "tiny-olmo2",
    "tiny-mamba",
]


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_position_reuse_changes_no_number(model):
    """Forwards that start late (reading earlier positions' keys and values from the untouched
    run) give the plain batched results: patches, saves at late positions, ablations, metrics
    at several positions, over a dataset's items."""
    lm = tiny(model)
    rows = [
        {"p": CLEAN, "io": " Mary", "s": " John"},
        {"p": CORRUPT, "io": " John", "s": " Mary"},
    ]
    spec = {
        "specsight": 1,
        "model": model,
        "dataset": rows,
        "invokes": {
            "clean": {"prompt": CLEAN},
            "swept": {
                "prompt": "{p}",
                "sweep": {"layer": "all", "pos": "all"},
                "ops": [
                    {
                        "op": "patch",
                        "site": "resid_post.{layer}",
                        "positions": ["{pos}"],
                        "from": "clean",
                    },
                    {"op": "save", "site": "resid_post.{layer}", "positions": [-1], "name": "last"},
                ],
            },
            "ablated": {
                "prompt": "{p}",
                "sweep": {"layer": "all", "pos": "5:14"},
                "ops": [
                    {
                        "op": "mean_ablate",
                        "site": "resid_pre.{layer}",
                        "positions": ["{pos}"],
                        "from": "clean",
                    },
                    {"op": "noise", "site": "resid_post.{layer}", "positions": [-2], "std": 0.1},
                ],
            },
        },
        "metrics": {
            "ld": {"kind": "logit_diff", "invoke": "swept", "target": "{io}", "foil": "{s}"},
            "ab": {"kind": "logprob", "invoke": "ablated", "tokens": ["{io}", "{s}"]},
            "kl": {"kind": "kl", "invoke": "ablated", "reference": "clean", "position": -3},
        },
    }
    plain = specsight.run(spec, model=lm, position_reuse=False)
    reused = specsight.run(spec, model=lm)
    plan = specsight.compile_plan(specsight.load_spec(spec), lm.info, lm.tokenizer)
    assert any(f.position_start for f in plan.forwards), "the plan should start some forwards late"
    assert any(  # layers skipped and rows of both items in one forward
        f.from_base and f.shared_prefix and len({plan.rows[r].tokens for r in f.rows}) == 2
        for f in plan.forwards
    )
    assert set(plain.tensors) == set(reused.tensors)
    for name in plain.tensors:
        torch.testing.assert_close(reused[name], plain[name], rtol=1e-4, atol=1e-4, equal_nan=True)
