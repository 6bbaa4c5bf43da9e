"""The Python API: the public names, torch-free imports, run() inputs, result files and the
manifest, determinism, plans and their JSON form."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import specsight
from specsight.models.load import load_model_info
from specsight.plan import Plan
from specsight.results import MANIFEST_FILE, RESULTS_FILE, Results, tensor_sha256
from tests.conftest import CLEAN, CORRUPT

ROOT = Path(__file__).resolve().parent.parent


SPEC = {
    "specsight": 1,
    "name": "tiny-api",
    "model": {"id": "tiny-llama", "seed": 3},
    "invokes": {
        "clean": {
            "prompt": CLEAN,
            "ops": [{"op": "save", "site": "resid_post.2", "name": "clean_rp2"}],
        },
        "corrupt": {
            "prompt": [CORRUPT, "The Eiffel Tower is in"],
            "sweep": {"layer": "all"},
            "ops": [
                {"op": "zero", "site": "mlp_out.{layer}", "positions": "last"},
                {"op": "save", "site": "logits", "positions": "last"},
            ],
        },
    },
    "metrics": {
        "ld": {"kind": "logit_diff", "invoke": "corrupt", "target": " Mary", "foil": " John"},
        "p": {"kind": "prob", "invoke": "clean", "token": " Mary"},
        "top": {"kind": "top_k", "invoke": "clean", "k": 4},
    },
}

PUBLIC = {
    "load_spec",
    "compile_plan",
    "run",
    "Results",
    "Spec",
    "Plan",
    "ModelInfo",
    "Issue",
    "SpecsightError",
    "SpecError",
    "RunError",
    "ModelLoadError",
    "__version__",
}


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text("# a tiny spec\n" + yaml.safe_dump(SPEC, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny3():
    from specsight.models.load import load_model

    return load_model("tiny-llama", seed=3, device="cpu")


# --------------------------------------------------------------------------- public names


def test_all_is_the_public_api_and_every_name_resolves():
    assert len(specsight.__all__) == len(set(specsight.__all__))
    assert set(specsight.__all__) == PUBLIC
    for name in specsight.__all__:
        assert getattr(specsight, name) is not None, name
    assert specsight.Results is Results
    assert issubclass(specsight.SpecError, specsight.SpecsightError)
    assert issubclass(specsight.RunError, specsight.SpecsightError)
    assert issubclass(specsight.ModelLoadError, specsight.RunError)
    assert isinstance(specsight.__version__, str)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        specsight.nope  # noqa: B018


def test_star_import_gives_exactly_all():
    namespace: dict = {}
    exec("from specsight import *", namespace)
    assert set(namespace) - {"__builtins__"} == PUBLIC


def test_imports_and_validation_stay_torch_free(tmp_path):
    """Importing the package, the compiler, loading a spec, and validating one whose model is
    not here (``specsight validate``) must not import torch: checked step by step in a fresh
    interpreter. (With the model's files here, validate compiles against its shapes.)"""
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(yaml.safe_dump({**SPEC, "model": "some-lab/not-on-this-machine"}))
    script = textwrap.dedent(
        f"""
        import sys

        def check(step):
            heavy = sorted(m for m in ("torch", "transformers", "safetensors.torch")
                           if m in sys.modules)
            print(step, "imports", heavy or "nothing heavy")
            assert not heavy, step

        import specsight
        check("import specsight")
        import specsight.compile
        check("import specsight.compile")
        spec = specsight.load_spec({str(spec)!r})
        assert spec.name == "tiny-api"
        check("load_spec")
        from click.testing import CliRunner
        from specsight.cli import main
        result = CliRunner().invoke(main, ["validate", {str(elsewhere)!r}])
        assert result.exit_code == 0, result.output
        assert "not compiled" in result.output, result.output
        check("specsight validate")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("nothing heavy") == 4, proc.stdout


# --------------------------------------------------------------------------- run()


def test_run_dict_path_and_spec_give_identical_tensors(spec_file, tiny3):
    from_dict = specsight.run(SPEC, model=tiny3)
    from_path = specsight.run(spec_file, model=tiny3)
    from_str = specsight.run(str(spec_file), model=tiny3)
    from_spec = specsight.run(specsight.load_spec(SPEC), model=tiny3)
    names = set(from_dict.tensors)
    assert names == {"ld", "p", "top", "top/ids", "clean_rp2", "corrupt/logits"}
    for other in (from_path, from_str, from_spec):
        assert set(other.tensors) == names
        for name in names:
            assert torch.equal(from_dict[name], other[name]), name
    assert from_dict["ld"].shape == (4, 2)  # [layer, prompt]
    assert from_dict.next_tokens["clean"] == from_path.next_tokens["clean"]


def test_run_rejects_other_inputs():
    with pytest.raises(TypeError, match="path, a dict or a Spec"):
        specsight.run(42)  # type: ignore[arg-type]


def test_run_with_out_and_load_round_trip(spec_file, tiny3, tmp_path):
    out = tmp_path / "out"
    results = specsight.run(spec_file, model=tiny3, out=out)
    assert (out / RESULTS_FILE).is_file() and (out / MANIFEST_FILE).is_file()
    loaded = Results.load(out)

    assert set(loaded.metrics) == {"ld", "p", "top", "top/ids"}
    assert set(loaded.saves) == {"clean_rp2", "corrupt/logits"}
    assert set(results.metrics) == set(loaded.metrics)
    assert set(results.saves) == set(loaded.saves)
    for name, tensor in results.tensors.items():
        assert torch.equal(loaded[name], tensor), name
        assert loaded[name].dtype == tensor.dtype
    assert loaded.manifest == json.loads(json.dumps(results.manifest))
    assert loaded.next_tokens == results.next_tokens
    assert (
        loaded.prompts
        == results.prompts
        == {"clean": [CLEAN], "corrupt": [CORRUPT, "The Eiffel Tower is in"]}
    )
    assert loaded.axes("ld") == ["layer", "prompt"]
    assert loaded.axes("corrupt/logits") == ["layer", "prompt", "pos", "hidden"]
    assert loaded["corrupt/logits"].shape == (4, 2, 1, tiny3.info.vocab_size)
    assert loaded.summary() == results.summary()

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    spec = manifest["spec"]
    assert spec["sha256"] == hashlib.sha256(spec_file.read_bytes()).hexdigest()
    assert spec["name"] == "tiny-api"
    assert spec["file"] == str(spec_file)
    assert spec["content"]["invokes"]["clean"]["prompt"] == CLEAN
    model = manifest["model"]
    assert model["id"] == "tiny-llama"
    assert model["weights_sha256"] == tiny3.weights_sha256
    assert len(model["weights_sha256"]) == 64
    assert model["dtype"] == "float32"
    assert model["device"] == "cpu"
    assert model["seed"] == 3
    versions = manifest["versions"]
    assert versions["specsight"] == specsight.__version__
    assert versions["torch"] == torch.__version__
    import transformers

    assert versions["transformers"] == transformers.__version__
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    timings = manifest["timings"]
    for key in ("load_model_s", "compile_s", "execute_s", "total_s"):
        assert timings[key] >= 0, key
    assert timings["total_s"] >= timings["compile_s"]
    assert manifest["plan"]["rows"] == 1 + 4 * 2
    assert set(manifest["tensors"]) == set(results.tensors)
    for name, tensor in loaded.tensors.items():
        meta = manifest["tensors"][name]
        assert meta["sha256"] == tensor_sha256(tensor), name
        assert meta["shape"] == list(tensor.shape), name
        assert meta["kind"] == ("save" if name in loaded.saves else "metric")
    assert manifest["summary"]["prompts"]["clean"] == [CLEAN]


def test_manifest_hash_of_a_dict_spec_is_stable():
    a = specsight.load_spec(SPEC)
    b = specsight.load_spec(json.loads(json.dumps(SPEC)))
    info, tok = load_model_info("tiny-llama", seed=3)
    assert specsight.compile_plan(a, info, tok).spec_sha256 == (
        specsight.compile_plan(b, info, tok).spec_sha256
    )


def test_results_file_is_bit_identical_across_runs(spec_file, tmp_path):
    """Two independent runs (each loading the seeded model) write the same bytes on CPU."""
    first, second = tmp_path / "a", tmp_path / "b"
    r1 = specsight.run(spec_file, out=first, device="cpu")
    r2 = specsight.run(spec_file, out=second, device="cpu")
    assert (first / RESULTS_FILE).read_bytes() == (second / RESULTS_FILE).read_bytes()
    assert r1.manifest["tensors"] == r2.manifest["tensors"]
    assert r1.manifest["model"]["weights_sha256"] == r2.manifest["model"]["weights_sha256"]


def test_missing_result_name_raises_key_error_with_hint(tiny3):
    results = specsight.run(SPEC, model=tiny3)
    with pytest.raises(KeyError, match="did you mean 'ld'"):
        results["ldd"]
    with pytest.raises(KeyError, match="names: .*clean_rp2"):
        results["something-else-entirely"]
    assert "ld" in results and "clean_rp2" in results and "ldd" not in results


# --------------------------------------------------------------------------- plans


def test_compile_plan_json_round_trip_and_explain():
    spec = specsight.load_spec(SPEC)
    info, tokenizer = load_model_info("tiny-llama", seed=3)
    plan = specsight.compile_plan(spec, info, tokenizer, max_batch=3)
    assert isinstance(plan, specsight.Plan)
    assert len(plan.rows) == 9
    assert {f.stage for f in plan.forwards} == {0}  # nothing reads another invoke
    assert sorted(r for f in plan.forwards for r in f.rows) == list(range(9))
    assert all(len(f.rows) <= 3 for f in plan.forwards)  # every position runs: a logits save
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    assert Plan.from_dict(json.loads(text)) == plan

    explained = plan.explain()
    assert "forwards:" in explained
    assert "hooks:" in explained
    assert "memory estimate:" in explained
    assert "tiny-api" in explained

    bad = json.loads(text)
    bad["version"] = 999
    with pytest.raises(ValueError, match="version"):
        Plan.from_dict(bad)


def test_compile_plan_reports_spec_errors_with_positions(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "specsight: 1\nmodel: tiny-llama\ninvokes:\n  a:\n    prompt: hi\n"
        "    ops:\n      - {op: zero, site: resid_post.9}\n"
    )
    spec = specsight.load_spec(path)
    info, tokenizer = load_model_info("tiny-llama")
    with pytest.raises(specsight.SpecError) as caught:
        specsight.compile_plan(spec, info, tokenizer)
    (issue,) = caught.value.issues
    assert issue.file == str(path)
    assert issue.line == 7
    assert issue.path == ("invokes", "a", "ops", 0, "site")


def test_a_spec_carries_its_document():
    """The document a spec was loaded from travels with the spec object (its copies too); a
    spec built in Python has none, and a new object never inherits another's."""
    from specsight.spec import Spec
    from specsight.spec.validate import doc_of

    kept = specsight.load_spec(SPEC)
    for _ in range(300):
        spec = specsight.load_spec(SPEC)
        assert doc_of(spec) is not None and doc_of(spec) is not doc_of(kept)
        del spec
        assert doc_of(Spec.model_validate(SPEC)) is None
    assert doc_of(kept) is kept.document is not None
    assert kept.model_copy().document is kept.document


def test_steering_with_coefficient_zero_is_the_unsteered_run(tiny3):
    """An ``add`` of a saved vector with coeff 0 (and '-{coeff}' = -0) changes nothing."""
    prompts = ["I think you are", "This movie was"]
    spec = {
        "specsight": 1,
        "model": {"id": "tiny-llama", "seed": 3},
        "invokes": {
            "love": {
                "prompt": ["I love you", "We love it"],
                "ops": [
                    {"op": "save", "site": "resid_post.1", "name": "love", "positions": "last"}
                ],
            },
            "base": {"prompt": prompts},
            "steered": {
                "prompt": prompts,
                "sweep": {"coeff": [0, 4]},
                "ops": [
                    {
                        "op": "add",
                        "site": "resid_post.1",
                        "vector": {"saved": "love", "reduce": "mean"},
                        "coeff": "{coeff}",
                    },
                    {
                        "op": "add",
                        "site": "resid_post.1",
                        "vector": {"saved": "love", "reduce": "mean"},
                        "coeff": "-{coeff}",
                    },
                    {
                        "op": "add",
                        "site": "resid_post.2",
                        "vector": {"saved": "love", "reduce": "mean"},
                        "coeff": "{coeff}",
                    },
                ],
            },
        },
        "metrics": {
            "base": {"kind": "logit_diff", "invoke": "base", "target": " Mary", "foil": " John"},
            "steered": {
                "kind": "logit_diff",
                "invoke": "steered",
                "target": " Mary",
                "foil": " John",
            },
        },
    }
    results = specsight.run(spec, model=tiny3)
    assert results["steered"].shape == (2, 2)
    torch.testing.assert_close(results["steered"][0], results["base"], rtol=0, atol=1e-5)
    assert not torch.allclose(results["steered"][1], results["base"])


def test_results_repr_is_one_short_line():
    results = specsight.run(SPEC)
    text = repr(results)
    assert text.startswith("<Results of 'tiny-api' on tiny-llama: ld [4, 2],") and "\n" not in text
    assert len(text) < 200 and "more" in text
