"""The example specs in specs/ on the real built-in model (SmolLM2-135M): each one validates
against the published JSON Schema, runs, and shows the behaviour its comment promises.

Each test prints its runtime (``pytest -s`` shows it)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

import specsight

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
SCHEMA = ROOT / "schemas" / "spec.v1.json"
EXAMPLES = sorted(p.name for p in SPECS.glob("*.yaml"))


def timed_run(name: str, model, record_property, out: Path) -> specsight.Results:
    """Run an example (printing its runtime), write it to ``out`` and check the files."""
    started = time.perf_counter()
    results = specsight.run(SPECS / name, model=model, out=out)
    elapsed = time.perf_counter() - started
    record_property("runtime_s", round(elapsed, 3))
    print(f"\n[runtime] {name}: {elapsed:.2f} s (model preloaded, results written)")
    loaded = specsight.Results.load(out)
    assert set(loaded.tensors) == set(results.tensors)
    for tensor_name, tensor in results.tensors.items():
        torch.testing.assert_close(loaded[tensor_name], tensor, rtol=0, atol=0, equal_nan=True)
    assert loaded.manifest["model"]["id"] == "smollm2-135m"
    assert loaded.manifest["spec"]["file"] == str(SPECS / name)
    return results


def test_every_example_has_a_behaviour_test():
    tested = {
        "causal_tracing.yaml",
        "eiffel_logit_lens.yaml",
        "ioi_attribution.yaml",
        "ioi_dataset.yaml",
        "ioi_patching.yaml",
        "mlp_zero_ablation.yaml",
        "steering_add.yaml",
        "steering_caa.yaml",
        "steering_generate.yaml",
        "ioi_dla.yaml",
        "probe_layers.yaml",
        "sae_features.yaml",
        "ioi_circuit.yaml",
        "vit_patching.yaml",
    }
    assert set(EXAMPLES) == tested, "a new example in specs/ needs its own test here"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_matches_published_schema(name):
    import jsonschema

    if not SCHEMA.exists():
        pytest.fail(
            f"{SCHEMA.relative_to(ROOT)} is missing: run `specsight schema --write {SCHEMA}`"
        )
    schema = json.loads(SCHEMA.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    data = yaml.safe_load((SPECS / name).read_text())
    errors = sorted(validator_cls(schema).iter_errors(data), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    specsight.load_spec(SPECS / name)  # and the loader agrees


def test_eiffel_logit_lens(smollm, record_property, tmp_path):
    results = timed_run("eiffel_logit_lens.yaml", smollm, record_property, tmp_path)
    paris = float(results["paris"])
    assert paris == pytest.approx(0.656, abs=0.01)
    # top-1 of the top-k metric and of the summary's next tokens is " Paris"
    paris_id = smollm.tokenizer.encode_plain(" Paris")
    assert len(paris_id) == 1
    assert int(results["top/ids"][0]) == paris_id[0]
    assert float(results["top"][0]) == pytest.approx(paris, abs=1e-6)
    assert results.next_tokens["eiffel"][0][0][0] == " Paris"
    lens = results["lens"]
    assert lens.shape == (smollm.info.n_layers,) == (30,)
    assert results.axes("lens") == ["site"]
    # the last site of the lens is the model's own output distribution
    assert float(lens[-1]) == pytest.approx(paris, abs=1e-5)
    assert int(results["lens/ids"][-1, 0]) == paris_id[0]
    # " Paris" emerges only in the last layers
    assert float(lens[29]) > float(lens[20])
    assert float(lens[20]) < 0.01
    assert float(lens[28]) > float(lens[20])


def test_ioi_patching(smollm, record_property, tmp_path):
    results = timed_run("ioi_patching.yaml", smollm, record_property, tmp_path)
    clean = float(results["clean_logit_diff"])
    corrupt = float(results["corrupt_logit_diff"])
    assert clean == pytest.approx(6.12, abs=0.05)
    assert corrupt == pytest.approx(-5.49, abs=0.05)
    swept = results["logit_diff"]
    assert swept.shape == (30, 14)
    assert results.axes("logit_diff") == ["layer", "pos"]
    # the second name (position 9) carries the answer in early and middle layers ...
    assert (swept[0:19, 9] > 5).all(), swept[:, 9]
    # ... the last token carries it in late layers
    assert (swept[23:30, 13] > 4).all(), swept[:, 13]
    # patching position 0 (identical in both prompts) changes nothing, at every layer
    assert (swept[:, 0] - corrupt).abs().max() < 0.05
    # the same holds for every position before the second name
    assert (swept[:, 0:9] - corrupt).abs().max() < 0.05
    # patching the last position after the last layer restores the clean run exactly
    assert float(swept[29, 13]) == pytest.approx(clean, abs=1e-3)


def test_causal_tracing(smollm, record_property, tmp_path):
    results = timed_run("causal_tracing.yaml", smollm, record_property, tmp_path)
    rows = [json.loads(line) for line in (SPECS / "data" / "facts.jsonl").read_text().splitlines()]
    assert results.manifest["dataset"]["rows"] == len(rows) >= 16
    # the clean probabilities, item by item, against the model called directly
    want = []
    for row in rows:
        ids = torch.tensor([smollm.tokenizer.encode(row["prompt"])])
        with torch.inference_mode():
            probs = smollm.model(ids).logits[0, -1].softmax(-1)
        want.append(float(probs[smollm.tokenizer.encode_plain(row["answer"])[0]]))
    torch.testing.assert_close(results["p_clean/items"], torch.tensor(want), rtol=1e-4, atol=1e-5)
    # restoring the last token after the last layer gives the clean output back exactly
    assert float(results["last"][-1]) == pytest.approx(1.0, abs=1e-4)
    assert all(outcome.ok for outcome in results.expectations)


def test_ioi_dataset(smollm, record_property, tmp_path):
    results = timed_run("ioi_dataset.yaml", smollm, record_property, tmp_path)
    data = results.manifest["dataset"]
    rows = [json.loads(line) for line in (SPECS / "data" / "ioi.jsonl").read_text().splitlines()]
    assert data["rows"] == len(rows) == 64 and data["used"] == 16 and len(data["sample"]) == 16
    # each item measured on its own names, checked against the model called directly
    want = []
    for index in data["sample"]:
        row = rows[index]
        ids = torch.tensor([smollm.tokenizer.encode(row["clean"])])
        with torch.inference_mode():
            logits = smollm.model(ids).logits[0, -1]
        io, s = (smollm.tokenizer.encode_plain(row[c])[0] for c in ("io", "s"))
        want.append(float(logits[io] - logits[s]))
    torch.testing.assert_close(results["clean_ld/items"], torch.tensor(want), rtol=1e-4, atol=1e-4)
    assert float(results["clean_ld"]) == pytest.approx(sum(want) / len(want), abs=1e-4)
    assert results.axes("recovery") == ["layer", "pos"]
    assert all(outcome.ok for outcome in results.expectations)
    # the heads whose ablation costs most are ranked first, with the sign of their effect
    summary = results.summary()
    assert "strongest cells of ablated_ld (largest |effect| vs clean_ld)" in summary
    assert "(effect -2.59" in summary  # head 23.3 first


def test_mlp_zero_ablation(smollm, record_property, tmp_path):
    results = timed_run("mlp_zero_ablation.yaml", smollm, record_property, tmp_path)
    base = float(results["paris_base"])
    assert base == pytest.approx(0.656, abs=0.01)
    assert float(results["paris_ablated"]) < 0.1 * base
    per_layer = results["paris_per_layer"]
    assert per_layer.shape == (30,)
    assert results.axes("paris_per_layer") == ["layer"]
    # MLP 0 matters most on this prompt: ablating it alone also destroys the prediction
    assert float(per_layer[0]) < 0.1 * base
    assert float(per_layer[0]) == float(per_layer.min())


def _plain_sentiment(smollm, prompts: list[str]) -> torch.Tensor:
    """ " great" - " bad" at the last position, one plain forward per prompt (no hooks)."""
    (great,) = smollm.tokenizer.encode_plain(" great")
    (bad,) = smollm.tokenizer.encode_plain(" bad")
    out = []
    for prompt in prompts:
        ids = torch.tensor([smollm.tokenizer.encode(prompt)])
        with torch.inference_mode():
            logits = smollm.model(input_ids=ids).logits[0, -1].float()
        out.append(logits[great] - logits[bad])
    return torch.stack(out)


def test_steering_add(smollm, record_property, tmp_path):
    results = timed_run("steering_add.yaml", smollm, record_property, tmp_path)
    sentiment = results["sentiment"]
    spec = specsight.load_spec(SPECS / "steering_add.yaml")
    prompts = spec.invokes["steered"].prompts
    coeffs = [0, 2, 4, 8]
    assert sentiment.shape == (len(coeffs), len(prompts))
    assert results.axes("sentiment") == ["coeff", "prompt"]
    assert results.manifest["tensors"]["sentiment"]["axis_values"]["coeff"] == coeffs
    # the largest coefficient pushes every prompt towards " great"
    assert (sentiment[-1] > sentiment[0]).all(), sentiment
    # coefficient 0 is the unsteered model
    torch.testing.assert_close(sentiment[0], _plain_sentiment(smollm, prompts), rtol=0, atol=1e-5)
    assert results["top"].shape == (len(coeffs), len(prompts), 3)
    assert set(results.saves) == {"love_mean", "hate_mean"}


def _caa_by_hand(smollm, spec, layer: int, coeff: float) -> torch.Tensor:
    """The CAA script: hooks keep the last token's residual at ``layer`` for each positive and
    negative sentence; their mean difference, scaled to ``coeff`` times the mean length of the
    steered prompt's residual there, is added at every position; ' great' - ' bad' per prompt."""
    block = smollm.model.model.layers[layer]
    rows = spec.dataset.rows
    kept: list[torch.Tensor] = []

    def keep(_m, _args, output):
        kept.append((output[0] if isinstance(output, tuple) else output)[0, -1].float())

    def mean_of(column: str) -> torch.Tensor:
        kept.clear()
        handle = block.register_forward_hook(keep)
        for row in rows:
            smollm.model(input_ids=torch.tensor([smollm.tokenizer.encode(row[column])]))
        handle.remove()
        return torch.stack(kept).mean(0)

    def steer(_m, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        length = hidden[0].norm(dim=-1).mean()
        hidden = hidden + coeff * direction * length
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.inference_mode():
        diff = mean_of("pos") - mean_of("neg")
        direction = diff / diff.norm()
        handle = block.register_forward_hook(steer)
        try:
            return _plain_sentiment(smollm, spec.invokes["steered"].prompts)
        finally:
            handle.remove()


def test_steering_caa(smollm, record_property, tmp_path):
    results = timed_run("steering_caa.yaml", smollm, record_property, tmp_path)
    assert results.ok, [o.to_dict() for o in results.expectations if not o.ok]
    spec = specsight.load_spec(SPECS / "steering_caa.yaml")
    layers, coeffs = [3, 6, 9, 12], [0, 0.1, 0.2, 0.4]
    assert results.axes("sentiment") == ["layer", "coeff"]
    per_prompt = results["sentiment/items"]  # [layer, coeff, prompt]
    plain = _plain_sentiment(smollm, spec.invokes["steered"].prompts)
    for i in range(len(layers)):
        torch.testing.assert_close(per_prompt[i, 0], plain, rtol=0, atol=1e-4)
    for layer, coeff in [(6, 0.1), (12, 0.4)]:
        expected = _caa_by_hand(smollm, spec, layer, coeff)
        got = per_prompt[layers.index(layer), coeffs.index(coeff)]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    texts = [entry["text"] for entry in results.manifest["generated"]["story"]]
    assert texts[0] != texts[1]  # the vector changes what the model writes


def test_ioi_dla_equals_transformer_lens(smollm, record_property, tmp_path):
    """Items run batched (padded) by specsight, one by one by TransformerLens's bridge on the
    same weights: each part within what padding moves (FACTS: ~1e-4 of the logits)."""
    from transformer_lens.model_bridge import TransformerBridge

    from specsight.models.catalog import builtin_dir

    results = timed_run("ioi_dla.yaml", smollm, record_property, tmp_path)
    assert results.ok, [o.to_dict() for o in results.expectations if not o.ok]
    labels = results.manifest["tensors"]["dla"]["axis_values"]["component"]
    assert len(labels) == 1 + 30 * 9 + 30 + 1
    per_item, totals = results["dla/items"], results["dla/total/items"]  # [64, 302], [64]
    assert float(results["dla/residual"].abs()) < 1e-4 * float(totals.abs().mean())
    bridge = TransformerBridge.boot_transformers(str(builtin_dir()), device="cpu")
    bridge.enable_compatibility_mode(
        fold_value_biases=False, center_unembed=False, disable_warnings=True
    )
    rows = [json.loads(line) for line in (SPECS / "data" / "ioi.jsonl").read_text().splitlines()]
    for i in (0, 1, 37):
        ids = smollm.tokenizer.encode(rows[i]["clean"])
        target, foil = (smollm.tokenizer.encode_plain(rows[i][k])[0] for k in ("io", "s"))
        _, cache = bridge.run_with_cache(torch.tensor([ids]))
        stack, names = cache.get_full_resid_decomposition(
            expand_neurons=False, pos_slice=-1, return_labels=True
        )
        attrs = cache.logit_attrs(
            stack,
            tokens=torch.tensor([target]),
            incorrect_tokens=torch.tensor([foil]),
            pos_slice=-1,
        ).reshape(-1)
        ref = dict(zip(names, attrs.tolist()))
        got = dict(zip(labels, per_item[i].tolist()))
        tol = 1e-4 * sum(abs(v) for v in ref.values())
        for name, value in ref.items():
            ours = (
                got[f"mlp_out.{name.split('_')[0]}"] if name.endswith("_mlp_out") else got.get(name)
            )
            if ours is not None:
                assert ours == pytest.approx(value, abs=tol), (i, name)
        assert float(totals[i]) == pytest.approx(sum(got.values()), abs=tol)


def test_probe_layers_equal_scikit_learn(smollm, record_property, tmp_path):
    """The probes of two layers against scikit-learn's LogisticRegression on the same saved
    activations and split (StandardScaler, C = 1 / (l2 * n_train))."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    results = timed_run("probe_layers.yaml", smollm, record_property, tmp_path)
    assert results.ok, [o.to_dict() for o in results.expectations if not o.ok]
    spec = yaml.safe_load((SPECS / "probe_layers.yaml").read_text())
    spec["dataset"]["file"] = str(SPECS / "data" / "sentiment.jsonl")
    spec["invokes"]["reviews"]["ops"] = [
        {"op": "save", "site": f"resid_post.{layer}", "positions": "last"} for layer in (0, 20)
    ]
    again = specsight.run(spec, model=smollm)
    torch.testing.assert_close(again["sentiment"], results["sentiment"], rtol=0, atol=0)
    held = again["sentiment/held_out"].bool().numpy()
    rows = [
        json.loads(line) for line in (SPECS / "data" / "sentiment.jsonl").read_text().splitlines()
    ]
    y = np.array([row["sentiment"] == "positive" for row in rows], dtype=int)
    assert {rows[i]["word"] for i in np.flatnonzero(held)}.isdisjoint(
        {rows[i]["word"] for i in np.flatnonzero(~held)}
    )
    train, test = np.flatnonzero(~held), np.flatnonzero(held)
    for layer in (0, 20):
        x = again.saves[f"reviews/resid_post.{layer}"][:, 0].double().numpy()
        scaler = StandardScaler().fit(x[train])
        model = LogisticRegression(C=1 / (0.01 * len(train)), tol=1e-10, max_iter=100_000)
        model.fit(scaler.transform(x[train]), y[train])
        expected = model.score(scaler.transform(x[test]), y[test])
        assert float(again["sentiment"][layer]) == pytest.approx(expected, abs=1e-6)
        weight = model.coef_ / scaler.scale_
        ours = again["sentiment/weight"][layer].double().numpy()
        np.testing.assert_allclose(ours, weight, atol=2e-3 * np.abs(weight).max())


def test_steering_generate(smollm, record_property, tmp_path):
    results = timed_run("steering_generate.yaml", smollm, record_property, tmp_path)
    assert results.ok, [o.to_dict() for o in results.expectations if not o.ok]
    generated = results.manifest["generated"]
    base, steered = generated["base"][0]["text"], generated["steered"][0]["text"]
    assert base.startswith(" the perfect person to help me with my project.")
    assert steered.startswith(" an amazing writer.")
    assert results["steered/generated_ids"].shape == (1, 32)
    loaded = specsight.Results.load(tmp_path)
    assert loaded.manifest["generated"]["steered"][0]["text"] == steered
    assert "an amazing writer" in results.summary()


def test_ioi_attribution_finds_the_cells_the_exact_sweep_finds(smollm, record_property, tmp_path):
    results = timed_run("ioi_attribution.yaml", smollm, record_property, tmp_path / "atp")
    assert results.ok, [o.to_dict() for o in results.expectations if not o.ok]
    started = time.perf_counter()
    exact = specsight.run(SPECS / "ioi_patching.yaml", model=smollm)
    exact_s = time.perf_counter() - started
    started = time.perf_counter()
    atp = specsight.run(SPECS / "ioi_attribution.yaml", model=smollm)["atp"]
    atp_s = time.perf_counter() - started
    effect = exact["logit_diff"] - exact["corrupt_logit_diff"]
    assert atp.shape == effect.shape == (30, 14)
    # Most cells change nothing (their exact effect is float noise, ~1e-5), so a rank
    # correlation over all cells measures the order of noise. Judge the cells that matter:
    # every cell whose patch restores more than 5 logits is found (attribution > 2), no cell the
    # exact sweep calls null gets a large attribution, and the two grids correlate linearly.
    strong, null = effect > 5, effect.abs() < 0.5
    pearson = float(torch.corrcoef(torch.stack([atp.flatten(), effect.flatten()]))[0, 1])
    print(
        f"\n[atp] {int(strong.sum())} strong cells, min attribution there "
        f"{float(atp[strong].min()):.2f}; max |attribution| on {int(null.sum())} null cells "
        f"{float(atp[null].abs().max()):.2f}; pearson {pearson:.3f}; "
        f"attribution {atp_s:.2f} s, exact {exact_s:.2f} s"
    )
    record_property("pearson", round(pearson, 4))
    assert int(strong.sum()) >= 20 and bool((atp[strong] > 2).all())
    assert float(atp[null].abs().max()) < 1.0
    assert not bool(((atp > 5) & (effect < 2)).any())
    assert pearson > 0.8
    assert atp_s < exact_s


def test_vit_patching_example(tmp_path):
    """Images beside the spec; the class token at the last layer carries the whole output."""
    started = time.perf_counter()
    results = specsight.run(SPECS / "vit_patching.yaml", out=tmp_path)
    print(f"\n[runtime] vit_patching.yaml: {time.perf_counter() - started:.2f} s")
    assert len(results.expectations) == 3 and all(o.ok for o in results.expectations)
    recovery = results["recovery"]
    assert tuple(recovery.shape) == (4, 17)
    assert results.manifest["model"]["inputs"] == "image"
    assert results.prompts["clean"] == ["images/red_square.png"]
    assert any(tmp_path.glob("*.png"))  # the heatmaps


def test_sae_features_equal_sae_lens_and_a_hand_written_clamp(smollm, record_property, tmp_path):
    """The built-in SAE's features against sae-lens on residuals read by a hook, and the
    clamp against a hook that adds (75 - f_75) times feature 75's decoder row at ' Germany'."""
    from safetensors.torch import load_file

    from specsight.compile.saes import BUILTIN_SAES
    from tests.sae_reference import reference_encode

    results = timed_run("sae_features.yaml", smollm, record_property, tmp_path)
    assert results.ok, [o.to_dict() for o in results.expectations if not o.ok]
    folder = BUILTIN_SAES["smollm2-135m-res6"]
    lm, tok = smollm.model, smollm.tokenizer
    layer = lm.model.layers[6]
    spec = yaml.safe_load((SPECS / "sae_features.yaml").read_text())

    def residual(prompt: str) -> torch.Tensor:
        kept = []
        handle = layer.register_forward_hook(lambda _m, _a, out: kept.append(out[0] if isinstance(out, tuple) else out))  # fmt: skip
        with torch.inference_mode():
            lm(torch.tensor([tok.encode(prompt)]))
        handle.remove()
        return kept[0][0]

    animals = torch.stack([reference_encode(folder, residual(p)[-1])[180] for p in spec["invokes"]["animals"]["prompt"]])  # fmt: skip
    scale = float(animals.abs().max())
    torch.testing.assert_close(results.saves["animal_feature"].flatten(), animals, rtol=1e-4, atol=1e-4 * scale)  # fmt: skip
    w_dec = load_file(folder / "sae_weights.safetensors")["W_dec"]
    prompt = spec["invokes"]["steered"]["prompt"]
    germany = len(tok.encode("The capital of Germany")) - 1

    def clamp(_m, _a, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        feature = reference_encode(folder, hidden[0, germany])[75]
        hidden[0, germany] += (75 - feature) * w_dec[75]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = layer.register_forward_hook(clamp)
    with torch.inference_mode():
        probs = lm(torch.tensor([tok.encode(prompt)])).logits[0, -1].softmax(-1)
    handle.remove()
    paris = tok.encode_plain(" Paris")[0]
    torch.testing.assert_close(results["p_paris_steered"], probs[paris], rtol=1e-4, atol=1e-5)


def test_ioi_circuit_claims_hold_and_its_circuit_files_check_again(smollm, record_property, tmp_path):  # fmt: skip
    """EAP and faithfulness on the built-in model: the claims hold, the full model's metric is
    the clean logit difference the main forward measured, and a written circuit file read back
    by another spec gives the same faithfulness."""
    results = timed_run("ioi_circuit.yaml", smollm, record_property, tmp_path / "run")
    assert results.ok, [o.to_dict() for o in results.expectations if not o.ok]
    clean = float(results.metrics["clean_ld"])
    full = float(results.metrics["faithfulness/full"])
    assert full == pytest.approx(clean, abs=1e-4 * (1 + abs(clean)))
    spec = yaml.safe_load((SPECS / "ioi_circuit.yaml").read_text())
    circuit = tmp_path / "run" / "circuits" / "faithfulness.top200.json"
    written = json.loads(circuit.read_text())
    assert len(written["edges"]) == 200 and written["model"]["n_layers"] == 30
    spec["metrics"] = {
        "again": {**spec["metrics"]["faithfulness"], "circuit": {"file": str(circuit)}}
    }
    spec["expect"] = []
    spec["dataset"]["file"] = str(SPECS / "data" / "ioi.jsonl")
    again = specsight.run(spec, model=smollm)
    assert float(again.metrics["again"][0]) == pytest.approx(
        float(results.metrics["faithfulness"][0]), rel=1e-5, abs=1e-6
    )
