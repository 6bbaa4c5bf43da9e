"""Every family's canonical sites on its tiny model: they resolve, have ModelInfo's shapes, a patch
with their own clean value changes nothing and zeroing them changes the logits. Plus heads
(sweeps, grouped-query key/value heads, fused projections split against hand computations),
attention patterns, the IOI example on several families, and models without a site table."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import yaml

import specsight
from specsight.errors import SpecError
from specsight.models.load import load_model, load_model_info
from specsight.sites import FAMILIES, canonical_names, detect_family, family_table, resolve_site
from tests.conftest import CLEAN as IOI
from tests.conftest import CORRUPT as IOI_CORRUPT

ROOT = Path(__file__).resolve().parent.parent
#: tiny model of each family
FAMILY_MODELS = {
    "tiny-gpt2": "gpt2",
    "tiny-gpt-neo": "gpt_neo",
    "tiny-gpt-neox": "gpt_neox",
    "tiny-llama": "llama",
    "tiny-mistral": "llama",
    "tiny-qwen2": "llama",
    "tiny-qwen3": "llama",
    "tiny-mixtral": "mixtral",
    "tiny-gemma2": "gemma2",
    "tiny-phi3": "phi3",
    "tiny-olmo2": "olmo2",
    "tiny-vit": "vit",
}
IMAGE = ROOT / "specs" / "images" / "red_square.png"
TOKENS = list(range(0, 1024, 16))  # logits compared on these ids at the last position
LAYER = 1


@functools.cache
def _model(name: str, eager: bool = False):
    return load_model(name, device="cpu", attn_implementation="eager" if eager else None)


def _sites(name: str) -> list[str]:
    info = load_model_info(name)[0]
    return [s.removesuffix(".L") for s in canonical_names(info) if s != "attn_pattern.L"]


MATRIX = [(model, site) for model in FAMILY_MODELS for site in _sites(model)]


def _concrete(site: str, info) -> str:
    return f"{site}.{LAYER}" if "{L}" in family_table(info)["sites"][site][0] else site


@functools.cache
def _family_run(name: str) -> dict:
    """One run per model: every site saved, patched with its own clean value, and zeroed."""
    lm = _model(name)
    given = {"image": str(IMAGE)} if lm.info.inputs == "image" else {"prompt": IOI}
    tokens = [t for t in TOKENS if t < lm.info.vocab_size]
    invokes: dict = {"clean": {**given, "ops": []}}
    metrics: dict = {"clean": {"kind": "logits", "invoke": "clean", "tokens": tokens}}
    for i, site in enumerate(_sites(name)):
        concrete = _concrete(site, lm.info)
        invokes["clean"]["ops"].append({"op": "save", "site": concrete, "name": f"save_{i}"})
        invokes[f"patch_{i}"] = {
            **given,
            "ops": [{"op": "patch", "site": concrete, "from": "clean"}],
        }
        invokes[f"zero_{i}"] = {**given, "ops": [{"op": "zero", "site": concrete}]}
        for kind in ("patch", "zero"):
            metrics[f"{kind}_{i}"] = {"kind": "logits", "invoke": f"{kind}_{i}", "tokens": tokens}
    spec = {"specsight": 1, "model": name, "invokes": invokes, "metrics": metrics}
    results = specsight.run(spec, model=lm)
    return {"results": results, "index": {s: i for i, s in enumerate(_sites(name))}}


def _expected_shape(site: str, info) -> tuple[int, ...]:
    heads = {"q": info.n_heads, "head_z": info.n_heads, "k": info.n_kv_heads, "v": info.n_kv_heads}
    if site in heads:
        return (heads[site], info.d_head)
    return ({"mlp_act": info.d_mlp, "logits": info.vocab_size}.get(site, info.d_model),)


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("model, site", MATRIX, ids=[f"{m}-{s}" for m, s in MATRIX])
def test_canonical_site(model: str, site: str) -> None:
    info = _model(model).info
    assert info.family == FAMILY_MODELS[model]
    resolved = resolve_site(_concrete(site, info), info)
    assert len(resolved) == 1 and resolved[0].module in info.module_names
    run = _family_run(model)
    results, i = run["results"], run["index"][site]
    if info.inputs == "image":  # the class token and the patches
        n_tokens = info.image["seq_len"]
    else:
        n_tokens = len(_model(model).tokenizer.encode(IOI))
    assert tuple(results[f"save_{i}"].shape) == (n_tokens, *_expected_shape(site, info))
    clean = results["clean"]
    patched = (results[f"patch_{i}"] - clean).abs().max().item()
    zeroed = (results[f"zero_{i}"] - clean).abs().max().item()
    assert patched <= 1e-6, f"patching {site} with its own clean value moved the logits"
    assert zeroed > 1e-5, f"zeroing {site} did not change the logits"


def test_every_family_has_a_tiny_model_and_the_core_sites() -> None:
    assert set(FAMILY_MODELS.values()) == set(FAMILIES)
    core = {"embed", "resid_pre", "resid_post", "attn_out", "mlp_out", "final_norm", "logits"}
    heads = {"q", "k", "v", "head_z", "attn_pattern"}
    for family, table in FAMILIES.items():
        # a ViT classifier returns one output per image, not per position: no logits site
        expected = core - {"logits"} if family == "vit" else core
        assert expected | heads <= set(table["sites"]), family
        for name in set(table["unsupported"]):
            assert name not in table["sites"]
    assert "resid_mid" in FAMILIES["gpt_neox"]["unsupported"]
    assert "mlp_act" in FAMILIES["mixtral"]["unsupported"]
    assert "one vector per image" in FAMILIES["vit"]["unsupported"]["logits"]


def test_unsupported_site_says_why() -> None:
    info = load_model_info("tiny-gpt-neox")[0]
    with pytest.raises(specsight.sites.SiteError) as exc:
        resolve_site("resid_mid.1", info)
    assert "parallel residual" in exc.value.message


def test_post_norm_families_mean_what_is_added_to_the_residual() -> None:
    """Gemma 2 / OLMo 2: resid_post = resid_mid + mlp_out and resid_mid = resid_pre + attn_out."""
    for name in ("tiny-gemma2", "tiny-olmo2", "tiny-llama", "tiny-gpt2", "tiny-phi3"):
        ops = [
            {"op": "save", "site": f"{site}.2", "name": site}
            for site in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
        ]
        spec = {"specsight": 1, "model": name, "invokes": {"a": {"prompt": IOI, "ops": ops}}}
        r = specsight.run(spec, model=_model(name))
        torch.testing.assert_close(r["resid_mid"], r["resid_pre"] + r["attn_out"])
        torch.testing.assert_close(r["resid_post"], r["resid_mid"] + r["mlp_out"])


def test_parallel_residual_neox() -> None:
    ops = [
        {"op": "save", "site": f"{site}.2", "name": site}
        for site in ("resid_pre", "resid_post", "attn_out", "mlp_out")
    ]
    spec = {"specsight": 1, "model": "tiny-gpt-neox", "invokes": {"a": {"prompt": IOI, "ops": ops}}}
    r = specsight.run(spec, model=_model("tiny-gpt-neox"))
    torch.testing.assert_close(r["resid_post"], r["resid_pre"] + r["attn_out"] + r["mlp_out"])


# --------------------------------------------------------------------------- heads


def _ioi_heads_spec(model: str, site: str, sweep: dict) -> dict:
    return {
        "specsight": 1,
        "model": model,
        "invokes": {
            "clean": {"prompt": IOI},
            "corrupt": {
                "prompt": IOI_CORRUPT,
                "sweep": sweep,
                "ops": [
                    {"op": "patch", "site": site, "heads": "{head}", "from": "clean"},
                ],
            },
        },
        "metrics": {
            "ld": {"kind": "logit_diff", "invoke": "corrupt", "target": " Mary", "foil": " John"}
        },
    }


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama", "tiny-phi3", "tiny-gpt-neox"])
def test_head_sweeps_shape_results_by_head(model: str) -> None:
    lm = _model(model)
    spec = _ioi_heads_spec(model, "head_z.{layer}", {"layer": "all", "head": "all"})
    r = specsight.run(spec, model=lm)
    assert r.axes("ld") == ["layer", "head"] and tuple(r["ld"].shape) == (4, 4)
    # grouped-query attention: head: all on a key/value site means the key/value heads
    r = specsight.run(_ioi_heads_spec(model, "v.2", {"head": "all"}), model=lm)
    assert tuple(r["ld"].shape) == (lm.info.n_kv_heads,)
    # patching every head one by one in one forward = one forward per head
    one_by_one = specsight.run(
        _ioi_heads_spec(model, "v.2", {"head": "all"}), model=lm, max_batch=1
    )
    torch.testing.assert_close(r["ld"], one_by_one["ld"], rtol=0, atol=1e-5)


def test_kv_head_out_of_range_is_a_located_error() -> None:
    lm = _model("tiny-llama")
    spec = _ioi_heads_spec("tiny-llama", "k.1", {"head": [0, 3]})
    with pytest.raises(SpecError) as exc:
        specsight.run(spec, model=lm)
    assert (
        "invokes.corrupt.sweep.head: head 3 is out of range: the model has 2 key/value heads"
        in str(exc.value)
    )
    # a sweep shared by query and key sites covers the query heads; the key site then fails
    spec = _ioi_heads_spec("tiny-llama", "q.1", {"head": "all"})
    spec["invokes"]["corrupt"]["ops"].append({"op": "zero", "site": "k.1", "heads": "{head}"})
    with pytest.raises(SpecError) as exc:
        specsight.run(spec, model=lm)
    text = str(exc.value)
    assert (
        "invokes.corrupt.ops[1].heads: head 2 is out of range: 'k.1' has 2 key/value heads" in text
    )
    assert "grouped-query attention" in text and "head: '0:2'" in text


def test_heads_on_a_site_without_heads_is_an_error() -> None:
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": {"prompt": IOI, "ops": [{"op": "zero", "site": "mlp_out.1", "heads": 0}]}},
    }
    with pytest.raises(SpecError, match="site 'mlp_out.1' has no heads"):
        specsight.run(spec, model=_model("tiny-llama"))


def _hook_capture(module: torch.nn.Module, *, inputs: bool = False) -> tuple[list, object]:
    seen: list[torch.Tensor] = []
    if inputs:
        handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    else:
        handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out.clone()))
    return seen, handle


def _save_heads(model: str, sites: list[str], heads=None) -> specsight.Results:
    ops = [{"op": "save", "site": s, "name": s.split(".")[0]} for s in sites]
    if heads is not None:
        for op in ops:
            op["heads"] = heads
    spec = {"specsight": 1, "model": model, "invokes": {"a": {"prompt": IOI, "ops": ops}}}
    return specsight.run(spec, model=_model(model))


def _run_plain(lm, prompt: str = IOI) -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer.encode(prompt)])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits[0]


def test_gpt2_fused_qkv_split_matches_hand_computation() -> None:
    lm = _model("tiny-gpt2")
    block = lm.model.transformer.h[LAYER]
    seen, handle = _hook_capture(block.ln_1)
    _run_plain(lm)
    handle.remove()
    x = seen[0][0]  # [pos, d_model], the attention block's input
    d, n, dh = 64, 4, 16
    weight, bias = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: x @ W + b
    r = _save_heads("tiny-gpt2", [f"q.{LAYER}", f"k.{LAYER}", f"v.{LAYER}", f"head_z.{LAYER}"])
    for index, name in enumerate(("q", "k", "v")):
        cols = slice(index * d, (index + 1) * d)
        expected = (x @ weight[:, cols] + bias[cols]).view(-1, n, dh)
        torch.testing.assert_close(r[name], expected, rtol=1e-5, atol=1e-6)
    # per-head attention by hand from the saved q, k, v: causal softmax(q k^T / sqrt(dh)) v
    q, k, v = (r[name].transpose(0, 1) for name in ("q", "k", "v"))  # [head, pos, dh]
    scores = q @ k.transpose(1, 2) / dh**0.5
    causal = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
    z = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
    torch.testing.assert_close(r["head_z"], z.transpose(0, 1), rtol=1e-4, atol=1e-5)
    # one head: the same numbers as the matching slice of all heads
    one = _save_heads("tiny-gpt2", [f"k.{LAYER}"], heads=[2])
    torch.testing.assert_close(one["k"], r["k"][:, 2:3])


def test_phi3_fused_qkv_and_gate_up_split_match_hand_computation() -> None:
    lm = _model("tiny-phi3")
    layer = lm.model.model.layers[LAYER]
    seen, h1 = _hook_capture(layer.input_layernorm)
    seen_mlp, h2 = _hook_capture(layer.post_attention_layernorm)
    _run_plain(lm)
    h1.remove()
    h2.remove()
    x, y = seen[0][0], seen_mlp[0][0]
    n, kv, dh, d_mlp = 4, 2, 16, 128
    w = layer.self_attn.qkv_proj.weight  # [(n + 2 kv) dh, d_model], rows q | k | v
    r = _save_heads("tiny-phi3", [f"{s}.{LAYER}" for s in ("q", "k", "v", "mlp_act")])
    torch.testing.assert_close(r["q"], (x @ w[: n * dh].T).view(-1, n, dh))
    torch.testing.assert_close(r["k"], (x @ w[n * dh : (n + kv) * dh].T).view(-1, kv, dh))
    torch.testing.assert_close(r["v"], (x @ w[(n + kv) * dh :].T).view(-1, kv, dh))
    gate_up = y @ layer.mlp.gate_up_proj.weight.T
    gate, up = gate_up[:, :d_mlp], gate_up[:, d_mlp:]
    torch.testing.assert_close(r["mlp_act"], up * torch.nn.functional.silu(gate))


def test_neox_interleaved_qkv_split_matches_hand_computation() -> None:
    lm = _model("tiny-gpt-neox")
    layer = lm.model.gpt_neox.layers[LAYER]
    seen, handle = _hook_capture(layer.input_layernorm)
    _run_plain(lm)
    handle.remove()
    x = seen[0][0]
    qkv = layer.attention.query_key_value
    out = (x @ qkv.weight.T + qkv.bias).view(-1, 4, 3, 16)  # per head [q k v]
    r = _save_heads("tiny-gpt-neox", [f"{s}.{LAYER}" for s in ("q", "k", "v")])
    for index, name in enumerate(("q", "k", "v")):
        torch.testing.assert_close(r[name], out[:, :, index], rtol=1e-5, atol=1e-6)


#: model -> (columns of key head 1, columns of value head 0) in their modules, by hand
HEAD_COLUMNS = {
    "tiny-gpt2": ((80, 96), (128, 144)),  # c_attn: [q 0:64 | k 64:128 | v 128:192]
    "tiny-llama": ((16, 32), (0, 16)),  # k_proj, v_proj
    "tiny-phi3": ((80, 96), (96, 112)),  # qkv_proj: [q 0:64 | k 64:96 | v 96:128]
    "tiny-gpt-neox": ((64, 80), (32, 48)),  # query_key_value: per head [q k v] of 16 each
}


@pytest.mark.parametrize("model", list(HEAD_COLUMNS))
def test_head_writes_hit_exactly_the_heads_columns(model: str) -> None:
    """zero / add on some heads = the same edit by a hand-written hook on those columns."""
    lm = _model(model)
    ops = [
        {"op": "zero", "site": f"k.{LAYER}", "heads": [1], "positions": [3, 4]},
        {"op": "add", "site": f"v.{LAYER}", "heads": 0, "vector": [0.5] * 16, "coeff": 2},
    ]
    spec = {
        "specsight": 1,
        "model": model,
        "invokes": {"a": {"prompt": IOI, "ops": ops}},
        "metrics": {"l": {"kind": "logits", "invoke": "a", "tokens": TOKENS}},
    }
    got = specsight.run(spec, model=lm)["l"]
    (k0, k1), (v0, v1) = HEAD_COLUMNS[model]
    k_module = resolve_site(f"k.{LAYER}", lm.info)[0].module
    v_module = resolve_site(f"v.{LAYER}", lm.info)[0].module
    modules = dict(lm.model.named_modules())

    def hook_for(name: str):
        def edit(_m, _a, out):
            out = out.clone()
            if name == k_module:
                out[0, 3:5, k0:k1] = 0
            if name == v_module:
                out[0, :, v0:v1] += 1.0
            return out

        return edit

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in {k_module, v_module}]
    try:
        expected = _run_plain(lm)[-1, TOKENS]
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - _run_plain(lm)[-1, TOKENS]).abs().max() > 1e-5


def test_set_from_a_saved_head_equals_patching_that_head() -> None:
    lm = _model("tiny-llama")
    base = {
        "clean": {
            "prompt": IOI,
            "ops": [{"op": "save", "site": "head_z.2", "heads": [3], "name": "h3"}],
        }
    }
    set_op = {"op": "set", "site": "head_z.2", "heads": [3], "value": {"saved": "h3"}}
    patch_op = {"op": "patch", "site": "head_z.2", "heads": [3], "from": "clean"}
    metric = {"kind": "logit_diff", "invoke": "x", "target": " Mary", "foil": " John"}
    values = []
    for op in (set_op, patch_op):
        spec = {
            "specsight": 1,
            "model": "tiny-llama",
            "invokes": {**base, "x": {"prompt": IOI_CORRUPT, "ops": [op]}},
            "metrics": {"ld": metric},
        }
        values.append(specsight.run(spec, model=lm)["ld"])
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=1e-6)


def test_plan_with_head_windows_round_trips_json() -> None:
    from specsight.plan import Plan

    spec = specsight.load_spec(
        _ioi_heads_spec("tiny-gpt2", "q.{layer}", {"layer": "all", "head": "all"})
    )
    info, tok = load_model_info("tiny-gpt2")
    plan = specsight.compile_plan(spec, info, tok)
    assert any(op.cols == ((16, 32),) for op in plan.ops)
    assert Plan.from_json(plan.to_json()) == plan


# --------------------------------------------------------------------------- attention patterns


TEXT_MODELS = [m for m in FAMILY_MODELS if m != "tiny-vit"]  # tiny-vit: tests/test_inputs.py


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_attention_pattern_with_eager_attention(model: str) -> None:
    lm = _model(model, eager=True)
    ops = [
        {"op": "save", "site": "attn_pattern.1", "name": "pattern"},
        {"op": "save", "site": "attn_pattern.1", "heads": [2], "positions": "last", "name": "h2"},
    ]
    spec = {
        "specsight": 1,
        "model": {"id": model, "attn_implementation": "eager"},
        "invokes": {"a": {"prompt": [IOI, "The Eiffel Tower is in"], "ops": ops}},
    }
    r = specsight.run(spec, model=lm)
    n, short = 14, len(lm.tokenizer.encode("The Eiffel Tower is in"))
    pattern = r["pattern"]
    assert tuple(pattern.shape) == (2, n, 4, n)  # [prompt, query, head, key]
    first = pattern[0]
    torch.testing.assert_close(first.sum(-1), torch.ones(n, 4))
    assert torch.all(first.permute(1, 0, 2).triu(1) == 0)  # causal
    second = pattern[1, :short, :, :short]
    torch.testing.assert_close(second.sum(-1), torch.ones(short, 4))
    assert torch.isnan(pattern[1, short:]).all() and torch.isnan(pattern[1, :, :, short:]).all()
    torch.testing.assert_close(r["h2"][0, 0], first[-1, 2:3])


def test_attention_pattern_needs_eager_attention() -> None:
    """Known before running: the model's default attention (sdpa) returns no weights."""
    ops = [{"op": "save", "site": "attn_pattern.1"}]
    spec = {"specsight": 1, "model": "tiny-llama", "invokes": {"a": {"prompt": IOI, "ops": ops}}}
    assert _model("tiny-llama").info.attn_implementation == "sdpa"
    with pytest.raises(SpecError) as exc:
        specsight.run(spec, model=_model("tiny-llama"))
    (issue,) = exc.value.issues
    assert issue.path == ("invokes", "a", "ops", 0, "site") and issue.code == "needs-eager"
    assert "sdpa attention does not return them" in issue.message
    assert "attn_implementation: eager" in (issue.hint or "")
    spec["model"] = {"id": "tiny-llama", "attn_implementation": "sdpa"}
    with pytest.raises(SpecError, match="needs the attention weights"):
        specsight.run(spec, model=_model("tiny-llama"))
    spec["invokes"]["a"]["ops"] = [{"op": "zero", "site": "attn_pattern.1"}]
    with pytest.raises(SpecError, match="can only be saved"):
        specsight.run(spec, model=_model("tiny-llama"))


# --------------------------------------------------------------------------- IOI on several families


@pytest.mark.parametrize("model", ["tiny-gpt-neox", "tiny-gemma2", "tiny-phi3", "tiny-mamba"])
def test_ioi_example_runs_unchanged_but_the_model_line(model: str) -> None:
    data = yaml.safe_load((ROOT / "specs" / "ioi_patching.yaml").read_text())
    data["model"] = {**data["model"], "id": model}
    data.pop("expect")  # the example's claims are about the built-in model's numbers
    r = specsight.run(data, model=_model(model))
    ld, clean, corrupt = r["logit_diff"], r["clean_logit_diff"], r["corrupt_logit_diff"]
    assert r.axes("logit_diff") == ["layer", "pos"] and tuple(ld.shape) == (4, 14)
    # positions before the swapped name see the same tokens: patching them changes nothing
    torch.testing.assert_close(ld[:, :9], corrupt.expand(4, 9), rtol=0, atol=1e-5)
    # the last layer's residual at the last position decides the logits: patching it restores
    torch.testing.assert_close(ld[-1, -1], clean, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- other models


def test_mixtral_router_and_experts_reachable_by_raw_path() -> None:
    lm = _model("tiny-mixtral")
    spec = {
        "specsight": 1,
        "model": "tiny-mixtral",
        "invokes": {
            "clean": {
                "prompt": IOI,
                "ops": [
                    {"op": "save", "site": "model.layers.1.mlp.gate", "name": "router"},
                    {"op": "save", "site": "model.layers.1.mlp.experts", "name": "experts"},
                    {"op": "save", "site": "mlp_out.1", "name": "mlp"},
                ],
            },
            "patched": {
                "prompt": IOI,
                "ops": [{"op": "patch", "site": "model.layers.1.mlp.experts", "from": "clean"}],
            },
        },
        "metrics": {
            "clean": {"kind": "logits", "invoke": "clean", "tokens": TOKENS},
            "patched": {"kind": "logits", "invoke": "patched", "tokens": TOKENS},
        },
    }
    r = specsight.run(spec, model=lm)
    assert tuple(r["router"].shape) == (14, 4)  # [pos, n_experts] router logits
    torch.testing.assert_close(r["experts"], r["mlp"])
    torch.testing.assert_close(r["patched"], r["clean"], rtol=0, atol=1e-6)


def test_detect_family_from_module_tree_picks_the_most_specific() -> None:
    for name, family in (
        ("tiny-llama", "llama"),
        ("tiny-gemma2", "gemma2"),
        ("tiny-olmo2", "olmo2"),
    ):
        info = load_model_info(name)[0]
        assert detect_family("SomethingNewForCausalLM", info.module_names) == family
    assert detect_family("X", load_model_info("tiny-mamba")[0].module_names) is None


def test_mamba_gets_an_inferred_table() -> None:
    info = load_model_info("tiny-mamba")[0]
    table = family_table(info)
    assert info.family is None and table["layers"] == "backbone.layers"
    assert {n: t[0] for n, t in table["sites"].items()} == {
        "embed": "backbone.embeddings",
        "resid_pre": "backbone.layers.{L}",
        "resid_post": "backbone.layers.{L}",
        "final_norm": "backbone.norm_f",
        "logits": "lm_head",
    }
    with pytest.raises(specsight.sites.SiteError, match="no attention child"):
        resolve_site("attn_out.1", info)


def test_unknown_transformer_from_a_local_folder(tmp_path: Path) -> None:
    """A GPT-J folder (no table): layer stack, attention and MLP inferred; patching works."""
    import transformers

    from specsight.models.load.tiny import _tiny_tokenizer_json

    config = transformers.GPTJConfig(
        vocab_size=1024, n_embd=64, n_layer=4, n_head=4, rotary_dim=8, n_positions=128,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(_tiny_tokenizer_json())
    info, _ = load_model_info(str(tmp_path))
    assert info.family is None
    from click.testing import CliRunner

    from specsight.cli import main

    listing = CliRunner().invoke(main, ["sites", str(tmp_path)]).output
    assert "GPTJForCausalLM (family unknown, site table inferred)" in listing
    assert "attn_out.L     transformer.h.L.attn (output)  [batch, pos, 64]" in listing
    assert "resid_mid      not inferred without a site table for GPTJForCausalLM" in listing
    assert canonical_names(info) == [
        "embed", "resid_pre.L", "resid_post.L", "attn_out.L", "mlp_out.L", "final_norm", "logits",
    ]  # fmt: skip
    data = yaml.safe_load((ROOT / "specs" / "ioi_patching.yaml").read_text())
    data["model"] = str(tmp_path)
    data.pop("expect")
    r = specsight.run(data)
    torch.testing.assert_close(r["logit_diff"][-1, -1], r["clean_logit_diff"], rtol=0, atol=1e-5)
    lens = {
        "specsight": 1,
        "model": str(tmp_path),
        "invokes": {"a": {"prompt": IOI}},
        "metrics": {"lens": {"kind": "logit_lens", "invoke": "a"}},
    }
    assert tuple(specsight.run(lens)["lens"].shape) == (4,)


# --------------------------------------------------------------------------- docs


def test_sites_command_shows_head_layouts() -> None:
    from click.testing import CliRunner

    from specsight.cli import main

    out = CliRunner().invoke(main, ["sites", "tiny-phi3"]).output
    assert (
        "q.L            model.layers.L.self_attn.qkv_proj (output, columns 0:64)  [batch, pos, 4 heads, 16]"
        in out
    )
    assert (
        "k.L            model.layers.L.self_attn.qkv_proj (output, columns 64:96)  [batch, pos, 2 heads, 16]"
        in out
    )
    assert "mlp_act.L      model.layers.L.mlp.down_proj (input)  [batch, pos, 128]" in out
    for model in FAMILY_MODELS:
        result = CliRunner().invoke(main, ["sites", model])
        assert result.exit_code == 0 and "head_z.L" in result.output


def test_readme_sites_table_is_current() -> None:
    from specsight.sites import update_readme_table

    assert update_readme_table(ROOT / "README.md", write=False), (
        "the README's site table is stale: run "
        "`python -c 'from pathlib import Path; from specsight.sites import "
        'update_readme_table; update_readme_table(Path("README.md"))\'`'
    )


def test_logit_lens_in_bfloat16_on_a_norm_that_returns_float32() -> None:
    """Mamba's RMSNorm returns float32 from bfloat16 inputs; the lens casts before unembedding."""
    spec = {
        "specsight": 1,
        "model": {"id": "tiny-mamba", "dtype": "bfloat16", "device": "cpu"},
        "invokes": {"a": {"prompt": IOI}},
        "metrics": {"lens": {"kind": "logit_lens", "invoke": "a"}},
    }
    lens = specsight.run(spec)["lens"]
    assert tuple(lens.shape) == (4,) and torch.isfinite(lens).all()
