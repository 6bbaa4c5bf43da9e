"""Specs as tests: expectations, `specsight check` / `diff` / `rerun`, determinism, and honest
reports when the model or dtype changed."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import specsight
from specsight.cli import main
from specsight.errors import SpecError
from tests.conftest import CLEAN, ioi_spec, tiny


def base_spec(expect: list[dict], **extra) -> dict:
    return ioi_spec(
        name="tiny-expect",
        sweep={"layer": "all", "pos": [0, 9, 13]},
        metrics={
            "top": {"kind": "top_k", "invoke": "clean", "k": 5},
            "probs": {"kind": "prob", "invoke": "clean", "tokens": [" Mary", " John"]},
        },
        expect=expect,
        **extra,
    )


@pytest.fixture(scope="module")
def truth():
    """The tiny model's actual values, to write expectations that hold and ones that do not."""
    results = specsight.run(base_spec([]), model=tiny("tiny-llama"))
    return results


def write(tmp_path: Path, spec: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_expectations_that_hold_and_fail_are_reported_with_location(tmp_path, truth):
    clean = float(truth["clean_ld"])
    top1 = truth.manifest["tensors"]["top"]["decoded"][0][0][0]
    ld = truth["ld"]
    expect = [
        {"metric": "clean_ld", "approx": clean, "atol": 1e-4},
        {"metric": "clean_ld", "greater_than": clean + 1, "message": "deliberately wrong"},
        {"metric": "top", "argmax": top1},
        {"metric": "top", "top_k": top1},
        {
            "metric": "ld",
            "where": {"layer": "0:4", "pos": 13},
            "less_than": float(ld[:, 2].max()) + 1,
        },
        {
            "metric": "ld",
            "where": {"pos": [0, 9]},
            "over": "any",
            "greater_than": float(ld[:, :2].max()) - 1e-3,
        },
        {"metric": "ld", "where": {"pos": 0}, "greater_than": float(ld[:, 0].max()) + 10},
    ]
    path = write(tmp_path, base_spec(expect))
    results = specsight.run(path, model=tiny("tiny-llama"))
    oks = [o.ok for o in results.expectations]
    assert oks == [True, False, True, True, True, True, False]
    failed = results.expectations[1]
    assert failed.location.startswith(f"{path}:") and failed.location.endswith("expect[1]")
    assert "deliberately wrong" in failed.format()
    assert f"{clean:.4g}" in failed.detail
    cells = results.expectations[6]
    assert "4 of 4 cell(s) fail" in cells.detail and "layer=0, pos=0" in cells.detail
    assert not results.ok
    saved = json.loads((results.save(tmp_path / "run") / "manifest.json").read_text())
    assert [e["ok"] for e in saved["expectations"]] == oks


def test_argmax_among_a_metrics_tokens(truth):
    winner = " Mary" if float(truth["probs"][0]) > float(truth["probs"][1]) else " John"
    loser = " John" if winner == " Mary" else " Mary"
    results = specsight.run(
        base_spec([{"metric": "probs", "argmax": winner}, {"metric": "probs", "argmax": loser}]),
        model=tiny("tiny-llama"),
    )
    assert [o.ok for o in results.expectations] == [True, False]


@pytest.mark.parametrize(
    "expect, message",
    [
        ({"metric": "lld", "greater_than": 0}, "no metric named 'lld' (did you mean 'ld'?)"),
        (
            {"metric": "ld", "where": {"layr": 1}, "greater_than": 0},
            "no axis 'layr' (did you mean 'layer'?)",
        ),
        ({"metric": "ld", "where": {"layer": 9}, "greater_than": 0}, "layer 9 is not on this axis"),
        (
            {"metric": "ld", "where": {"pos": 5}, "greater_than": 0},
            "pos 5 is not on this axis (pos takes 0, 9, 13)",
        ),
        ({"metric": "ld", "argmax": " Mary"}, "'argmax' does not apply to logit_diff"),
        ({"metric": "probs", "argmax": " Paris"}, "' Paris' is not one of the metric's tokens"),
        ({"metric": "ld"}, "give a check"),
        ({"metric": "ld", "saved": "x", "less_than": 1}, "exactly one of 'metric' or 'saved'"),
    ],
)
def test_bad_expectations_are_located_spec_errors(tmp_path, expect, message):
    path = write(tmp_path, base_spec([expect]))
    with pytest.raises(SpecError) as exc:
        specsight.run(path, model=tiny("tiny-llama"))
    text = exc.value.render()
    assert message in text and f"{path}:" in text and "expect[0]" in text


def test_check_command_exit_codes_summary_and_junit(tmp_path, truth):
    clean = float(truth["clean_ld"])
    good = write(
        tmp_path, base_spec([{"metric": "clean_ld", "approx": clean, "atol": 1e-4}]), "good.yaml"
    )
    bad = write(tmp_path, base_spec([{"metric": "clean_ld", "less_than": clean - 1}]), "bad.yaml")
    runner = CliRunner()
    ok = runner.invoke(main, ["check", str(good)])
    assert ok.exit_code == 0, ok.output
    assert "1/1" in ok.output
    junit = tmp_path / "junit.xml"
    failed = runner.invoke(main, ["check", str(good), str(bad), "--junit", str(junit)])
    assert failed.exit_code == 1
    assert "FAIL" in failed.output and "bad.yaml" in failed.output
    suites = ET.parse(junit).getroot()
    assert [s.get("failures") for s in suites] == ["0", "1"]
    invalid = write(
        tmp_path,
        {**base_spec([]), "invokes": {"x": {"prompt": CLEAN, "ops": [{"op": "pach"}]}}},
        "invalid.yaml",
    )
    folder = runner.invoke(main, ["check", str(tmp_path)])
    assert folder.exit_code == 2 and "invalid" in folder.output
    data = json.loads(runner.invoke(main, ["check", str(good), "--json"]).output)
    assert data[0]["status"] == "ok" and data[0]["expectations"][0]["ok"] is True
    assert invalid.exists()


def test_same_spec_twice_is_bit_identical_and_rerun_matches(tmp_path):
    path = write(tmp_path, base_spec([], deterministic=True))
    runner = CliRunner()
    for name in ("a", "b"):
        assert runner.invoke(main, ["run", str(path), "--out", str(tmp_path / name)]).exit_code == 0
    assert (tmp_path / "a" / "results.safetensors").read_bytes() == (
        tmp_path / "b" / "results.safetensors"
    ).read_bytes()
    same = runner.invoke(main, ["diff", str(tmp_path / "a"), str(tmp_path / "b")])
    assert same.exit_code == 0 and "tensors match" in same.output
    again = runner.invoke(main, ["rerun", str(tmp_path / "a")])
    assert again.exit_code == 0, again.output
    assert "rerun matches" in again.output
    for command in (
        ["diff", str(tmp_path / "a"), str(tmp_path / "b")],
        ["rerun", str(tmp_path / "a")],
    ):
        data = json.loads(runner.invoke(main, [*command, "--json"]).output)
        assert data["ok"] is True and data["blocking"] == []
        assert {t["status"] for t in data["tensors"]} == {"equal"}


def test_drift_fails_with_largest_differences(tmp_path):
    runner = CliRunner()
    spec = base_spec([])
    reference = write(tmp_path, spec, "ref.yaml")
    assert (
        runner.invoke(main, ["run", str(reference), "--out", str(tmp_path / "ref")]).exit_code == 0
    )
    drifted = dict(spec)
    drifted["invokes"] = dict(
        spec["invokes"],
        clean={"prompt": CLEAN, "ops": [{"op": "scale", "site": "mlp_out.0", "factor": 1.5}]},
    )
    drift = write(tmp_path, drifted, "drift.yaml")
    result = runner.invoke(main, ["check", str(drift), "--against", str(tmp_path / "ref")])
    assert result.exit_code == 1
    assert "different" in result.output and "max |a-b|" in result.output
    assert "note: spec.sha256 differs" in result.output


def test_other_weights_or_dtype_are_reported_before_numbers(tmp_path):
    runner = CliRunner()
    for name, model in (
        ("seed0", "tiny-llama"),
        ("seed1", {"id": "tiny-llama", "seed": 1}),
        ("bf16", {"id": "tiny-llama", "dtype": "bfloat16"}),
    ):
        spec = base_spec([])
        spec["model"] = model
        assert (
            runner.invoke(
                main,
                ["run", str(write(tmp_path, spec, f"{name}.yaml")), "--out", str(tmp_path / name)],
            ).exit_code
            == 0
        )
    weights = runner.invoke(main, ["diff", str(tmp_path / "seed0"), str(tmp_path / "seed1")])
    assert weights.exit_code == 1
    as_json = runner.invoke(
        main, ["diff", str(tmp_path / "seed0"), str(tmp_path / "seed1"), "--json"]
    )
    data = json.loads(as_json.output)
    assert as_json.exit_code == 1 and data["ok"] is False and data["blocking"]
    assert (
        "INCOMPARABLE model.weights_sha256" in weights.output
        and "numbers not compared" in weights.output
    )
    dtype = runner.invoke(main, ["diff", str(tmp_path / "seed0"), str(tmp_path / "bf16")])
    assert "INCOMPARABLE model.dtype" in dtype.output
    not_a_run = runner.invoke(main, ["diff", str(tmp_path), str(tmp_path / "seed0")])
    assert not_a_run.exit_code == 2 and "is not a run folder" in not_a_run.output


def test_run_prints_expectations_and_exits_1_when_one_fails(tmp_path, truth):
    clean = float(truth["clean_ld"])
    runner = CliRunner()
    good = write(
        tmp_path, base_spec([{"metric": "clean_ld", "approx": clean, "atol": 1e-4}]), "good.yaml"
    )
    bad = write(tmp_path, base_spec([{"metric": "clean_ld", "less_than": clean - 1}]), "bad.yaml")
    ok = runner.invoke(main, ["run", str(good)])
    assert ok.exit_code == 0 and "expectations" in ok.output and "ok   " in ok.output
    failed = runner.invoke(main, ["run", str(bad)])
    assert failed.exit_code == 1 and "FAIL" in failed.output
    as_json = runner.invoke(main, ["run", str(bad), "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["expectations"][0]["ok"] is False
