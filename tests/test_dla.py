"""Direct logit attribution (``kind: dla``) against TransformerLens's own decomposition of the
residual stream (``get_full_resid_decomposition`` / ``decompose_resid`` + ``logit_attrs``, its
``apply_ln_to_stack`` convention, weights processed as HookedTransformer does but value biases
left in place) on the same weights, and the sum check against the model called directly: the
components plus the bias equal the model's own logit difference. The tiny models get random
norm weights and biases first, so a mistake in the norm's weight, centring or bias shows."""

from __future__ import annotations

import pytest
import torch

import specsight
from specsight.api import validate
from specsight.errors import SpecError
from specsight.models.load import load_model
from tests.conftest import tiny

PROMPT = "When Mary and John went to the store, John gave a drink to"
FAMILIES = ["tiny-gpt2", "tiny-llama", "tiny-gpt-neox"]


def _perturbed(name: str, folder) -> object:
    """A tiny model whose norms and biases are random (not the init's ones and zeros), saved
    to ``folder`` for TransformerLens and loaded back for specsight."""
    lm = load_model(name, device="cpu", seed=1)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module_name, param in lm.model.named_parameters():
            if "norm" in module_name or "ln" in module_name or module_name.endswith(".bias"):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    lm.model.save_pretrained(str(folder))
    lm.tokenizer.save(folder / "tokenizer.json")
    return load_model(str(folder), device="cpu")


def _spec(by: list[str], foil: str | None = " John", model: str = "in-memory") -> dict:
    metric: dict = {"kind": "dla", "invoke": "run", "target": " Mary", "by": by}
    if foil is not None:
        metric["foil"] = foil
    return {
        "specsight": 1,
        "model": model,
        "invokes": {"run": {"prompt": PROMPT}},
        "metrics": {"dla": metric},
    }


def _components(out, name: str = "dla") -> dict[str, float]:
    labels = out.manifest["tensors"][name]["axis_values"]["component"]
    return dict(zip(labels, out.metrics[name].tolist()))


def _transformer_lens(folder, ids: list[int], target: int, foil: int | None, layers: bool):
    """TransformerLens's attributions by its labels (L0H0, 0_mlp_out, 0_attn_out, embed,
    pos_embed, bias) and its model."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
    bridge.enable_compatibility_mode(
        fold_value_biases=False, center_unembed=False, disable_warnings=True
    )
    _, cache = bridge.run_with_cache(torch.tensor([ids]))
    if layers:
        stack, labels = cache.decompose_resid(pos_slice=-1, return_labels=True)
    else:
        stack, labels = cache.get_full_resid_decomposition(
            expand_neurons=False, pos_slice=-1, return_labels=True
        )
    foils = None if foil is None else torch.tensor([foil])
    attrs = cache.logit_attrs(
        stack, tokens=torch.tensor([target]), incorrect_tokens=foils, pos_slice=-1
    )
    return dict(zip(labels, attrs.reshape(len(labels)).tolist()))


def _final_terms(lm, target: int, foil: int | None) -> float:
    """What TransformerLens's folded weights move out of the stack: the final norm's bias
    through the unembedding, and the unembedding's own bias."""
    head = lm.model.get_output_embeddings()
    modules = dict(lm.model.named_modules())
    norm = next(modules[n] for n in ("transformer.ln_f", "gpt_neox.final_layer_norm", "model.norm") if n in modules)  # fmt: skip
    direction = head.weight[target] - (head.weight[foil] if foil is not None else 0)
    value = 0.0
    if getattr(norm, "bias", None) is not None:
        value += float(norm.bias @ direction)
    if head.bias is not None:
        value += float(head.bias[target] - (head.bias[foil] if foil is not None else 0))
    return value


def _own_logit_diff(lm, ids: list[int], target: int, foil: int | None) -> float:
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids])).logits[0, -1]
    return float(logits[target] - (logits[foil] if foil is not None else 0))


@pytest.mark.parametrize("foil", [" John", None], ids=["diff", "logit"])
@pytest.mark.parametrize("name", FAMILIES)
def test_heads_and_mlps_equal_transformer_lens(name, foil, tmp_path):
    lm = _perturbed(name, tmp_path / name)
    out = specsight.run(_spec(["embed", "heads", "mlps"], foil=foil), model=lm)
    got = _components(out)
    ids = lm.tokenizer.encode(PROMPT)
    target = lm.tokenizer.encode(" Mary")[0]
    foil_id = None if foil is None else lm.tokenizer.encode(foil)[0]
    ref = _transformer_lens(tmp_path / name, ids, target, foil_id, layers=False)
    scale = max(abs(v) for v in ref.values())
    tol = 1e-5 * (1 + scale)
    for label, value in ref.items():
        if label.startswith("L"):
            assert got[label] == pytest.approx(value, abs=tol), label
        elif label.endswith("_mlp_out"):
            assert got[f"mlp_out.{label.split('_')[0]}"] == pytest.approx(value, abs=tol)
    assert got["embed"] == pytest.approx(ref["embed"] + ref.get("pos_embed", 0.0), abs=tol)
    assert got["bias"] == pytest.approx(ref["bias"] + _final_terms(lm, target, foil_id), abs=tol)
    own = _own_logit_diff(lm, ids, target, foil_id)
    assert float(out.metrics["dla/total"]) == pytest.approx(own, abs=1e-5 * (1 + abs(own)))
    assert sum(got.values()) == pytest.approx(own, abs=1e-5 * (1 + sum(map(abs, got.values()))))
    assert abs(float(out.metrics["dla/residual"])) <= 1e-5 * (1 + sum(map(abs, got.values())))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_attention_layers_equal_transformer_lens(name, tmp_path):
    lm = _perturbed(name, tmp_path / name)
    got = _components(specsight.run(_spec(["attn", "mlps"]), model=lm))
    ids = lm.tokenizer.encode(PROMPT)
    target, foil = lm.tokenizer.encode(" Mary")[0], lm.tokenizer.encode(" John")[0]
    ref = _transformer_lens(tmp_path / name, ids, target, foil, layers=True)
    tol = 1e-5 * (1 + max(abs(v) for v in ref.values()))
    for layer in range(4):
        assert got[f"attn_out.{layer}"] == pytest.approx(ref[f"{layer}_attn_out"], abs=tol)
        assert got[f"mlp_out.{layer}"] == pytest.approx(ref[f"{layer}_mlp_out"], abs=tol)
    assert list(got)[-1] == "bias" and "embed" not in got


def _dataset_spec(reduce: str | None) -> dict:
    from tests.test_dataset import ROWS

    metric = {"kind": "dla", "invoke": "run", "target": "{io}", "foil": "{s}"}
    if reduce:
        metric["reduce"] = reduce
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": {"rows": ROWS},
        "invokes": {"run": {"prompt": "{clean}"}},
        "metrics": {"dla": metric},
    }


def test_over_a_dataset_each_item_is_its_own_prompt_and_the_mean_reduces_every_part():
    from tests.test_dataset import ROWS

    lm = tiny("tiny-llama")
    per_item = specsight.run(_dataset_spec(None), model=lm)
    mean = specsight.run(_dataset_spec("mean"), model=lm)
    values = per_item.metrics["dla"]  # [item, component]
    assert values.shape == (len(ROWS), 1 + 16 + 4 + 1)
    for i, row in enumerate(ROWS):  # the item alone, with its own answer tokens
        alone = _spec(["embed", "heads", "mlps"], foil=row["s"], model="tiny-llama")
        alone["invokes"]["run"]["prompt"] = row["clean"]
        alone["metrics"]["dla"]["target"] = row["io"]
        one = specsight.run(alone, model=lm)
        scale = 1e-5 * (1 + float(values[i].abs().sum()))
        assert torch.allclose(values[i], one.metrics["dla"], atol=scale)
        ids = lm.tokenizer.encode(row["clean"])
        own = _own_logit_diff(lm, ids, lm.tokenizer.encode(row["io"])[0], lm.tokenizer.encode(row["s"])[0])  # fmt: skip
        assert float(per_item.metrics["dla/total"][i]) == pytest.approx(own, abs=scale)
    assert torch.allclose(mean.metrics["dla"], values.mean(0), atol=1e-6)
    assert torch.allclose(mean.metrics["dla/items"], values)
    assert float(mean.metrics["dla/total"]) == pytest.approx(float(per_item.metrics["dla/total"].mean()), abs=1e-6)  # fmt: skip
    assert mean.metrics["dla/total/items"].shape == (len(ROWS),)
    assert mean.metrics["dla/stderr"].shape == values.shape[1:]
    tensors = mean.manifest["tensors"]
    assert tensors["dla/total"]["axes"] == [] and tensors["dla/total/items"]["axes"] == ["item"]
    assert tensors["dla"]["axes"] == ["component"]


@pytest.mark.parametrize("name", ["tiny-olmo2", "tiny-phi3", "tiny-mixtral", "tiny-gpt-neo"])
def test_the_parts_sum_to_the_models_own_logit_difference(name):
    """Families TransformerLens's bridge is not compared on here: the sum check alone, against
    the model called directly (OLMo 2 by attention layer: its heads pass a norm)."""
    lm = tiny(name)
    by = ["embed", "attn", "mlps"] if name == "tiny-olmo2" else ["embed", "heads", "mlps"]
    out = specsight.run(_spec(by, model=name), model=lm)
    ids = lm.tokenizer.encode(PROMPT)
    own = _own_logit_diff(lm, ids, lm.tokenizer.encode(" Mary")[0], lm.tokenizer.encode(" John")[0])
    parts = out.metrics["dla"]
    tol = 1e-5 * (1 + float(parts.abs().sum()))
    assert float(parts.sum()) == pytest.approx(own, abs=tol)
    assert abs(float(out.metrics["dla/residual"])) <= tol


@pytest.mark.parametrize(
    ("name", "by", "code", "where"),
    [
        ("tiny-olmo2", ["heads"], "dla-heads", "by"),
        ("tiny-gemma2", ["attn"], "no-dla", "kind"),
        ("tiny-mamba", ["mlps"], "no-dla", "kind"),
    ],
)
def test_families_it_cannot_split_are_located_errors(name, by, code, where):
    with pytest.raises(SpecError) as err:
        specsight.run(_spec(by, model=name), model=tiny(name))
    (issue,) = err.value.issues
    assert (issue.code, issue.path) == (code, ("metrics", "dla", where))
    assert issue.hint


def test_heads_and_attn_together_are_refused_with_where_and_why():
    with pytest.raises(SpecError) as err:
        validate(_spec(["heads", "attn"], model="tiny-llama"))
    text = str(err.value)
    assert "metrics.dla.by" in text and "heads' sum" in text


def test_claims_pick_a_component_by_its_label():
    lm = tiny("tiny-llama")
    first = specsight.run(_spec(["heads"], model="tiny-llama"), model=lm)
    strongest = max(_components(first).items(), key=lambda kv: kv[1] if kv[0] != "bias" else -1e9)
    spec = _spec(["heads"], model="tiny-llama")
    spec["expect"] = [
        {
            "metric": "dla",
            "where": {"component": strongest[0]},
            "greater_than": strongest[1] - 1e-3,
        },
    ]
    spec["expect"].append({"metric": "dla/residual", "approx": 0, "atol": 1e-4})
    again = specsight.run(spec, model=lm)
    assert again.ok, again.expectations
    spec["expect"][1] = {"metric": "dla/total", "less_than": float(first["dla/total"]) - 1}
    failed = specsight.run(spec, model=lm)
    assert [o.ok for o in failed.expectations] == [True, False]
    spec["expect"][1] = {"metric": "dla/totl", "less_than": 0}
    with pytest.raises(SpecError) as err:
        validate(spec)
    assert "metric 'dla' has no result 'totl' (did you mean 'dla/total'" in str(err.value)
    spec["expect"].pop()
    spec["expect"][0]["where"]["component"] = "L9H9"
    with pytest.raises(SpecError) as err:
        validate(spec)
    assert "L9H9" in str(err.value)


def test_dla_runs_remotely_as_it_runs_locally(tmp_path):
    import json

    from specsight.remote.submit import run_remote
    from tests.test_remote_client import URL, FakeServer, assert_same_tensors

    path = tmp_path / "dla.json"
    path.write_text(json.dumps(_dataset_spec("mean")))
    fake = FakeServer()
    with fake.client() as client:
        remote = run_remote(path, URL, client=client)
    assert_same_tensors(remote, specsight.run(path))


def test_parts_gives_heads_as_layer_by_head_and_mlps_by_layer():
    out = specsight.run(_dataset_spec("mean"), model=tiny("tiny-llama"))
    labels = out.manifest["tensors"]["dla"]["axis_values"]["component"]
    parts = out.parts("dla")
    assert parts["heads"].shape == (4, 4) and parts["mlps"].shape == (4,)
    assert float(parts["heads"][2, 3]) == float(out["dla"][labels.index("L2H3")])
    assert float(parts["mlps"][1]) == float(out["dla"][labels.index("mlp_out.1")])
    per_item = out.parts("dla/items")
    assert per_item["heads"].shape == (3, 4, 4) and per_item["embed"].shape == (3,)
    total = sum(p.reshape(3, -1).sum(-1) for p in per_item.values())
    torch.testing.assert_close(total, out["dla/total/items"], rtol=0, atol=1e-5)


def test_the_summary_shows_what_the_parts_sum_to_and_the_largest():
    out = specsight.run(_spec(["embed", "heads", "mlps"], model="tiny-llama"), model=tiny("tiny-llama"))  # fmt: skip
    text = out.summary(width=200)
    assert f"22 parts sum to {float(out['dla/total']):+.3f}" in text
    largest = max(_components(out).items(), key=lambda kv: abs(kv[1]))[0]
    assert f"largest:\n    {largest}: " in text
