"""``specsight schema --model ID``: the spec's schema whose ``site`` fields complete one model's
site names, checked against the model itself (every offered name resolves, the canonical ones
are exactly those ``specsight sites`` lists) and against the generic schema (it refuses what the
generic one refuses, and a site string no site of the model could be: a typo is flagged in the
editor, every form the model resolves is not). Also what the generic schema says about sites
and that it lists every op and metric kind."""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from specsight.cli import main
from specsight.models.load import TINY_MODELS, load_model_info
from specsight.sites import (
    CANONICAL,
    SiteError,
    canonical_names,
    model_schema,
    resolve_site,
    site_groups,
    site_names,
)
from specsight.sites.schema import DEF_NAME
from specsight.spec import METRIC_KINDS, OP_NAMES, json_schema
from tests.conftest import SPECS

RAW = {"tiny-llama": "model.layers.2.mlp", "tiny-gpt2": "transformer.h.2.mlp"}


@functools.cache
def _info(model_id: str):
    return load_model_info(model_id)[0]


@functools.cache
def _schema(model_id: str) -> str:
    return json.dumps(model_schema(json_schema(), _info(model_id)))


def _validator(model_id: str | None) -> jsonschema.Draft202012Validator:
    schema = json_schema() if model_id is None else json.loads(_schema(model_id))
    return jsonschema.Draft202012Validator(schema)


def _offered(schema: dict, node: dict) -> set[str]:
    """The values an editor offers for ``node``: its enums, through $ref and anyOf/oneOf."""
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/$defs/")
        node = {**schema["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}
    found = set(node.get("enum", ()))
    for key in ("anyOf", "oneOf", "allOf"):
        for option in node.get(key, ()):
            found |= _offered(schema, option)
    return found


RAW_RANGE = {"tiny-llama": "model.layers.1:3.mlp", "tiny-gpt2": "transformer.h.1:3.mlp"}
RAW_INPUT = {
    "tiny-llama": "model.layers.{layer}.mlp.down_proj.input",
    "tiny-gpt2": "transformer.h.{layer}.mlp.c_proj.input",
}


def _spec(site: str, *, op: str = "zero", sweep: dict | None = None) -> dict:
    invoke: dict = {"prompt": "hi there", "ops": [{"op": op, "site": site}]}
    if sweep:
        invoke["sweep"] = sweep
    return {"specsight": 1, "model": "tiny-llama", "invokes": {"a": invoke}}


def _with_layer(name: str) -> str:
    return name.replace("{layer}", "1")


# --------------------------------------------------------------------------- generic schema


def test_the_schema_lists_every_op_and_metric_kind():
    schema = json_schema()
    metrics = schema["properties"]["metrics"]["patternProperties"]
    (entry,) = metrics.values()
    kinds = {
        schema["$defs"][ref["$ref"].removeprefix("#/$defs/")]["properties"]["kind"]["const"]
        for ref in entry["oneOf"]
    }
    assert kinds == set(METRIC_KINDS) >= {"recovery", "attribution", "logit_lens"}
    assert set(entry["discriminator"]["mapping"]) == set(METRIC_KINDS)
    ops = schema["$defs"]["Invoke"]["properties"]["ops"]["items"]
    assert set(ops["discriminator"]["mapping"]) == set(OP_NAMES)
    assert all(kind in schema["properties"]["metrics"]["description"] for kind in METRIC_KINDS)


def _site_fields(schema: dict) -> dict[str, dict]:
    return {
        name: d["properties"]["site"]
        for name, d in schema["$defs"].items()
        if "site" in d.get("properties", {})
    }


def test_every_site_field_describes_the_grammar_with_examples():
    fields = _site_fields(json_schema())
    assert {"SaveOp", "PatchOp", "SkipOp", "LogitLensMetric", "AttributionMetric"} <= set(fields)
    for name, field in fields.items():
        text = field["description"]
        for form in ("resid_post.5", "resid_post.*", "NAME.{layer}", "mlp_out.0:4", ".input"):
            assert form in text, (name, form)
        assert all(canonical in text for canonical in CANONICAL), name
        assert field["examples"], name


def _builtin_cached() -> bool:
    from specsight.models.load import list_models

    return any(m["name"] == "smollm2-135m" and m.get("cached") for m in list_models())


def test_the_site_examples_resolve_on_a_llama():
    if not _builtin_cached():
        pytest.skip("the built-in model is not converted here")
    info = _info("smollm2-135m")
    for field in _site_fields(json_schema()).values():
        for example in field["examples"]:
            assert resolve_site(_with_layer(example), info)


def test_a_missing_site_keeps_a_short_hint():
    from specsight.errors import SpecError
    from specsight.spec import from_data, validate_spec

    data = _spec("embed")
    del data["invokes"]["a"]["ops"][0]["site"]
    with pytest.raises(SpecError) as caught:
        validate_spec(from_data(data))
    assert "add 'site:', where the op acts" in caught.value.render()
    assert "NAME.START:STOP" not in caught.value.render()


# --------------------------------------------------------------------------- per model


@pytest.mark.parametrize("model_id", ["tiny-llama", "tiny-gpt2"])
def test_the_model_schema_is_valid_and_validates_every_example_spec(model_id):
    jsonschema.Draft202012Validator.check_schema(json.loads(_schema(model_id)))
    validator = _validator(model_id)
    for path in sorted(SPECS.glob("*.yaml")):
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text())))
        assert not errors, (path.name, [e.message for e in errors])


@pytest.mark.parametrize("model_id", ["tiny-llama", "tiny-gpt2"])
def test_every_site_field_offers_the_models_names(model_id):
    schema = json.loads(_schema(model_id))
    fields = _site_fields(schema)
    expected = {"resid_post.3", "resid_post.*", "mlp_out.{layer}", "embed", RAW[model_id]}
    expected |= {RAW[model_id] + ".input"}
    for name, field in fields.items():
        offered = _offered(schema, field)
        assert expected <= offered, (name, expected - offered)
        assert "examples" not in field  # the generic examples may not be this model's
    other = "transformer.h.2.mlp" if model_id == "tiny-llama" else "model.layers.2.mlp"
    assert other not in _offered(schema, fields["ZeroOp"])
    assert _offered(schema, fields["ZeroOp"]) == set(site_names(_info(model_id)))


@pytest.mark.parametrize("model_id", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize(
    "site",
    [
        "resid_post.3",
        "resid_post.0:2",  # a range: not offered, still valid
        "resid_post.-1",
        "resid_post.::2",
        "resid_post.{l}",  # another sweep variable
        "raw range",  # a module path with an index range
        "raw input",  # a module's input, at a sweep's layer
        "sae.res6.features",  # an SAE's part (the spec names the SAE)
    ],
)
def test_sites_outside_the_list_raise_no_false_error(model_id, site):
    site = {"raw range": RAW_RANGE[model_id], "raw input": RAW_INPUT[model_id]}.get(site, site)
    sweep = {"l": [0, 1]} if "{l}" in site else {"layer": [0]} if "{layer}" in site else None
    spec = _spec(site, sweep=sweep)
    assert not list(_validator(model_id).iter_errors(spec))
    if not site.startswith("sae."):  # an SAE's parts resolve once the spec declares it
        assert resolve_site(site.replace("{l}", "1").replace("{layer}", "1"), _info(model_id))


@pytest.mark.parametrize("model_id", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize(
    "site", ["resid_pots.3", "not_a_site_here", "mlp_out.x", "resid_post", "model.layer.2.mlp"]
)
def test_a_site_no_model_site_matches_is_flagged_in_the_editor(model_id, site):
    """A typo is an error in the editor, as it is for specsight validate."""
    errors = list(_validator(model_id).iter_errors(_spec(site)))
    assert errors
    with pytest.raises(SiteError):
        resolve_site(site, _info(model_id))


@pytest.mark.parametrize("model_id", ["tiny-llama", "tiny-gpt2"])
def test_another_models_module_paths_are_flagged(model_id):
    other = "tiny-gpt2" if model_id == "tiny-llama" else "tiny-llama"
    assert list(_validator(model_id).iter_errors(_spec(RAW[other])))


@pytest.mark.parametrize("model_id", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize(
    "spec",
    [
        _spec(""),  # an op's site is never empty
        _spec("resid_post.3", op="pach"),
        {**_spec("resid_post.3"), "metrics": {"m": {"kind": "logit_lens", "invoke": "a", "k": 0}}},
    ],
)
def test_the_model_schema_refuses_what_the_generic_one_refuses(model_id, spec):
    assert list(_validator(None).iter_errors(spec))
    assert list(_validator(model_id).iter_errors(spec))


def test_the_model_schema_is_a_new_schema_with_its_own_id():
    generic = json_schema()
    before = json.dumps(generic, sort_keys=True)
    specialised = model_schema(generic, _info("tiny-llama"))
    assert json.dumps(generic, sort_keys=True) == before  # the input is left alone
    assert specialised["$id"] != generic["$id"]
    assert "tiny-llama" in specialised["$id"] and "tiny-llama" in specialised["$comment"]
    assert DEF_NAME in specialised["$defs"] and DEF_NAME not in generic["$defs"]


# --------------------------------------------------------------------------- against the model


@pytest.mark.parametrize("model_id", ["tiny-llama", "tiny-gpt2"])
def test_canonical_names_are_exactly_what_specsight_sites_lists(model_id):
    info = _info(model_id)
    listed = canonical_names(info)  # what `specsight sites` shows: resid_post.L, embed, ...
    groups = [g for g in site_groups(info) if g.label in listed]
    assert [g.label for g in groups] == listed
    for group in groups:
        base = group.label.removesuffix(".L")
        if group.label.endswith(".L"):
            layers = [f"{base}.{layer}" for layer in range(info.n_layers)]
            assert group.names == (f"{base}.{{layer}}", f"{base}.*", *layers)
        else:
            assert group.names == (base,)
    result = CliRunner().invoke(main, ["sites", model_id])
    assert result.exit_code == 0
    shown = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert set(listed) <= shown


def _assert_every_name_resolves_as_offered(info) -> None:
    """Each offered name resolves: a canonical one to its site at one layer (every layer for
    ``.*``), a module path to that module (every layer's for ``*``), input or output."""
    canonical = set(canonical_names(info))
    for group in site_groups(info):
        parts = group.label.split(".")
        pattern = re.compile(r"\.".join(r"\d+" if p == "L" else re.escape(p) for p in parts))
        matching = [m for m in info.module_names if pattern.fullmatch(m)]
        for name in group.names:
            sites = resolve_site(_with_layer(name), info)
            if group.label in canonical:
                assert {s.canonical for s in sites} == {group.label.removesuffix(".L")}, name
                assert len(sites) == (info.n_layers if name.endswith(".*") else 1), name
                continue
            io = "input" if name.endswith(".input") else "output"
            assert {s.io for s in sites} == {io}, name
            modules = [s.module for s in sites]
            if ".L" not in group.label:  # the modules outside the layers
                assert modules == [name.removesuffix(".input")], name
            elif "*" in name:
                assert modules == matching, name
            else:
                assert len(modules) == 1 and modules[0] in matching, name


@pytest.mark.parametrize("model_id", sorted(TINY_MODELS))
def test_every_offered_name_resolves(model_id):
    _assert_every_name_resolves_as_offered(_info(model_id))


def test_modules_named_output_get_names_that_mean_them():
    info = _info("tiny-llama")
    extra = tuple((f"model.layers.{i}.mlp.output", "Linear") for i in range(info.n_layers))
    info = dataclasses.replace(info, modules=info.modules + extra)
    names = site_names(info)
    assert "model.layers.*.mlp.output.output" in names  # 'model.layers.*.mlp.output': mlp's
    assert "model.layers.*.mlp.output" not in names
    assert "model.layers.1.mlp.output" in names and "model.layers.1.mlp.output.input" in names
    _assert_every_name_resolves_as_offered(info)


def test_the_model_schema_of_the_builtin_model_is_a_reasonable_size():
    if not _builtin_cached():
        pytest.skip("the built-in model is not converted here")
    text = json.dumps(model_schema(json_schema(), _info("smollm2-135m")), indent=2)
    names = site_names(_info("smollm2-135m"))
    assert {"resid_post.29", "head_z.{layer}", "model.layers.29.mlp.down_proj.input"} <= set(names)
    assert len(text) < 400_000


# --------------------------------------------------------------------------- command line


def test_schema_model_write_and_check(tmp_path):
    runner = CliRunner()
    target = tmp_path / "tiny-llama.schema.json"
    result = runner.invoke(main, ["schema", "--model", "tiny-llama", "--write", str(target)])
    assert result.exit_code == 0, result.output
    assert json.loads(target.read_text()) == json.loads(_schema("tiny-llama"))
    result = runner.invoke(main, ["schema", "--model", "tiny-llama", "--check", str(target)])
    assert result.exit_code == 0 and "up to date" in result.stdout
    result = runner.invoke(main, ["schema", "--model", "tiny-gpt2", "--check", str(target)])
    assert result.exit_code == 1
    assert f"specsight schema --model tiny-gpt2 --write {target}" in result.stderr
    printed = runner.invoke(main, ["schema", "--model", "tiny-gpt2"])
    assert printed.exit_code == 0
    assert "transformer.h.3.mlp" in printed.stdout


@pytest.mark.parametrize(
    "model_id, says",
    [("nope", "not built in"), ("tiny-lama", "did you mean 'tiny-llama'")],
)
def test_schema_model_that_does_not_exist_is_a_usage_error(model_id, says):
    result = CliRunner().invoke(main, ["schema", "--model", model_id])
    assert result.exit_code == 2
    assert "--model" in result.stderr and says in result.stderr
    assert "Traceback" not in result.output


def test_the_model_schema_completes_the_sites_of_named_saes():
    result = CliRunner().invoke(main, ["schema", "--model", "tiny-llama", "--sae", "res6"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    offered = [set(g["enum"]) for g in schema["$defs"][DEF_NAME]["anyOf"]]
    assert {"sae.res6.features", "sae.res6.recon", "sae.res6.error"} in offered
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "saes": {"res6": {"path": "saes/res6", "site": "resid_post.1"}},
        "invokes": {"a": {"prompt": "hi", "ops": [{"op": "zero", "site": "sae.res6.features"}]}},
    }
    jsonschema.validate(spec, schema)
    alone = CliRunner().invoke(main, ["schema", "--sae", "res6"])
    assert alone.exit_code == 2 and "--model" in alone.output
