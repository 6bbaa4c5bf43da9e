"""A job's result size, computed from the spec before compiling, equals the real result's
tensor bytes for every site kind, raw module path, metric kind and generation shape."""

from __future__ import annotations

import pytest

import specsight
from specsight.compile import spec_sizes
from specsight.engine import module_widths
from specsight.models.load import load_model
from tests.conftest import CLEAN, CORRUPT, ioi_spec, tiny

PROMPTS = [CLEAN, "Hello there", "The Eiffel Tower is in"]


def _save(site: str, name: str, **fields) -> dict:
    return {"op": "save", "site": site, "name": name, **fields}


CASES = {
    "canonical, prompts of different lengths": {
        "a": {"prompt": PROMPTS, "ops": [_save("resid_post.1", "r"), _save("mlp_act.2", "m")]}
    },
    "head sites": {
        "a": {
            "prompt": PROMPTS,
            "ops": [
                _save("head_z.1", "z", heads=[0, 3], positions=[0, -1]),
                _save("k.2", "k"),
                _save("q.0", "q", heads=1),
            ],
        }
    },
    "raw paths": {
        "a": {
            "prompt": CLEAN,
            "ops": [
                _save("lm_head", "logits_out"),
                _save("model.layers.1.mlp.act_fn", "act", positions="last"),
                _save("model.layers.1.mlp.down_proj.input", "down_in"),
                _save("model.embed_tokens", "emb"),
            ],
        }
    },
    "wildcard save": {
        "a": {"prompt": PROMPTS[:2], "ops": [{"op": "save", "site": "resid_post.*"}]}
    },
    "swept saves": {
        "a": {
            "prompt": [CLEAN, CORRUPT],
            "sweep": {"layer": "all", "pos": [0, 5, 13]},
            "ops": [_save("resid_post.{layer}", "s", positions=["{pos}", -1])],
        }
    },
    "generation": {
        "g": {
            "prompt": PROMPTS,
            "generate": {"max_new_tokens": 3},
            "ops": [
                _save("resid_post.1", "every", positions="last", steps="all"),
                _save("mlp_out.2", "first", positions="all", steps="prompt"),
                _save("resid_post.0", "some", positions=-1, steps=[0, 2]),
            ],
        }
    },
}


def _metrics_spec() -> dict:
    spec = ioi_spec(sweep={"layer": "all", "pos": [9, 13]}, baseline="base", recovery="rec")
    spec["invokes"]["two"] = {
        "prompt": [CLEAN, "Mary and John"],
        "ops": [_save("resid_post.2", "g", grad=True)],
    }
    spec["metrics"].update(
        {
            "ids": {"kind": "logits", "invoke": "corrupt", "tokens": [" Mary", " John", 5]},
            "p": {"kind": "prob", "invoke": "base", "token": " Mary"},
            "top": {"kind": "top_k", "invoke": "two", "k": 7},
            "lens": {"kind": "logit_lens", "invoke": "base", "site": "resid_post.1:3", "k": 4},
            "cl": {"kind": "logit_diff", "invoke": "two", "target": " Mary", "foil": " John"},
            "dla": {"kind": "dla", "invoke": "base", "target": " Mary", "foil": " John"},
            "dla_mean": {
                "kind": "dla",
                "invoke": "two",
                "target": " Mary",
                "by": ["attn", "mlps"],
                "reduce": {"over": "prompt"},
            },
        }
    )
    spec["backward"] = {"metric": "cl"}
    return spec


def _assert_exact(spec: dict, lm) -> None:
    results = specsight.run(spec, model=lm)
    real = {name: t.numel() * t.element_size() for name, t in results.tensors.items()}
    widths = module_widths(lm.model, pad_id=lm.tokenizer.pad_id)
    sizes = spec_sizes(specsight.load_spec(spec), lm.info, lm.tokenizer, module_widths=widths)
    assert sizes.tensors == real
    _assert_files_estimated(sizes, results)


def _assert_files_estimated(sizes, results) -> None:
    """The files besides the tensors' bytes (the safetensors header, the manifest) are estimated
    from above, and not wildly: at most twice what they take, plus the manifest's fixed part."""
    data, manifest = results.payload()
    header = len(data) - sum(sizes.tensors.values())
    assert header <= sizes.header <= 2 * header + 1024, (header, sizes.header)
    written = len(manifest.encode())
    assert written <= sizes.manifest <= 2 * written + 16384, (written, sizes.manifest)
    assert sizes.result_bytes >= len(data) + written


@pytest.mark.parametrize("case", list(CASES))
def test_result_size_of_saves_is_exact(case):
    _assert_exact(
        {"specsight": 1, "model": "tiny-llama", "invokes": CASES[case]}, tiny("tiny-llama")
    )


def test_result_size_of_attention_patterns_is_exact():
    lm = load_model("tiny-llama", device="cpu", attn_implementation="eager")
    ops = [_save("attn_pattern.1", "p"), _save("attn_pattern.2", "h", heads=[1], positions=[2, -1])]
    model = {"id": "tiny-llama", "attn_implementation": "eager"}
    _assert_exact(
        {"specsight": 1, "model": model, "invokes": {"a": {"prompt": PROMPTS, "ops": ops}}}, lm
    )


def test_result_size_of_metrics_is_exact():
    _assert_exact(_metrics_spec(), tiny("tiny-llama"))


def test_result_size_of_attribution_is_exact():
    atp = {
        "kind": "attribution",
        "clean": "clean",
        "corrupt": "base",
        "target": " Mary",
        "foil": " John",
    }
    spec = ioi_spec(sweep={"layer": "0:2", "pos": [9]}, baseline="base", metrics={"atp": atp})
    _assert_exact(spec, tiny("tiny-llama"))


def test_counts_without_expanding_a_huge_sweep():
    spec = specsight.load_spec(
        {
            "specsight": 1,
            "model": "tiny-llama",
            "invokes": {
                "a": {
                    "prompt": CLEAN,
                    "sweep": {"x": "0:10000000000"},
                    "ops": [{"op": "scale", "site": "mlp_out.1", "factor": "{x}"}],
                }
            },
        }
    )
    lm = tiny("tiny-llama")
    sizes = spec_sizes(spec, lm.info, lm.tokenizer, max_cells=20_000)
    assert sizes.cells == 10_000_000_000 and sizes.rows == 10_000_000_000
    assert sizes.tensors == {}


def test_result_size_of_a_dataset_with_reductions_is_exact():
    from tests.test_dataset import dataset_spec

    spec = dataset_spec()
    spec["invokes"]["clean"]["ops"] = [
        {"op": "save", "site": "resid_post.1", "positions": [{"token": "{s}"}], "name": "s1"},
        {"op": "save", "site": "mlp_act.2", "dims": [3, "10:20"], "name": "act"},
    ]
    spec["metrics"]["ld"]["reduce"] = {"ci": "bootstrap", "n_boot": 100}
    spec["metrics"]["ld"]["baseline"] = "base_ld"
    spec["metrics"]["one"] = {**spec["metrics"]["clean_ld"], "baseline": "clean_ld"}
    spec["metrics"]["clean_ld"]["reduce"] = "median"
    spec["metrics"]["means"] = {**spec["metrics"]["recovery"], "of": "means"}
    spec["metrics"]["both"] = {"kind": "prob", "invoke": "clean", "tokens": ["{io}", "{s}"]}
    spec["metrics"]["both"]["reduce"] = "sum"
    spec["metrics"]["kl"] = {"kind": "kl", "invoke": "patched", "reference": "clean"}
    spec["metrics"]["loss"] = {"kind": "loss", "invoke": "base", "reduce": {"ci": "bootstrap"}}
    spec["metrics"]["acc"] = {"kind": "accuracy", "invoke": "patched", "target": "{io}"}
    _assert_exact(spec, tiny("tiny-llama"))


def test_the_estimate_counts_long_names_in_the_header_and_the_manifest():
    """1,500 saves with 200-character names: their tensors are 384 KB, but the names make the
    header and the manifest several times that; the estimate counts them (before, it said
    384 KB for 4 MB of files)."""
    ops = [
        _save(f"resid_post.{i % 4}", "x" * 200 + f"_{i}", positions=[i % 5]) for i in range(1500)
    ]
    spec = {"specsight": 1, "model": "tiny-llama", "invokes": {"a": {"prompt": CLEAN, "ops": ops}}}
    _assert_exact(spec, tiny("tiny-llama"))


def test_the_estimate_counts_a_sweeps_axis_labels_and_a_datasets_prompts():
    rows = [{"clean": CLEAN + " " + "word " * (i % 7), "io": " Mary"} for i in range(40)]
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": {"rows": rows},
        "invokes": {
            "clean": {"prompt": "{clean}"},
            "swept": {"prompt": CLEAN, "sweep": {"layer": "all", "pos": "all"}, "ops": [
                {"op": "zero", "site": "resid_post.{layer}", "positions": ["{pos}"]}]},
        },
        "metrics": {
            "p": {"kind": "prob", "invoke": "clean", "token": "{io}"},
            "q": {"kind": "prob", "invoke": "swept", "token": " Mary"},
        },
    }  # fmt: skip
    _assert_exact(spec, tiny("tiny-llama"))
