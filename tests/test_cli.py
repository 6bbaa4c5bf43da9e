"""The ``specsight`` command line on tiny models: output, files, JSON mode and exit codes.

Exit codes: 0 ok, 1 run failure, 2 bad spec or usage. Errors never show a traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from specsight.cli import main
from specsight.plan import Plan
from tests.conftest import CLEAN, ioi_spec

ROOT = Path(__file__).resolve().parent.parent

TINY_SPEC = ioi_spec(
    name="tiny-cli",
    sweep={"layer": "all", "pos": [0, 9, 13]},
    ops=[{"op": "save", "site": "resid_post.1", "name": "rp1"}],
    clean_ld=False,
    metrics={
        "p_mary": {"kind": "prob", "invoke": "clean", "token": " Mary"},
        "top": {"kind": "top_k", "invoke": "clean", "k": 3},
    },
)

#: an unknown op on line 7 (a spec mistake: exit 2)
BAD_SPEC = """\
specsight: 1
model: tiny-llama
invokes:
  a:
    prompt: "hello there"
    ops:
      - {op: zeroo, site: resid_post.1}
"""

#: a valid spec whose raw-module add vector has the wrong width (found only at run time)
WRONG_WIDTH_SPEC = """\
specsight: 1
model: tiny-llama
invokes:
  a:
    prompt: "hello there"
    ops:
      - {op: add, site: model.layers.1.mlp.up_proj, vector: [1.0, 2.0, 3.0]}
"""

BAD_LAYER_SPEC = """\
specsight: 1
model: tiny-llama
invokes:
  a:
    prompt: hi
    ops:
      - {op: zero, site: resid_post.9}
"""

MISSING_MODEL_SPEC = """\
specsight: 1
model: ./no-such-folder
invokes:
  a: {prompt: "hello"}
"""


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def tiny_spec(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_SPEC, sort_keys=False))
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_no_traceback(result) -> None:
    assert "Traceback" not in result.stdout
    assert "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


# --------------------------------------------------------------------------- run


def test_run_prints_readable_summary(runner, tiny_spec):
    result = runner.invoke(main, ["run", str(tiny_spec)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("tiny-cli on tiny-llama (float32, cpu): 13 row(s) in 2 forward(s)")
    # next tokens per invoke, with the prompt
    assert "next tokens" in out
    assert f"clean {CLEAN!r}" in out
    assert "->" in out
    # metric values: a scalar, a top-k list and the sweep's table with its axes
    assert "metrics" in out
    assert "p_mary (prob of ' Mary') = " in out
    assert "\n  top  '" in out
    assert "ld [layer x pos]" in out
    assert "strongest cells of ld (largest values; set 'baseline' to rank by effect):" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("layer"))
    assert lines[header - 1].split() == ["0", "9", "13"]  # positions, then their tokens
    assert lines[header].split() == ["layer", "When", "Mary", "to"]
    table_rows = [line.split() for line in lines[header + 1 : header + 5]]
    assert [row[0] for row in table_rows] == ["0", "1", "2", "3"]
    assert all(len(row) == 4 for row in table_rows)
    assert "saved rp1 [4, 3, 14, 64]" in out
    assert result.stderr == "results not saved: add --out FOLDER to keep them\n"


def test_run_out_writes_results_and_manifest(runner, tiny_spec, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(main, ["run", str(tiny_spec), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "results.safetensors").is_file()
    assert (out / "manifest.json").is_file()
    assert f"wrote {out / 'results.safetensors'}, {out / 'manifest.json'} and the page " in (
        result.stdout
    )
    assert (out / "report.html").is_file()
    assert "not saved" not in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "specsight-manifest-1"
    assert set(manifest["tensors"]) == {"ld", "p_mary", "top", "top/ids", "rp1"}
    assert manifest["tensors"]["ld"]["shape"] == [4, 3]


def test_run_json_prints_only_json(runner, tiny_spec, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(main, ["run", str(tiny_spec), "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    payload = _strict_loads(result.stdout)  # nothing but one JSON document on stdout
    assert payload["ok"] is True
    assert set(payload["metrics"]) == {"ld", "p_mary", "top", "top/ids"}
    assert len(payload["metrics"]["ld"]) == 4 and len(payload["metrics"]["ld"][0]) == 3
    assert isinstance(payload["metrics"]["p_mary"], float)
    assert payload["saves"] == {"rp1": [4, 3, 14, 64]}
    assert payload["manifest"]["model"]["id"] == "tiny-llama"
    assert payload["manifest"]["spec"]["name"] == "tiny-cli"
    assert len(payload["next_tokens"]["clean"]) == 1
    assert payload["out"] == str(out)
    assert (out / "results.safetensors").is_file()


def _strict_loads(text: str):
    def reject(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=reject)


def test_run_json_is_strict_even_with_nan_results(runner, tmp_path):
    """A blown-up run (scaled past float32) gives NaN values: --json writes them as null."""
    spec = write(
        tmp_path,
        "nan.yaml",
        "specsight: 1\nmodel: tiny-llama\ninvokes:\n  a:\n    prompt: hello there\n    ops:\n"
        "      - {op: scale, site: resid_post.0, factor: 1.0e+38}\n"
        "      - {op: scale, site: resid_post.1, factor: 1.0e+38}\n"
        "metrics:\n  p: {kind: prob, invoke: a, token: ' Mary'}\n",
    )
    result = runner.invoke(main, ["run", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    payload = _strict_loads(result.stdout)
    assert payload["metrics"]["p"] is None
    assert payload["next_tokens"]["a"][0][0][1] is None
    result = runner.invoke(main, ["run", str(spec)])
    assert result.exit_code == 0
    assert "p (prob of ' Mary') = nan" in result.stdout


def test_progress_bar_goes_to_stderr():
    from specsight.cli.run import progress_callback as _progress_callback

    callback, progress = _progress_callback(True)
    assert callback is not None
    assert progress.console.file is sys.stderr
    assert _progress_callback(False) == (None, None)


def test_run_bad_spec_exits_2_with_located_error(runner, tmp_path):
    bad = write(tmp_path, "bad.yaml", BAD_SPEC)
    result = runner.invoke(main, ["run", str(bad)])
    assert result.exit_code == 2
    assert_no_traceback(result)
    assert result.stdout == ""
    assert f"{bad}:7:14 invokes.a.ops[0].op: unknown op 'zeroo'" in result.stderr
    assert "did you mean 'zero'?" in result.stderr


@pytest.mark.parametrize("command", ["run", "plan"])
def test_model_dependent_spec_error_exits_2(runner, tmp_path, command):
    """A mistake found only when compiling against the model (layer 9 of 4) is still exit 2."""
    spec = write(tmp_path, "s.yaml", BAD_LAYER_SPEC)
    result = runner.invoke(main, [command, str(spec)])
    assert result.exit_code == 2
    assert_no_traceback(result)
    assert result.stdout == ""
    assert f"{spec}:7:26 invokes.a.ops[0].site: layer 9 is out of range" in result.stderr
    # the tiny model's shapes are here, so validate finds it too, at the same place
    checked = runner.invoke(main, ["validate", str(spec)])
    assert checked.exit_code == 2
    assert f"{spec}:7:26 invokes.a.ops[0].site: layer 9 is out of range" in checked.stderr


def test_run_bad_spec_json(runner, tmp_path):
    bad = write(tmp_path, "bad.yaml", BAD_SPEC)
    result = runner.invoke(main, ["run", str(bad), "--json"])
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["ok"] is False
    assert payload["error"] == "SpecError"
    (issue,) = payload["issues"]
    assert issue["code"] == "unknown-op"
    assert (issue["line"], issue["col"], issue["path"]) == (7, 14, "invokes.a.ops[0].op")


def test_run_missing_spec_file_exits_2(runner, tmp_path):
    result = runner.invoke(main, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert_no_traceback(result)
    assert "nope.yaml" in result.stderr


def test_a_model_that_does_not_exist_is_a_located_spec_error(runner, tmp_path):
    spec = write(tmp_path, "s.yaml", MISSING_MODEL_SPEC)
    result = runner.invoke(main, ["run", str(spec)])
    assert result.exit_code == 2
    assert_no_traceback(result)
    assert result.stderr.startswith(f"{spec}:2:8 model.id: model folder './no-such-folder'")
    result = runner.invoke(main, ["plan", str(spec), "--json"])
    assert result.exit_code == 2
    (issue,) = json.loads(result.stdout)["issues"]
    assert (issue["code"], issue["line"], issue["path"]) == ("unknown-model", 2, "model.id")


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        (
            WRONG_WIDTH_SPEC,
            "RunError",
            "the add vector has 3 values but site 'model.layers.1.mlp.up_proj' has width 128",
        ),
    ],
    ids=["wrong-width"],
)
def test_run_failure_exits_1(runner, tmp_path, text, error, message):
    spec = write(tmp_path, "s.yaml", text)
    result = runner.invoke(main, ["run", str(spec)])
    assert result.exit_code == 1
    assert_no_traceback(result)
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "internal error" not in result.stderr

    result = runner.invoke(main, ["run", str(spec), "--json"])
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["ok"] is False
    assert payload["error"] == error
    assert message in payload["message"]


@pytest.mark.parametrize(
    "args",
    [["run"], ["run", "x.yaml", "--bogus"], ["plan"], ["validate"], ["nosuchcommand"]],
    ids=["run-missing-arg", "unknown-option", "plan-missing-arg", "validate-no-args", "command"],
)
def test_usage_errors_exit_2(runner, args):
    result = runner.invoke(main, args)
    assert result.exit_code == 2
    assert "Usage:" in result.stderr
    assert "Traceback" not in result.output


def test_run_max_batch_must_be_positive(runner, tiny_spec):
    result = runner.invoke(main, ["run", str(tiny_spec), "--max-batch", "0"])
    assert result.exit_code == 2


# --------------------------------------------------------------------------- plan


def test_plan_prints_forwards_rows_hooks_memory(runner, tiny_spec):
    result = runner.invoke(main, ["plan", str(tiny_spec)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("plan for tiny-cli on tiny-llama")
    assert "sweep layer[4] x pos[3] = 12 cells, 12 row(s)" in out
    assert "forwards: 2" in out
    assert "hooks: 4" in out
    assert "memory estimate:" in out
    assert "ld: logit_diff(' Mary' - ' John') on corrupt" in out


def test_plan_max_batch_changes_forwards(runner, tiny_spec):
    result = runner.invoke(main, ["plan", str(tiny_spec), "--max-batch", "5"])
    assert result.exit_code == 0, result.output
    assert "forwards: 4" in result.stdout  # 1 clean + 12 sweep rows in chunks of 5


def test_plan_json_round_trips(runner, tiny_spec):
    result = runner.invoke(main, ["plan", str(tiny_spec), "--json"])
    assert result.exit_code == 0, result.output
    plan = Plan.from_json(result.stdout)
    assert plan.to_json() == result.stdout.strip()
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.spec_name == "tiny-cli"
    assert len(plan.rows) == 13
    assert len(plan.forwards) == 2


def test_plan_bad_spec_exits_2(runner, tmp_path):
    bad = write(tmp_path, "bad.yaml", BAD_SPEC)
    result = runner.invoke(main, ["plan", str(bad)])
    assert result.exit_code == 2
    assert_no_traceback(result)
    assert f"{bad}:7:14" in result.stderr
    result = runner.invoke(main, ["plan", str(bad), "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["ok"] is False


def test_plan_missing_model_exits_2(runner, tmp_path):
    spec = write(tmp_path, "s.yaml", MISSING_MODEL_SPEC)
    result = runner.invoke(main, ["plan", str(spec)])
    assert result.exit_code == 2
    assert_no_traceback(result)
    assert "model.id: model folder './no-such-folder' does not exist" in result.stderr


# --------------------------------------------------------------------------- validate


def test_validate_several_files_one_bad(runner, tiny_spec, tmp_path):
    bad = write(tmp_path, "bad.yaml", BAD_SPEC)
    good2 = write(tmp_path, "good2.yaml", MISSING_MODEL_SPEC)  # valid: the model is not here
    result = runner.invoke(main, ["validate", str(tiny_spec), str(bad), str(good2)])
    assert result.exit_code == 2
    assert_no_traceback(result)
    assert result.stdout.splitlines() == [
        f"ok: {tiny_spec}",
        f"ok: {good2} (not compiled: model './no-such-folder' is not here: sites, layers, "
        "positions and tokens were not checked)",
    ]
    assert f"{bad}:7:14 invokes.a.ops[0].op: unknown op 'zeroo'" in result.stderr


def test_validate_all_good_exits_0(runner):
    specs = sorted((ROOT / "specs").glob("*.yaml"))
    assert specs
    result = runner.invoke(main, ["validate", *map(str, specs)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"ok: {p}" for p in specs]


def test_validate_json(runner, tiny_spec, tmp_path):
    bad = write(tmp_path, "bad.yaml", BAD_SPEC)
    result = runner.invoke(main, ["validate", "--json", str(tiny_spec), str(bad)])
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["ok"] is False
    assert payload["checked"] == 2
    assert [i["code"] for i in payload["issues"]] == ["unknown-op"]
    assert payload["issues"][0]["file"] == str(bad)

    result = runner.invoke(main, ["validate", "--json", str(tiny_spec)])
    assert result.exit_code == 0
    expected = {"ok": True, "checked": 1, "issues": [], "not_compiled": []}
    assert json.loads(result.stdout) == expected


# --------------------------------------------------------------------------- schema


def test_schema_prints_json(runner):
    result = runner.invoke(main, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["type"] == "object"
    assert "invokes" in schema["properties"]


def test_schema_write_and_check(runner, tmp_path):
    target = tmp_path / "sub" / "spec.v1.json"
    result = runner.invoke(main, ["schema", "--write", str(target)])
    assert result.exit_code == 0
    assert f"wrote {target}" in result.stdout
    assert target.read_text() == runner.invoke(main, ["schema"]).stdout

    result = runner.invoke(main, ["schema", "--check", str(target)])
    assert result.exit_code == 0
    assert "up to date" in result.stdout

    stale = json.loads(target.read_text())
    stale["title"] = "an older schema"
    target.write_text(json.dumps(stale, indent=2, sort_keys=True) + "\n")
    result = runner.invoke(main, ["schema", "--check", str(target)])
    assert result.exit_code == 1
    assert "is stale" in result.stderr
    assert f"specsight schema --write {target}" in result.stderr

    result = runner.invoke(main, ["schema", "--check", str(tmp_path / "missing.json")])
    assert result.exit_code == 1


# --------------------------------------------------------------------------- models


def test_models_lists_builtin_and_tiny(runner):
    result = runner.invoke(main, ["models"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    for name in ("smollm2-135m", "tiny-llama", "tiny-gpt2"):
        assert name in names
    assert "local model folder" in result.stdout


def test_models_json(runner):
    result = runner.invoke(main, ["models", "--json"])
    assert result.exit_code == 0
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    assert entries["smollm2-135m"]["kind"] == "builtin"
    assert entries["tiny-llama"]["kind"] == "tiny"
    assert entries["tiny-gpt2"]["kind"] == "tiny"


# --------------------------------------------------------------------------- entry point


def _console_script() -> str:
    beside = Path(sys.executable).parent / "specsight"
    found = str(beside) if beside.exists() else shutil.which("specsight")
    if not found:
        pytest.fail("the specsight console script is not installed (pip install -e .)")
    return found


def test_console_script_runs_a_tiny_spec(tiny_spec, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [_console_script(), "run", str(tiny_spec), "--json", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["ok"] is True
    assert payload["manifest"]["model"]["id"] == "tiny-llama"
    assert (out / "results.safetensors").is_file()
    assert "Traceback" not in proc.stderr


def test_console_script_bad_spec_exit_code(tmp_path):
    bad = write(tmp_path, "bad.yaml", BAD_SPEC)
    proc = subprocess.run(
        [_console_script(), "validate", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "unknown op 'zeroo'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plain_progress_lines_when_stderr_is_not_a_terminal(capsys):
    from specsight.cli.run import plain_progress

    quiet = plain_progress(interval=3600)  # a short run: nothing
    quiet(10, 100)
    assert capsys.readouterr().err == ""
    update = plain_progress(interval=0)
    update(25, 100)
    update(100, 100)  # the end: the summary follows, no line
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rows 25/100 (25%), ")


def test_quiet_prints_nothing_and_verbose_adds_plan_and_timings(runner, tiny_spec, tmp_path):
    quiet = runner.invoke(main, ["run", str(tiny_spec), "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == "" and quiet.stderr == ""
    verbose = runner.invoke(
        main, ["run", str(tiny_spec), "--verbose", "--out", str(tmp_path / "o")]
    )
    assert verbose.exit_code == 0, verbose.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    plan = manifest["plan"]
    line = next(x for x in verbose.stdout.splitlines() if x.startswith("plan: "))
    assert f"{plan['rows']} rows in {plan['forwards']} forwards" in line and "execute" in line
    both = runner.invoke(main, ["run", str(tiny_spec), "-q", "-v"])
    assert both.exit_code == 2 and "contradict" in both.output


def test_control_characters_in_a_spec_are_escaped_on_the_terminal(tmp_path):
    """A spec's name, invoke names and keys reach the terminal with their control characters
    escaped: an escape sequence in them cannot clear the screen or set the window title."""
    spec = ioi_spec(name="evil\x1b[2J\x1b]0;pwned\x07 \u202ename", clean_ld=False)
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "specsight", "run", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    shown = result.stdout + result.stderr
    assert "evil\\x1b[2J\\x1b]0;pwned\\x07 \\u202ename" in shown
    assert not any(c in shown for c in "\x1b\x07\u202e")

    bad = yaml.safe_dump({**spec, "invokes\x1b[2J": {}})
    path.write_text(bad, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "specsight", "validate", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "invokes\\x1b[2J" in result.stderr and "\x1b" not in result.stderr
