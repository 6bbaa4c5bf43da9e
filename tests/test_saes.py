"""SAE features as sites (``saes:`` and ``sae.NAME.features|recon|error``) against independent
references: encoding and decoding against sae-lens on random SAEs in SAELens's folder format
(every architecture, with and without ``apply_b_dec_to_input``, every input normalisation);
feature interventions against hand-written hooks on the model (zeroing a feature subtracts its
activation times its decoder row; any other change adds ``(new - old) @ W_dec``); an untouched
SAE changes nothing, bit for bit; and located errors for misuse."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import specsight
from specsight.errors import SpecError
from tests.conftest import tiny
from tests.sae_reference import (
    TRANSCODERS,
    reference_decode,
    reference_encode,
    sae_lens_sae,
    tiny_sae,
    write_random_sae,
    write_random_transcoder,
)

LAYER, D_SAE = 1, 48
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def _sae(folder: Path, architecture: str = "standard", **options) -> Path:
    return tiny_sae(folder, architecture, D_SAE, **options)


def _spec(folder: Path, invokes: dict, **top) -> dict:
    sae = {"path": str(folder), "site": f"resid_post.{LAYER}"}
    return {"specsight": 1, "model": "tiny-llama", "saes": {"s": sae}, "invokes": invokes, **top}


def _out(ops: list[dict], prompt: str = CORRUPT, **invoke) -> dict:
    last = {"op": "save", "site": "logits", "positions": [-1], "name": "out"}
    return {"prompt": prompt, "ops": [*ops, last], **invoke}


def _residual(lm, prompt: str) -> torch.Tensor:
    """resid_post.LAYER of one prompt, read by a hook: [pos, 64]."""
    kept = []
    layer = lm.model.model.layers[LAYER]
    handle = layer.register_forward_hook(lambda _m, _a, out: kept.append(out[0] if isinstance(out, tuple) else out))  # fmt: skip
    with torch.inference_mode():
        lm.model(torch.tensor([lm.tokenizer.encode(prompt)]))
    handle.remove()
    return kept[0][0].detach().clone()


def _logits(lm, prompt: str, change: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """The last position's logits, with ``change`` (hidden [pos, 64] -> new) at the layer."""
    layer = lm.model.model.layers[LAYER]

    def hook(_m, _a, out):
        hidden = out[0] if isinstance(out, tuple) else out
        new = change(hidden[0].clone()).unsqueeze(0)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = layer.register_forward_hook(hook) if change is not None else None
    with torch.inference_mode():
        logits = lm.model(torch.tensor([lm.tokenizer.encode(prompt)])).logits[0, -1]
    if handle is not None:
        handle.remove()
    return logits


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within ``rel`` of the values' own size (float32 sums in another order)."""
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale)


def _w_dec(folder: Path) -> torch.Tensor:
    return load_file(folder / "sae_weights.safetensors")["W_dec"]


# --- encode and decode, against sae-lens ------------------------------------------------------


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("b_dec_in", [False, True])
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
def test_features_recon_and_error_equal_sae_lens(tmp_path, architecture, b_dec_in, normalize):
    folder = _sae(tmp_path, architecture, apply_b_dec_to_input=b_dec_in, normalize_activations=normalize)  # fmt: skip
    saves = [
        {"op": "save", "site": f"sae.s.{part}", "name": part}
        for part in ("features", "recon", "error")
    ]
    saves.append({"op": "save", "site": f"resid_post.{LAYER}", "name": "x"})
    got = specsight.run(_spec(folder, {"a": {"prompt": CLEAN, "ops": saves}}), model=tiny()).saves
    x = _residual(tiny(), CLEAN)
    _close(got["x"], x)
    features = reference_encode(folder, x)
    assert 0 < (features > 0).float().mean() < 0.9, "the SAE fires on some features, not all"
    _close(got["features"], features)
    recon = reference_decode(folder, features, x=x)
    _close(got["recon"], recon)
    _close(got["error"], x - recon, rel=1e-4)


def test_an_untouched_sae_changes_nothing(tmp_path):
    folder = _sae(tmp_path)
    reads = [{"op": "save", "site": f"sae.s.{p}"} for p in ("features", "recon", "error")]
    got = specsight.run(_spec(folder, {"a": _out(reads)}), model=tiny()).saves["out"][0]
    assert torch.equal(got, _logits(tiny(), CORRUPT))


# --- interventions, against hand-written hooks ------------------------------------------------


def _active(folder: Path, prompt: str, position: int = -1) -> list[int]:
    features = reference_encode(folder, _residual(tiny(), prompt))[position]
    return features.nonzero().flatten().tolist()


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_zeroing_a_feature_subtracts_its_decoder_row_times_its_activation(tmp_path, architecture):
    folder = _sae(tmp_path, architecture)
    feature = _active(folder, CORRUPT)[0]
    zero = {"op": "zero", "site": "sae.s.features", "positions": [-1], "dims": [feature]}
    got = specsight.run(_spec(folder, {"a": _out([zero])}), model=tiny()).saves["out"][0]

    def by_hand(hidden):
        activation = reference_encode(folder, hidden[-1])[feature]
        hidden[-1] -= activation * _w_dec(folder)[feature]
        return hidden

    want = _logits(tiny(), CORRUPT, by_hand)
    assert not torch.allclose(want, _logits(tiny(), CORRUPT)), "the feature matters"
    _close(got, want)


def _written_back(folder: Path, new_features: Callable[[torch.Tensor], torch.Tensor]):
    """A hook's change: the features at the last position replaced, the difference decoded."""

    def change(hidden):
        old = reference_encode(folder, hidden[-1])
        hidden[-1] += (new_features(old.clone()) - old) @ _w_dec(folder)
        return hidden

    return change


@pytest.mark.parametrize(
    ("op", "edit"),
    [
        (
            {"op": "clamp", "dims": [5, 7], "value": 4.0},
            lambda f: f.index_fill(0, torch.tensor([5, 7]), 4.0),
        ),  # fmt: skip
        (
            {"op": "scale", "dims": "0:10", "factor": 3.0},
            lambda f: torch.cat([f[:10] * 3, f[10:]]),
        ),  # fmt: skip
        ({"op": "add", "vector": [0.5] * D_SAE}, lambda f: f + 0.5),
        ({"op": "zero"}, torch.zeros_like),
    ],
)
def test_feature_ops_write_back_the_decoded_change(tmp_path, op, edit):
    folder = _sae(tmp_path)
    op = {**op, "site": "sae.s.features", "positions": [-1]}
    got = specsight.run(_spec(folder, {"a": _out([op])}), model=tiny()).saves["out"][0]
    _close(got, _logits(tiny(), CORRUPT, _written_back(folder, edit)))


def test_patching_features_between_invokes(tmp_path):
    folder = _sae(tmp_path)
    patch = {"op": "patch", "site": "sae.s.features", "positions": [-1], "from": "clean"}
    spec = _spec(folder, {"clean": {"prompt": CLEAN}, "corrupt": _out([patch])})
    got = specsight.run(spec, model=tiny()).saves["out"][0]
    clean = reference_encode(folder, _residual(tiny(), CLEAN)[-1])
    _close(got, _logits(tiny(), CORRUPT, _written_back(folder, lambda _f: clean)))


def test_zeroing_the_error_leaves_the_reconstruction(tmp_path):
    folder = _sae(tmp_path, normalize_activations="layer_norm")
    zero = {"op": "zero", "site": "sae.s.error", "positions": [-1]}
    got = specsight.run(_spec(folder, {"a": _out([zero])}), model=tiny()).saves["out"][0]

    def by_hand(hidden):
        x = hidden[-1]
        hidden[-1] = reference_decode(folder, reference_encode(folder, x), x=x)
        return hidden

    _close(got, _logits(tiny(), CORRUPT, by_hand))


def test_a_feature_sweep_batches_each_feature_as_a_row(tmp_path):
    folder = _sae(tmp_path)
    features = _active(folder, CORRUPT)[:4] + [D_SAE - 1]
    zero = {"op": "zero", "site": "sae.s.features", "positions": [-1], "dims": ["{feature}"]}
    spec = _spec(folder, {"a": _out([zero], sweep={"feature": features})})
    got = specsight.run(spec, model=tiny(), max_batch=8).saves["out"]
    assert got.shape[0] == len(features)
    for i, feature in enumerate(features):

        def zeroed(f, feature=feature):
            f[feature] = 0
            return f

        _close(got[i, 0], _logits(tiny(), CORRUPT, _written_back(folder, zeroed)))


def test_an_sae_can_be_named_by_a_registered_id(tmp_path):
    folder = _sae(tmp_path / "res1")
    spec = _spec(folder, {"a": {"prompt": CLEAN, "ops": [{"op": "save", "site": "sae.s.features"}]}})  # fmt: skip
    spec["saes"]["s"] = {"id": "my-res1", "site": f"resid_post.{LAYER}"}
    got = specsight.run(spec, model=tiny(), saes={"my-res1": str(folder)}).saves
    _close(got["a/sae.s.features"], reference_encode(folder, _residual(tiny(), CLEAN)))


def test_top_features_are_each_rows_largest_activations(tmp_path):
    folder = _sae(tmp_path)
    rows = [{"text": CLEAN}, {"text": CORRUPT}, {"text": "The cat sat on the mat"}]
    spec = _spec(folder, {"a": {"prompt": "{text}"}}, dataset={"rows": rows})
    spec["metrics"] = {"top": {"kind": "top_features", "invoke": "a", "sae": "s", "k": 5}}
    got = specsight.run(spec, model=tiny()).metrics
    assert got["top"].shape == got["top/ids"].shape == (3, 5)
    for i, row in enumerate(rows):
        features = reference_encode(folder, _residual(tiny(), row["text"])[-1])
        want = features.topk(5)
        _close(got["top"][i], want.values)
        assert got["top/ids"][i].tolist() == want.indices.tolist()


def test_top_features_misuse_is_located(tmp_path):
    spec = _spec(_sae(tmp_path), {"a": {"prompt": CLEAN}})
    spec["metrics"] = {"top": {"kind": "top_features", "invoke": "a", "sae": "s", "k": D_SAE + 1}}
    assert _issue(spec)[:2] == ("bad-k", ("metrics", "top", "k"))
    spec["metrics"]["top"].update(k=3, sae="t")
    code, path, text = _issue(spec)
    assert (code, path) == ("unknown-site", ("metrics", "top", "sae")) and "'t'" in text


# --- misuse: located errors -------------------------------------------------------------------


def _issue(spec: dict, **run) -> tuple[str, tuple, str]:
    with pytest.raises(SpecError) as info:
        specsight.run(spec, model=tiny(), **run)
    issue = info.value.issues[0]
    return issue.code, tuple(issue.path), issue.message + " | " + (issue.hint or "")


def _saving(site: str, **op) -> dict:
    return {"a": {"prompt": CLEAN, "ops": [{"op": "save", "site": site, **op}]}}


def test_a_dims_index_beyond_d_sae_is_located(tmp_path):
    spec = _spec(_sae(tmp_path), _saving("sae.s.features", dims=[D_SAE]))
    code, path, text = _issue(spec)
    assert (code, path[-1]) == ("bad-dims", "dims") and str(D_SAE) in text


def test_an_sae_whose_d_in_is_not_the_sites_width_is_located(tmp_path):
    write_random_sae(tmp_path, "standard", 32, D_SAE, seed=0)
    code, path, text = _issue(_spec(tmp_path, _saving("sae.s.features")))
    assert (code, path) == ("sae-width", ("saes", "s", "site")) and "32" in text and "64" in text


@pytest.mark.parametrize(
    ("site", "code", "words"),
    [
        ("sae.t.features", "unknown-site", "no SAE named 't'"),
        ("sae.s.feature", "unknown-site", "did you mean 'features'"),
    ],
)
def test_unknown_sae_sites_are_located(tmp_path, site, code, words):
    got_code, path, text = _issue(_spec(_sae(tmp_path), _saving(site)))
    assert got_code == code and path[-1] == "site" and words in text


def test_a_skip_on_an_sae_site_is_refused(tmp_path):
    spec = _spec(_sae(tmp_path), {"a": {"prompt": CLEAN, "ops": [{"op": "skip", "site": "sae.s.features"}]}})  # fmt: skip
    assert _issue(spec)[0] == "skip-site"


def test_bad_sae_folders_are_located(tmp_path):
    missing = _spec(tmp_path / "nowhere", _saving("sae.s.features"))
    assert _issue(missing)[:2] == ("file-not-found", ("saes", "s", "path"))
    folder = _sae(tmp_path / "odd")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    code, path, text = _issue(_spec(folder, _saving("sae.s.features")))
    assert (code, path) == ("bad-sae", ("saes", "s", "path")) and "gated" in text
    unknown = _spec(folder, _saving("sae.s.features"))
    unknown["saes"]["s"] = {"id": "my-res", "site": "resid_post.1"}
    code, path, text = _issue(unknown, saes={"my-res1": str(folder)})
    assert (code, path) == ("unknown-sae", ("saes", "s", "id")) and "my-res1" in text


def test_a_remote_run_refuses_sae_paths_before_sending(tmp_path):
    from specsight.remote.admission import refuse_local_only
    from specsight.spec import validate_spec
    from specsight.spec.load import from_data

    doc = from_data(_spec(_sae(tmp_path), _saving("sae.s.features")))
    with pytest.raises(SpecError) as info:
        refuse_local_only(validate_spec(doc), doc)
    issue = info.value.issues[0]
    assert issue.path == ("saes", "s", "path") and "id:" in issue.hint


# --- registered ids, locally and on a server --------------------------------------------------


def _by_id(folder_id: str = "my-sae") -> dict:
    zero = {"op": "zero", "site": "sae.s.features", "positions": [-1], "dims": "0:8"}
    spec = _spec(Path("unused"), {"a": _out([zero], prompt=[CLEAN, CORRUPT])})
    spec["saes"]["s"] = {"id": folder_id, "site": f"resid_post.{LAYER}"}
    spec["metrics"] = {"top": {"kind": "top_features", "invoke": "a", "sae": "s", "k": 3}}
    return spec


@pytest.fixture
def sae_server(tmp_path):
    """The real server app serving tiny-llama with one SAE registered (``--sae my-sae=...``)."""
    import dataclasses

    from fastapi.testclient import TestClient

    from specsight.remote.admission import checked_saes
    from specsight.remote.auth import KeyRing
    from specsight.remote.client import RemoteClient
    from specsight.remote.jobs import JobStore
    from specsight.remote.server import create_app

    folder = _sae(tmp_path / "served")
    model = dataclasses.replace(tiny(), saes=checked_saes({"my-sae": str(folder)}))
    store = JobStore(tmp_path / "jobs.db")
    app = create_app({"tiny-llama": model}, store=store, keys=KeyRing.from_raw_keys({"t": "k"}))
    try:
        with TestClient(app, base_url="http://testserver") as http:
            yield RemoteClient("http://testserver", "k", client=http), folder
    finally:
        store.close()


def test_a_server_named_sae_runs_remotely_as_locally(sae_server, tmp_path):
    from specsight.remote.submit import run_remote
    from tests.test_remote_client import assert_same_tensors

    client, folder = sae_server
    listed = client.models().models[0].saes
    assert listed["my-sae"]["d_sae"] == D_SAE and "folder" not in listed["my-sae"]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(_by_id()))
    remote = run_remote(path, "", client=client, timeout=120)
    assert_same_tensors(remote, specsight.run(path, model=tiny(), saes={"my-sae": str(folder)}))
    path.write_text(json.dumps(_by_id("their-sae")))
    with pytest.raises(SpecError) as info:
        run_remote(path, "", client=client, timeout=120)
    issue = info.value.issues[0]
    assert (issue.code, issue.path, issue.line) == ("unknown-sae", ("saes", "s", "id"), 1)
    assert "my-sae" in issue.message


def test_the_cli_registers_saes_by_id(tmp_path):
    from click.testing import CliRunner

    from specsight.cli import main

    folder = _sae(tmp_path / "res1")
    spec = _by_id()
    spec["model"] = "tiny-llama"
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    ok = CliRunner().invoke(main, ["run", str(path), "--sae", f"my-sae={folder}", "-q"])
    assert ok.exit_code == 0, ok.output
    missing = CliRunner().invoke(main, ["run", str(path), "-q"])
    assert missing.exit_code == 2 and "my-sae" in missing.output
    bad = CliRunner().invoke(main, ["run", str(path), "--sae", "my-sae"])
    assert bad.exit_code == 2 and "ID=PATH" in bad.output


def test_a_servers_size_estimate_counts_feature_saves(sae_server, tmp_path):
    """A save of every feature at every position is sized by d_sae before the job runs, and
    the estimate is the saved tensor's size."""
    from specsight.compile import spec_sizes
    from specsight.spec import load_spec

    client, folder = sae_server
    spec = _by_id()
    spec["invokes"]["a"]["ops"].append({"op": "save", "site": "sae.s.features", "name": "f"})
    sizes = spec_sizes(load_spec(spec), tiny().info, tiny().tokenizer, sae_widths={"my-sae": D_SAE})
    got = specsight.run(spec, model=tiny(), saes={"my-sae": str(folder)}).saves["f"]
    assert sizes.tensors["f"] == got.numel() * 4


# --- transcoders ------------------------------------------------------------------------------

MLP_IN, MLP_OUT = f"model.layers.{LAYER}.mlp.input", f"mlp_out.{LAYER}"


def _transcoder_spec(folder: Path, ops: list[dict], **entry) -> dict:
    spec = _spec(folder, {"a": _out(ops)})
    spec["saes"]["s"] = {"path": str(folder), "site": MLP_IN, "site_out": MLP_OUT, **entry}
    return spec


def _mlp_logits(lm, change: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The last position's logits with the MLP's output replaced by ``change(x, out)`` (x: the
    MLP's input), both [pos, 64]."""
    mlp = lm.model.model.layers[LAYER].mlp
    kept = {}

    def keep(_m, args):
        kept["x"] = args[0][0].clone()

    handles = [
        mlp.register_forward_pre_hook(keep),
        mlp.register_forward_hook(lambda _m, _a, out: change(kept["x"], out[0].clone())[None]),
    ]
    with torch.inference_mode():
        logits = lm.model(torch.tensor([lm.tokenizer.encode(CORRUPT)])).logits[0, -1]
    for handle in handles:
        handle.remove()
    return logits


@pytest.mark.parametrize("architecture", TRANSCODERS)
def test_transcoder_parts_equal_sae_lens(tmp_path, architecture):
    folder = write_random_transcoder(tmp_path, architecture, 64, D_SAE, 64, seed=3)
    saves = [
        {"op": "save", "site": f"sae.s.{p}", "name": p} for p in ("features", "recon", "error")
    ]
    saves += [{"op": "save", "site": MLP_IN, "name": "x"}, {"op": "save", "site": MLP_OUT, "name": "out"}]  # fmt: skip
    spec = _transcoder_spec(folder, [])
    spec["invokes"]["a"]["ops"] = saves
    got = specsight.run(spec, model=tiny()).saves
    reference = sae_lens_sae(folder)
    with torch.no_grad():
        features = reference.encode(got["x"])
        recon = reference(got["x"])  # decode, plus the skip term of skip transcoders
    assert 0 < (features > 0).float().mean() < 0.9
    _close(got["features"], features)
    _close(got["recon"], recon)
    _close(got["error"], got["out"] - recon, rel=1e-4)


def test_zeroing_a_transcoder_feature_changes_the_mlp_output(tmp_path):
    folder = write_random_transcoder(tmp_path, "skip_transcoder", 64, D_SAE, 64, seed=3)
    w_dec = _w_dec(folder)
    reference = sae_lens_sae(folder)

    def active(x):
        with torch.no_grad():
            return reference.encode(x[-1])

    mlp = tiny().model.model.layers[LAYER].mlp
    kept = []

    def keep(_m, args):
        kept.append(args[0][0, -1].clone())

    handle = mlp.register_forward_pre_hook(keep)
    _logits(tiny(), CORRUPT)
    handle.remove()
    feature = active(kept[0][None]).nonzero().flatten()[0].item()
    zero = {"op": "zero", "site": "sae.s.features", "positions": [-1], "dims": [feature]}
    got = specsight.run(_transcoder_spec(folder, [zero]), model=tiny()).saves["out"][0]

    def by_hand(x, out):
        out[-1] -= active(x)[feature] * w_dec[feature]
        return out

    want = _mlp_logits(tiny(), by_hand)
    assert not torch.allclose(want, _logits(tiny(), CORRUPT))
    _close(got, want)


@pytest.mark.parametrize("with_op", [False, True])
def test_a_transcoder_without_its_error_stands_in_for_the_mlp(tmp_path, with_op):
    folder = write_random_transcoder(tmp_path, "transcoder", 64, D_SAE, 64, seed=3)
    reference = sae_lens_sae(folder)
    ops = [{"op": "scale", "site": "sae.s.features", "positions": [-1], "factor": 2.0}]
    spec = _transcoder_spec(folder, ops if with_op else [], keep_error=False)
    got = specsight.run(spec, model=tiny()).saves["out"][0]

    def by_hand(x, _out):
        with torch.no_grad():
            features = reference.encode(x)
            if with_op:
                features[-1] *= 2
            return reference.decode(features)

    _close(got, _mlp_logits(tiny(), by_hand))


def test_transcoder_misuse_is_located(tmp_path):
    folder = write_random_transcoder(tmp_path / "tc", "transcoder", 64, D_SAE, 64, seed=3)
    spec = _transcoder_spec(folder, [])
    del spec["saes"]["s"]["site_out"]
    code, path, text = _issue(spec)
    assert (code, path) == ("transcoder", ("saes", "s")) and "site_out" in text
    spec = _spec(_sae(tmp_path / "sae"), {"a": _out([])})
    spec["saes"]["s"]["site_out"] = MLP_OUT
    assert _issue(spec)[:2] == ("transcoder", ("saes", "s", "site_out"))
    spec = _transcoder_spec(folder, [])
    spec["saes"]["s"]["site_out"] = f"model.layers.{LAYER}.mlp.down_proj.input"
    assert _issue(spec)[:2] == ("transcoder", ("saes", "s", "site_out"))


def test_mean_ablating_a_feature_set_uses_the_reference_rows_mean(tmp_path):
    folder = _sae(tmp_path)
    op = {"op": "mean_ablate", "site": "sae.s.features", "positions": [-1], "from": "ref"}
    spec = _spec(folder, {"ref": {"prompt": [CLEAN, CORRUPT]}, "a": _out([op])})
    got = specsight.run(spec, model=tiny()).saves["out"][0]
    mean = sum(reference_encode(folder, _residual(tiny(), p)[-1]) for p in (CLEAN, CORRUPT)) / 2
    _close(got, _logits(tiny(), CORRUPT, _written_back(folder, lambda _f: mean)))


def test_the_gradient_at_features_is_the_decoder_times_the_residuals(tmp_path):
    """d metric / d features = W_dec @ d metric / d resid: the features feed the model only
    through their decoding (written back as a change of zero)."""
    folder = _sae(tmp_path)
    grads = [
        {"op": "save", "site": site, "positions": [-1], "grad": True, "name": name}
        for site, name in (("sae.s.features", "f"), (f"resid_post.{LAYER}", "x"))
    ]
    spec = _spec(folder, {"a": {"prompt": CORRUPT, "ops": grads}})
    spec["metrics"] = {"ld": {"kind": "logit_diff", "invoke": "a", "target": " Mary", "foil": " John"}}  # fmt: skip
    spec["backward"] = {"metric": "ld"}
    got = specsight.run(spec, model=tiny()).saves
    assert got["x"].abs().max() > 0
    _close(got["f"][0], _w_dec(folder) @ got["x"][0], rel=1e-4)


def test_a_run_records_its_saes_and_reruns_with_them(tmp_path):
    """The manifest names each SAE's id, shape and weights' sha256 (not its folder), and
    `specsight rerun --sae` runs an id-named SAE's spec again to the same results."""
    import hashlib

    from click.testing import CliRunner

    from specsight.cli import main

    folder = _sae(tmp_path / "res1")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(_by_id()))
    ran = CliRunner().invoke(main, ["run", str(path), "--sae", f"my-sae={folder}", "--out", str(tmp_path / "run"), "-q"])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    recorded = json.loads((tmp_path / "run" / "manifest.json").read_text())["saes"]["s"]
    weights = (folder / "sae_weights.safetensors").read_bytes()
    assert recorded["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert (recorded["id"], recorded["d_sae"]) == ("my-sae", D_SAE)
    assert str(folder) not in json.dumps(recorded)
    again = CliRunner().invoke(main, ["rerun", str(tmp_path / "run"), "--sae", f"my-sae={folder}"])  # fmt: skip
    assert again.exit_code == 0 and "rerun matches" in again.output, again.output


def test_check_of_a_folder_leaves_sae_and_run_folders_alone(tmp_path):
    """`specsight check specs/` reads the specs, not an SAE's cfg.json or a run's manifest."""
    from click.testing import CliRunner

    from specsight.cli import main

    _sae(tmp_path / "data" / "saes" / "res1")
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    (run / "results.safetensors").write_bytes(b"")
    spec = {"specsight": 1, "model": "tiny-llama", "invokes": {"a": {"prompt": CLEAN}}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = CliRunner().invoke(main, ["check", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "1 ok" in result.output and "cfg.json" not in result.output


def test_a_feature_clamped_while_generating_equals_a_hook_on_generate(tmp_path):
    """A clamp on every step (the prompt's positions, then each new token) gives, token for
    token, what model.generate gives with a hook that clamps the feature at every position it
    is called on."""
    folder = _sae(tmp_path)
    clamp = {"op": "clamp", "site": "sae.s.features", "positions": "all", "dims": [5], "value": 3.0}
    spec = _spec(folder, {"a": {"prompt": CORRUPT, "ops": [clamp], "generate": {"max_new_tokens": 6}}})  # fmt: skip
    got = specsight.run(spec, model=tiny()).saves["a/generated_ids"][0].tolist()
    lm = tiny()
    w_dec = _w_dec(folder)

    def hook(_m, _a, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        features = reference_encode(folder, hidden[0])
        hidden[0] += (3.0 - features[:, 5:6]) * w_dec[5]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = lm.model.model.layers[LAYER].register_forward_hook(hook)
    ids = torch.tensor([lm.tokenizer.encode(CORRUPT)])
    with torch.inference_mode():
        want = lm.model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
        handle.remove()
        unsteered = lm.model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    assert got == want.tolist() != unsteered.tolist()
