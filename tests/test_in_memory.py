"""Models passed from Python: ``specsight.run(spec, model=hf_model, tokenizer=hf_tokenizer)``
runs a Hugging Face model already in memory (checked against the model called directly), a
model that is not the one the spec names is a located error, and ``model: in-memory`` runs on
whatever is passed."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import specsight
from specsight.cli import main
from specsight.errors import ModelLoadError, SpecError
from specsight.models.load.tiny import build_tiny, tiny_tokenizer
from tests.conftest import tiny

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _spec(model: str) -> dict:
    return {
        "specsight": 1,
        "model": model,
        "invokes": {"a": {"prompt": PROMPT, "ops": [{"op": "zero", "site": "mlp_out.1"}]}},
        "metrics": {
            "ld": {"kind": "logit_diff", "invoke": "a", "target": " Mary", "foil": " John"}
        },
    }


def _hf_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer().backend)


def _by_hand(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> float:
    """logit(Mary) - logit(John) with layer 1's MLP output zeroed by a hand-written hook."""
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    handle = model.transformer.h[1].mlp.register_forward_hook(
        lambda m, a, out: torch.zeros_like(out)
    )
    try:
        with torch.inference_mode():
            logits = model(ids).logits[0, -1]
    finally:
        handle.remove()
    mary, john = (tok(t, add_special_tokens=False)["input_ids"][0] for t in (" Mary", " John"))
    return float(logits[mary] - logits[john])


def _small_gpt2() -> GPT2LMHeadModel:
    """A 2-layer GPT-2 with random weights (tiny-gpt2 has 4), in eval mode."""
    config = GPT2Config(
        vocab_size=tiny_tokenizer().vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def test_a_hugging_face_model_in_memory_runs_and_matches_a_hand_written_hook():
    torch.manual_seed(0)
    model, tok = _small_gpt2(), _hf_tokenizer()
    want = _by_hand(model, tok)
    results = specsight.run(_spec("in-memory"), model=model, tokenizer=tok)
    torch.testing.assert_close(results["ld"], torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert results.manifest["model"]["id"] == "GPT2LMHeadModel"
    assert results.manifest["model"]["architecture"] == "GPT2LMHeadModel"


def test_a_model_that_is_not_the_specs_is_a_located_error():
    with pytest.raises(SpecError) as caught:
        specsight.run(_spec("tiny-gpt2"), model=tiny("tiny-llama"))
    text = str(caught.value)
    assert "model.id" in text or "model:" in text
    assert "not 'tiny-gpt2'" in text and "family llama (the spec's model: gpt2)" in text
    assert "model: in-memory" in text
    small = _small_gpt2()
    with pytest.raises(SpecError, match="n_layers 2 \\(the spec's model: 4\\)"):
        specsight.run(_spec("tiny-gpt2"), model=small, tokenizer=_hf_tokenizer())


def test_the_model_the_spec_names_passes_the_check_in_either_form():
    raw = build_tiny("tiny-gpt2", seed=0, attn_implementation=None)
    a = specsight.run(_spec("tiny-gpt2"), model=raw, tokenizer=_hf_tokenizer())
    b = specsight.run(_spec("tiny-gpt2"), model=tiny("tiny-gpt2"))
    torch.testing.assert_close(a["ld"], b["ld"])
    assert a.manifest["model"]["weights_sha256"] == b.manifest["model"]["weights_sha256"]


def test_a_text_model_without_its_tokenizer_says_what_to_pass():
    raw = build_tiny("tiny-gpt2", seed=0, attn_implementation=None)
    with pytest.raises(ModelLoadError, match="needs its tokenizer"):
        specsight.run(_spec("in-memory"), model=raw)
    with pytest.raises(ModelLoadError, match="Hugging Face model or a LoadedModel"):
        specsight.run(_spec("in-memory"), model=torch.nn.Linear(2, 2), tokenizer=_hf_tokenizer())


def test_an_in_memory_spec_from_the_command_line_is_a_located_error(tmp_path):
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_spec("in-memory")))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2
    assert "'in-memory' names no model to load" in result.output
    assert "specsight.run(spec, model=hf_model, tokenizer=hf_tokenizer)" in result.output
    assert CliRunner().invoke(main, ["validate", str(path)]).exit_code == 0


def test_the_callers_model_is_left_as_it_was():
    model, tok = _small_gpt2(), _hf_tokenizer()
    model.train()
    model.transformer.h[0].requires_grad_(False)  # a partly frozen model, in training
    specsight.run(_spec("in-memory"), model=model, tokenizer=tok)
    assert model.training and model.transformer.h[1].training
    assert not any(p.requires_grad for p in model.transformer.h[0].parameters())
    assert all(p.requires_grad for p in model.transformer.h[1].parameters())
