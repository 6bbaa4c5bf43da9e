"""Every user mistake ends in a located SpecError (exit 2) or a RunError naming the op (exit 1),
never in "internal error"; what can be known before running is found by ``validate`` and
``plan``. One test per finding of the hardening review, plus the cases that must simply work
(checked against plain torch where they compute something)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import specsight
from specsight.api import validate
from specsight.cli import main
from specsight.errors import RunError, SpecError
from tests.conftest import CLEAN, CORRUPT, ioi_spec, tiny


def _spec(invokes: dict, metrics: dict | None = None, **top) -> dict:
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": invokes,
        "metrics": metrics or {},
        **top,
    }


def _issue(spec: dict) -> tuple[str, tuple]:
    with pytest.raises(SpecError) as err:
        specsight.run(spec, model=tiny("tiny-llama"))
    assert len(err.value.issues) == 1, err.value.render()
    issue = err.value.issues[0]
    return issue.code, issue.path


LD = {"kind": "logit_diff", "invoke": "a", "target": " Mary", "foil": " John"}


# --------------------------------------------------------------------------- huge integers


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("s.json", '{"specsight": 1, "model": "tiny-llama", "seed": ' + "9" * 5000 + "}"),
        ("s.yaml", "specsight: 1\nmodel: tiny-llama\nseed: 0x" + "f" * 5000 + "\n"),
        ("t.yaml", "specsight: 1\nmodel: tiny-llama\nseed: " + "9" * 5000 + "\n"),
    ],
)
def test_an_integer_of_thousands_of_digits_is_a_located_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        specsight.load_spec(path)
    (issue,) = err.value.issues
    assert (issue.code, issue.path, issue.line) == (
        "bad-value",
        ("seed",),
        1 if "json" in name else 3,
    )
    assert "too large" in issue.message and "64 bits" in issue.hint


def test_an_integer_of_thousands_of_digits_in_a_dict():
    with pytest.raises(SpecError, match="an integer of 16610 bits is too large"):
        specsight.load_spec({"specsight": 1, "model": "tiny-llama", "seed": 10**5000})


@pytest.mark.parametrize("value", ["1e999", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    path = tmp_path / "s.yaml"
    op = f"{{op: scale, site: mlp_out.1, factor: {value}}}"
    path.write_text(
        f"specsight: 1\nmodel: tiny-llama\ninvokes:\n  a:\n    prompt: x\n    ops: [{op}]\n"
    )
    with pytest.raises(SpecError) as err:
        specsight.load_spec(path)
    (issue,) = err.value.issues
    assert issue.path == ("invokes", "a", "ops", 0, "factor") and "finite number" in issue.message


# --------------------------------------------------------------------------- found before running


def test_recovery_over_a_metric_of_an_unknown_invoke():
    metrics = {
        "x": {**LD, "invoke": "nope"},
        "y": LD,
        "r": {"kind": "recovery", "patched": "x", "clean": "y", "corrupt": "y"},
    }
    spec = _spec({"a": {"prompt": CLEAN}}, metrics)
    assert _issue(spec) == ("unknown-invoke", ("metrics", "x", "invoke"))
    with pytest.raises(SpecError, match="no invoke named 'nope'"):  # without the model too
        validate({**spec, "model": "some-lab/not-here"})


def test_generation_past_the_models_context():
    spec = _spec({"a": {"prompt": CLEAN, "generate": {"max_new_tokens": 200}}})
    assert _issue(spec) == ("generate-too-long", ("invokes", "a", "generate", "max_new_tokens"))


def test_a_wildcard_save_read_as_one_saved_value():
    invokes = {
        "reference": {"prompt": CLEAN, "ops": [{"op": "save", "site": "mlp_out.*"}]},
        "a": {
            "prompt": CLEAN,
            "ops": [
                {
                    "op": "set",
                    "site": "mlp_out.1",
                    "value": {"saved": "reference/mlp_out.*", "reduce": "mean"},
                }
            ],
        },
    }
    code, path = _issue(_spec(invokes))
    assert (code, path) == ("saved-sites", ("invokes", "a", "ops", 0, "value", "saved"))


def test_a_site_typo_in_a_sweep_is_one_issue_not_one_per_cell():
    ops = [{"op": "zero", "site": "resid_pots.{layer}"}]
    spec = _spec({"a": {"prompt": CLEAN, "sweep": {"layer": "all"}, "ops": ops}})
    with pytest.raises(SpecError) as err:
        specsight.run(spec, model=tiny("tiny-llama"))
    (issue,) = err.value.issues
    assert issue.message.endswith("(in 4 of the 4 sweep cells)")
    assert issue.hint == "did you mean 'resid_post.0'?"


def test_an_op_invalid_once_a_cells_values_are_in_it():
    """Not 'after substituting {...}: 4 validation errors for ZeroOp', once per cell."""
    ops = [{"op": "zero", "site": "head_z.1", "heads": "{h}"}]
    spec = _spec({"a": {"prompt": CLEAN, "sweep": {"h": [0.5, 1.5]}, "ops": ops}})
    with pytest.raises(SpecError) as err:
        specsight.run(spec, model=tiny("tiny-llama"))
    (issue,) = err.value.issues
    assert issue.path == ("invokes", "a", "ops", 0, "heads")
    assert issue.message.startswith("with h=0.5: expected 'all', an integer")
    assert "validation error" not in issue.message
    assert issue.message.endswith("(in 2 of the 2 sweep cells)")


def test_validate_without_the_model_checks_every_reference(tmp_path):
    spec = ioi_spec(
        "some-lab/not-here",
        sweep={"layer": "all", "pos": [0, 9], "unused": [1]},
        metrics={"bad": {**LD, "invoke": "corupt"}},
        expect=[
            {"metric": "ld", "where": {"layr": 3}, "greater_than": 0},
            {"metric": "ld", "where": {"pos": 5}, "greater_than": 0},
            {"metric": "missing", "greater_than": 0},
        ],
    )
    spec["invokes"]["corrupt"]["ops"][0]["from"] = "clena"
    spec["invokes"]["corrupt"]["ops"][0]["positions"] = ["{poss}"]
    with pytest.raises(SpecError) as err:
        validate(spec)
    found = {(i.code, i.path) for i in err.value.issues}
    assert found == {
        ("unused-sweep", ("invokes", "corrupt", "sweep", "unused")),
        ("unknown-variable", ("invokes", "corrupt", "ops", 0, "positions")),
        ("unknown-invoke", ("invokes", "corrupt", "ops", 0, "from")),
        ("unknown-invoke", ("metrics", "bad", "invoke")),
        ("unknown-axis", ("expect", 0, "where", "layr")),
        ("bad-cell", ("expect", 1, "where", "pos")),
        ("unknown-metric", ("expect", 2, "metric")),
    }
    spec = ioi_spec("some-lab/not-here")
    assert "not checked" in validate(spec)  # what it could not check, it says
    assert validate(ioi_spec("tiny-llama")) is None  # compiled against the model's shapes


# --------------------------------------------------------------------------- works, or names the op


def test_a_swept_invoke_that_nothing_reads_runs():
    ops = [{"op": "zero", "site": "mlp_out.{layer}"}]
    results = specsight.run(
        _spec({"a": {"prompt": CLEAN, "sweep": {"layer": "all"}, "ops": ops}}),
        model=tiny("tiny-llama"),
    )
    assert results.tensors == {}


def test_an_op_that_fails_at_run_time_is_that_ops_run_error():
    """zero on the rotary embedding: its output has a batch of one, not of two rows."""
    ops = [{"op": "zero", "site": "model.rotary_emb"}]
    with pytest.raises(RunError) as err:
        specsight.run(
            _spec({"a": {"prompt": [CLEAN, "Hello there"], "ops": ops}}), model=tiny("tiny-llama")
        )
    assert err.value.message.startswith("invokes.a.ops[0]: zero at 'model.rotary_emb' failed")
    assert "vector width" not in err.value.hint


def _grad_reference(site_hook, module_name: str) -> torch.Tensor:
    """The gradient of the logit difference at layer 2's output with a plain pre-hook doing
    the intervention, by plain autograd (the model's own embedding output as the leaf)."""
    lm = tiny("tiny-llama")
    model, tok = lm.model, lm.tokenizer
    ids = torch.tensor([tok.encode(CLEAN)])
    kept = {}

    def keep(_module, _args, output):
        kept["h"] = output

    handles = [model.get_submodule(module_name).register_forward_pre_hook(site_hook)]
    handles.append(model.model.layers[2].register_forward_hook(keep))
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds).logits[0, -1]
            hidden = kept["h"]
            hidden.retain_grad()
            mary, john = tok.encode_plain(" Mary")[0], tok.encode_plain(" John")[0]
            (logits[mary] - logits[john]).backward()
    finally:
        for handle in handles:
            handle.remove()
    return hidden.grad[0]


def test_backward_through_a_head_op_under_sdpa_attention():
    """The head_z input is a view of the attention output autograd keeps: changed on a copy."""
    assert tiny("tiny-llama").info.attn_implementation == "sdpa"
    ops = [
        {"op": "zero", "site": "head_z.1", "heads": [0]},
        {"op": "save", "site": "resid_post.2", "grad": True, "name": "g"},
    ]
    spec = _spec({"a": {"prompt": CLEAN, "ops": ops}}, {"ld": LD}, backward={"metric": "ld"})
    results = specsight.run(spec, model=tiny("tiny-llama"))

    def zero_head0(_module, args):
        x = args[0].clone()
        x[..., :16] = 0  # head 0 of 4, d_head 16
        return (x,)

    expected = _grad_reference(zero_head0, "model.layers.1.self_attn.o_proj")
    torch.testing.assert_close(results["g"], expected, rtol=1e-5, atol=1e-6)


def test_backward_with_a_zeroed_embedding_position():
    """resid_pre.0 is the embedding output, the leaf of the backward pass: it gets a copy."""
    ops = [
        {"op": "zero", "site": "resid_pre.0", "positions": [0]},
        {"op": "save", "site": "resid_post.2", "grad": True, "name": "g"},
    ]
    spec = _spec({"a": {"prompt": CLEAN, "ops": ops}}, {"ld": LD}, backward={"metric": "ld"})
    results = specsight.run(spec, model=tiny("tiny-llama"))

    def zero_first(_module, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        x[:, 0] = 0
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    lm = tiny("tiny-llama")
    handle = lm.model.model.layers[0].register_forward_pre_hook(zero_first, with_kwargs=True)
    try:
        expected = _grad_reference(lambda _m, _a: None, "model.layers.0")
    finally:
        handle.remove()
    torch.testing.assert_close(results["g"], expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the CLI guards


def _write(tmp_path: Path, spec: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_diff_of_a_broken_manifest_is_an_error_not_a_traceback(tmp_path):
    runner = CliRunner()
    spec = _write(tmp_path, ioi_spec(sweep={"layer": "all", "pos": [9]}))
    for out in ("a", "b"):
        assert runner.invoke(main, ["run", str(spec), "--out", str(tmp_path / out)]).exit_code == 0
    (tmp_path / "b" / "manifest.json").write_text("{not json")
    result = runner.invoke(main, ["diff", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot read the run in")
    assert "Traceback" not in result.output


def test_a_crash_inside_check_is_an_internal_error_not_a_failing_claim(tmp_path, monkeypatch):
    spec = _write(tmp_path, ioi_spec(sweep={"layer": "all", "pos": [9]}))

    def crash(*_args, **_kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("specsight.api.run", crash)
    result = CliRunner().invoke(main, ["check", str(spec), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"] == "InternalError"


def test_rerun_of_a_folder_without_a_run_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["rerun", str(tmp_path)])
    assert result.exit_code != 0
    assert "Traceback" not in result.output


def test_a_patch_between_prompts_of_different_lengths():
    spec = ioi_spec(sweep={"layer": "all", "pos": [9]})
    spec["invokes"]["corrupt"]["prompt"] = CORRUPT + " her"
    results = specsight.run(spec, model=tiny("tiny-llama"))  # position 9 exists in both
    assert results["ld"].shape == (4, 1)


def test_validation_of_sixty_thousand_unknown_keys_is_linear_not_quadratic():
    # about 0.7 s on 2 cores; a quadratic pass over 60,000 keys would take minutes, so the
    # bound is loose enough for a loaded CI machine
    import time

    spec = _spec({"a": {"prompt": CLEAN, **{f"unknown_{i}": i for i in range(60_000)}}})
    started = time.perf_counter()
    with pytest.raises(SpecError) as err:
        specsight.load_spec(spec)
    assert time.perf_counter() - started < 10.0
    assert len(err.value.issues) == 51 and err.value.issues[-1].code == "more-issues"
    assert "59950 more problems" in err.value.issues[-1].message


# --------------------------------------------------------------------------- saved widths


@pytest.mark.parametrize(
    ("save", "target"),
    [
        ({"site": "mlp_act.1"}, {"site": "resid_post.1"}),  # 128 into 64
        ({"site": "head_z.1", "heads": [0]}, {"site": "resid_post.1"}),  # 16 into 64
        ({"site": "resid_post.0"}, {"site": "head_z.2", "heads": [1, 2]}),  # 64 into 32
        ({"site": "resid_post.0", "dims": "0:8"}, {"site": "mlp_act.2"}),  # 8 into 128
    ],
)
def test_a_saved_value_of_the_wrong_width_is_found_by_validate(tmp_path, save, target):
    """``validate`` (and so the server's admission, which compiles the same way) compares a
    saved value's width with the columns the op writes; before, it failed only at run time."""
    spec = _spec(
        {
            "src": {"prompt": CLEAN, "ops": [{"op": "save", "name": "v", **save}]},
            "dst": {"prompt": CLEAN, "ops": [{"op": "add", "vector": {"saved": "v"}, **target}]},
        }
    )
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SpecError) as err:
        validate(path)
    (issue,) = err.value.issues
    assert issue.code == "vector-size" and issue.line is not None
    assert issue.path == ("invokes", "dst", "ops", 0, "vector", "saved")
    assert "saved value 'v'" in issue.message and "has width" in issue.message


def test_a_saved_value_of_the_right_width_is_added_as_hooks_would():
    """The check lets through what fits: head 0's 16 columns at layer 1, averaged over
    positions, added to head 3's columns at layer 2, as a hand-written pair of hooks does."""
    lm = tiny("tiny-llama")
    spec = _spec(
        {
            "src": {"prompt": CLEAN, "ops": [{"op": "save", "site": "head_z.1", "heads": [0], "name": "v"}]},
            "dst": {
                "prompt": CLEAN,
                "ops": [
                    {"op": "add", "site": "head_z.2", "heads": [3], "vector": {"saved": "v", "reduce": "mean"}},
                    {"op": "save", "site": "logits", "name": "out"},
                ],
            },
        },
    )  # fmt: skip
    got = specsight.run(spec, model=lm).saves["out"][-1]
    layers = lm.model.model.layers
    ids = torch.tensor([lm.tokenizer.encode(CLEAN)])
    kept: dict[str, torch.Tensor] = {}

    def keep(_m, args):
        kept["v"] = args[0][0, :, 0:16].mean(0)

    def add(_m, args):
        z = args[0].clone()
        z[..., 48:64] += kept["v"]
        return (z,)

    with torch.inference_mode():
        handle = layers[1].self_attn.o_proj.register_forward_pre_hook(keep)
        lm.model(ids)
        handle.remove()
        handle = layers[2].self_attn.o_proj.register_forward_pre_hook(add)
        expected = lm.model(ids).logits[0, -1]
        handle.remove()
    torch.testing.assert_close(got.reshape(-1), expected, rtol=1e-5, atol=1e-5)


def test_one_layer_of_a_wildcard_save_is_read_by_its_name():
    """``{saved: src/resid_post.2}`` reads the layer-2 value a ``resid_post.*`` save keeps (it
    was refused as unknown unless written with a placeholder); a layer no save keeps is still
    an unknown saved value."""
    lm = tiny("tiny-llama")

    def spec(name: str) -> dict:
        return _spec(
            {
                "src": {"prompt": CLEAN, "ops": [{"op": "save", "site": "resid_post.*", "positions": [-1]}]},
                "dst": {"prompt": CLEAN, "ops": [
                    {"op": "set", "site": "resid_post.2", "positions": [-1], "value": {"saved": name}},
                    {"op": "save", "site": "resid_post.2", "positions": [-1], "name": "out"},
                ]},
            }
        )  # fmt: skip

    results = specsight.run(spec("src/resid_post.2"), model=lm)
    torch.testing.assert_close(results.saves["out"], results.saves["src/resid_post.2"])
    assert _issue(spec("src/mlp_out.2"))[0] == "unknown-saved"
