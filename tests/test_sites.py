"""Site resolution: canonical names per family, ranges, wildcards, raw paths, errors; `specsight sites`."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from specsight.cli import main
from specsight.models.load import load_model_info
from specsight.sites import SiteError, resolve_site


@pytest.fixture(scope="module")
def llama():
    return load_model_info("tiny-llama")[0]


@pytest.fixture(scope="module")
def gpt2():
    return load_model_info("tiny-gpt2")[0]


def names(sites):
    return [(s.module, s.io, s.layer) for s in sites]


def test_canonical_sites_per_family(llama, gpt2):
    assert names(resolve_site("resid_post.2", llama)) == [("model.layers.2", "output", 2)]
    assert names(resolve_site("resid_pre.0", gpt2)) == [("transformer.h.0", "input", 0)]
    assert names(resolve_site("resid_mid.1", llama)) == [
        ("model.layers.1.post_attention_layernorm", "input", 1)
    ]
    assert names(resolve_site("resid_mid.1", gpt2)) == [("transformer.h.1.ln_2", "input", 1)]
    assert names(resolve_site("attn_out.3", gpt2)) == [("transformer.h.3.attn", "output", 3)]
    assert names(resolve_site("mlp_out.-1", llama)) == [("model.layers.3.mlp", "output", 3)]
    assert names(resolve_site("embed", gpt2)) == [("transformer.wte", "output", None)]
    assert names(resolve_site("final_norm", llama)) == [("model.norm", "output", None)]
    assert names(resolve_site("logits", llama)) == [("lm_head", "output", None)]


def test_ranges_and_wildcards(llama):
    assert [s.layer for s in resolve_site("resid_post.*", llama)] == [0, 1, 2, 3]
    assert [s.layer for s in resolve_site("resid_post.1:3", llama)] == [1, 2]
    assert [s.layer for s in resolve_site("resid_post.::2", llama)] == [0, 2]
    assert [s.module for s in resolve_site("model.layers.*.mlp", llama)] == [
        f"model.layers.{i}.mlp" for i in range(4)
    ]
    assert [s.module for s in resolve_site("model.layers.2:.self_attn", llama)] == [
        "model.layers.2.self_attn",
        "model.layers.3.self_attn",
    ]


def test_raw_paths_with_input_and_output(llama):
    assert names(resolve_site("model.layers.1.mlp", llama)) == [("model.layers.1.mlp", "output", 1)]
    assert names(resolve_site("model.layers.1.mlp.output", llama)) == [
        ("model.layers.1.mlp", "output", 1)
    ]
    site = resolve_site("model.layers.1.mlp.down_proj.input", llama)[0]
    assert (site.module, site.io, site.name) == (
        "model.layers.1.mlp.down_proj",
        "input",
        "model.layers.1.mlp.down_proj.input",
    )


@pytest.mark.parametrize(
    "text, message, hint",
    [
        ("resid_post.9", "layer 9 is out of range", "use 0..3"),
        ("resid_post", "needs a layer index", "resid_post.5"),
        ("embed.3", "takes no layer index", "write 'embed'"),
        ("resid_pots.3", "no module or canonical site", "did you mean 'resid_post.3'?"),
        ("model.layer.2.mlp", "no module or canonical site", "did you mean 'model.layers.2.mlp'?"),
        ("resid_post.5:9", "selects no layer", "0:4"),
        ("resid_post.x", "is not a layer", "integer"),
    ],
)
def test_site_errors_say_what_and_how(llama, text, message, hint):
    with pytest.raises(SiteError) as exc:
        resolve_site(text, llama)
    assert message in exc.value.message
    assert hint in (exc.value.hint or "")


def test_sites_command_lists_canonical_sites_and_modules():
    result = CliRunner().invoke(main, ["sites", "tiny-gpt2"])
    assert result.exit_code == 0, result.output
    assert "resid_post.L   transformer.h.L (output)  [batch, pos, 64]" in result.output
    assert "transformer.h.0.attn.c_attn (Conv1D)" in result.output
    assert "transformer.h.1 .. transformer.h.3 repeat" in result.output
    bad = CliRunner().invoke(main, ["sites", "tiny-lama"])
    assert bad.exit_code == 2 and "did you mean 'tiny-llama'" in bad.output  # a usage mistake
