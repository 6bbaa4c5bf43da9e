"""Command-line conventions shared by every command: ``--json`` everywhere it makes sense,
``-q`` (errors and failures only) and ``-v`` (more detail) where there is something to leave out
or add, and the two together a usage error."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from specsight.cli import main
from tests.conftest import CLEAN

#: commands without --json: the server (it logs) and nothing else
NO_JSON = {"serve"}
VERBOSITY = {"run", "validate", "check", "diff", "rerun", "examples", "init"}


def _spec_file(tmp_path):
    spec = {
        "specsight": 1,
        "model": "tiny-gpt2",
        "invokes": {"a": {"prompt": CLEAN, "sweep": {"layer": "all"},
                          "ops": [{"op": "zero", "site": "mlp_out.{layer}"}]}},
        "metrics": {"p": {"kind": "prob", "invoke": "a", "token": " Mary"}},
        "expect": [{"metric": "p", "greater_than": 0.0}, {"metric": "p", "less_than": 1.0}],
    }  # fmt: skip
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_every_command_but_serve_has_json_and_the_listed_ones_quiet_and_verbose():
    for name, command in main.commands.items():
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        assert ("--json" in options) == (name not in NO_JSON), name
        if name in VERBOSITY:
            assert {"-q", "--quiet", "-v", "--verbose"} <= options, name


def test_quiet_and_verbose_say_less_and_more(tmp_path):
    spec = _spec_file(tmp_path)
    assert _cli("validate", "-q", spec) == (0, "")
    code, out = _cli("validate", "-v", spec)
    assert code == 0 and "compiled against" in out
    code, out = _cli("check", "-q", spec)
    assert (code, out) == (0, "")
    code, out = _cli("check", "-v", spec)
    assert code == 0 and out.count("expect[") == 2
    code, out = _cli("check", spec)
    assert code == 0 and "expect[" not in out and "1 ok" in out
    for run in ("a", "b"):
        assert _cli("run", "-q", spec, "--out", tmp_path / run) == (0, "")
    assert _cli("diff", "-q", tmp_path / "a", tmp_path / "b") == (0, "")
    code, out = _cli("diff", "-v", tmp_path / "a", tmp_path / "b")
    assert code == 0 and "1 of 1 tensors match" in out


@pytest.mark.parametrize("command", sorted(VERBOSITY))
def test_quiet_and_verbose_together_are_a_usage_error(command, tmp_path):
    code, out = _cli(command, "-q", "-v", *_args(command, tmp_path))
    assert code == 2 and "contradict" in out


def _args(command: str, tmp_path) -> list:
    spec = _spec_file(tmp_path)
    return {"run": [spec], "validate": [spec], "check": [spec], "diff": [tmp_path, tmp_path],
            "rerun": [tmp_path], "examples": [tmp_path / "x"], "init": ["x"]}[command]  # fmt: skip


def test_hash_key_json():
    result = CliRunner().invoke(main, ["hash-key", "--name", "lab", "--json"], input="secret\n")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["name"] == "lab" and data["line"].startswith("lab:")
