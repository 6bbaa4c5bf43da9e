"""schemas/spec.v1.json is generated from the pydantic models and must stay in sync with them;
every example spec validates against it, and jsonschema agrees with pydantic on a few cases."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from specsight.spec import json_schema
from tests.conftest import ROOT, SPECS

SCHEMA_FILE = ROOT / "schemas" / "spec.v1.json"


def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))


def test_schema_file_is_in_sync_with_the_models():
    expected = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    assert SCHEMA_FILE.read_text() == expected, (
        "stale schema: run `make schema` (specsight schema --write schemas/spec.v1.json)"
    )


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_FILE.read_text()))


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_validates_against_the_schema(path):
    errors = list(_validator().iter_errors(yaml.safe_load(path.read_text())))
    assert not errors, [e.message for e in errors]


BASE = {"specsight": 1, "model": "tiny-llama", "invokes": {"a": {"prompt": "hi"}}}


@pytest.mark.parametrize(
    "patch, valid",
    [
        ({}, True),
        ({"model": {"id": "tiny-gpt2", "dtype": "bfloat16"}}, True),
        (
            {
                "invokes": {
                    "a": {"prompt": ["x", "y"], "ops": [{"op": "zero", "site": "resid_post.1"}]}
                }
            },
            True,
        ),
        (
            {
                "invokes": {
                    "a": {
                        "prompt": "x",
                        "ops": [{"op": "scale", "site": "embed", "factor": "{f}"}],
                        "sweep": {"f": [1, 2]},
                    }
                }
            },
            True,
        ),
        ({"$schema": "../schemas/spec.v1.json"}, True),  # editors read it; specsight ignores it
        ({"$schemas": "x"}, False),
        ({"extra_key": 1}, False),
        ({"specsight": 2}, False),
        ({"model": {"id": "x", "dtype": "float33"}}, False),
        ({"invokes": {"a": {"prompt": "x", "ops": [{"op": "pach", "site": "embed"}]}}}, False),
        (
            {
                "invokes": {
                    "a": {"prompt": "x", "ops": [{"op": "zero", "site": "embed", "postions": 1}]}
                }
            },
            False,
        ),
        ({"invokes": {"bad name": {"prompt": "x"}}}, False),
        ({"invokes": {}}, False),
        ({"metrics": {"m": {"kind": "top_k", "invoke": "a", "k": 0}}}, False),
    ],
)
def test_jsonschema_and_pydantic_agree(patch, valid):
    from specsight.errors import SpecError
    from specsight.spec import from_data, validate_spec

    data = {**BASE, **patch}
    schema_ok = not list(_validator().iter_errors(data))
    try:
        validate_spec(from_data(data))
        pydantic_ok = True
    except SpecError:
        pydantic_ok = False
    assert schema_ok == pydantic_ok == valid


def test_every_shipped_example_names_the_schema_for_editors(tmp_path):
    """Each example spec's first line points the YAML language server at the schema, by a
    path that resolves beside it in the repository and in a `specsight examples` copy."""
    from click.testing import CliRunner

    from specsight.cli import main

    modeline = "# yaml-language-server: $schema=../schemas/spec.v1.json\n"
    assert CliRunner().invoke(main, ["examples", str(tmp_path / "ex")]).exit_code == 0
    for folder in (SPECS, tmp_path / "ex" / "specs"):
        specs = sorted(folder.glob("*.yaml"))
        assert len(specs) >= 10
        for spec in specs:
            assert spec.read_text(encoding="utf-8").startswith(modeline), spec.name
            assert (spec.parent / "../schemas/spec.v1.json").resolve().is_file(), spec
