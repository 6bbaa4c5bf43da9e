"""Starting without the repository: ``specsight examples`` copies the specs the package ships,
``specsight init`` writes a starter spec that validates and runs, and the wheel carries the
examples, the schema, ``py.typed`` and the license."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml
from click.testing import CliRunner

import specsight
from specsight.cli import main
from tests.conftest import tiny

ROOT = Path(__file__).resolve().parent.parent


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_examples_copies_every_shipped_spec_with_its_data_and_the_schema(tmp_path):
    code, out = _invoke("examples", str(tmp_path / "ex"))
    assert code == 0, out
    copied = tmp_path / "ex"
    specs = sorted(p.name for p in (copied / "specs").glob("*.yaml"))
    assert specs == sorted(p.name for p in (ROOT / "specs").glob("*.yaml"))
    assert (copied / "specs" / "data" / "ioi.jsonl").read_bytes() == (
        ROOT / "specs" / "data" / "ioi.jsonl"
    ).read_bytes()
    assert json.loads((copied / "schemas" / "spec.v1.json").read_text()) == json.loads(
        (ROOT / "schemas" / "spec.v1.json").read_text()
    )
    # the specs' modelines point at the copied schema, and their data files resolve
    first = (copied / "specs" / "ioi_dataset.yaml").read_text().splitlines()[0]
    if "$schema=" in first:
        assert (copied / "specs" / first.split("$schema=")[1].strip()).is_file()
    assert _invoke("validate", str(copied / "specs" / "ioi_dataset.yaml"))[0] == 0  # data found
    code, out = _invoke("examples", str(copied))
    assert code == 2 and "already exists" in out and "--force" in out
    assert _invoke("examples", str(copied), "--force")[0] == 0


def test_init_writes_a_starter_spec_that_validates_and_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = _invoke("init", "first-try", "--model", "tiny-gpt2", "--json")
    assert code == 0, out
    written = json.loads(out)
    spec_file, schema_file = Path(written["spec"]), Path(written["schema"])
    text = spec_file.read_text()
    assert text.startswith("# yaml-language-server: $schema=schemas/spec.v1.json\n")
    assert schema_file == Path("schemas/spec.v1.json") and schema_file.is_file()
    jsonschema.validate(yaml.safe_load(text), json.loads(schema_file.read_text()))
    assert _invoke("validate", str(spec_file))[0] == 0
    lm = tiny("tiny-gpt2")
    results = specsight.run(spec_file, model=lm)
    # patching the last layer's output at the last position restores the clean logits there
    last = results["recovery"][-1]
    torch.testing.assert_close(last, torch.tensor(1.0), rtol=1e-4, atol=1e-4)
    code, out = _invoke("init", "first-try")
    assert code == 2 and "already exists" in out
    code, out = _invoke("init", "123", "--model", "tiny-gpt2")  # a name YAML would read as a number
    assert code == 0 and _invoke("validate", "123.yaml")[0] == 0
    code, out = _invoke("init", "two words")
    assert code == 2 and "not a usable spec name" in out


def test_the_wheel_ships_examples_schema_typing_and_license(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{done.stderr[-2000:]}")
    (wheel,) = tmp_path.glob("specsight-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "specsight/py.typed" in names
    assert "specsight/examples/schemas/spec.v1.json" in names
    for path in (ROOT / "specs").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            relative = path.relative_to(ROOT / "specs").as_posix()
            assert f"specsight/examples/specs/{relative}" in names, relative
    assert any(n.endswith("licenses/LICENSE") for n in names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(metadata).decode())
    assert meta["License-Expression"] == "MIT"
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert any(url.startswith("Source") for url in meta.get_all("Project-URL"))


@pytest.mark.parametrize(
    "args",
    [["examples", "{file}"], ["examples", "{file}/sub"], ["init", "{file}/sub"]],
)
def test_a_folder_through_a_file_is_a_usage_error(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("x")
    result = CliRunner().invoke(main, [a.format(file="taken") for a in args])
    assert result.exit_code == 2, result.output
    assert "taken is a file, not a folder" in result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
