"""Inputs beyond text: a ViT image classifier with image files beside the spec, and any
``torch.nn.Module`` built by ``model: {factory: ...}`` with tensor files (raw module paths only,
refused by servers)."""

from __future__ import annotations

import functools
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.numpy import save_file

import specsight
from specsight.cli import main
from specsight.errors import ModelLoadError, RunError, SpecError
from specsight.models.load import load_model

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "specs" / "images"
RED, BLUE = IMAGES / "red_square.png", IMAGES / "blue_circle.png"


@functools.cache
def _vit(eager: bool = False):
    return load_model("tiny-vit", device="cpu", attn_implementation="eager" if eager else None)


def _pixels(path: Path) -> torch.Tensor:
    """The reference preparation: transformers' own ViT image processor (PIL backend)."""
    from PIL import Image
    from transformers import ViTImageProcessorPil

    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    with Image.open(path) as image:
        return processor(image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def _vit_spec(invokes: dict, metrics: dict | None = None, **model) -> dict:
    return {
        "specsight": 1,
        "model": {"id": "tiny-vit", **model},
        "invokes": invokes,
        "metrics": metrics or {},
    }


# --------------------------------------------------------------------------- ViT


def test_vit_model_info_and_label_vocabulary() -> None:
    lm = _vit()
    info = lm.info
    assert (info.family, info.inputs, info.n_layers, info.d_model) == ("vit", "image", 4, 64)
    assert info.labels == ("cat", "dog", "bird", "fish", "horse") and info.vocab_size == 5
    assert info.image["size"] == [32, 32] and info.image["seq_len"] == 17  # 4x4 patches + class
    assert lm.tokenizer.encode_plain("bird") == [2] and lm.tokenizer.token_str(4) == "horse"


def test_images_are_prepared_like_the_models_image_processor() -> None:
    spec = _vit_spec({"a": {"image": [str(RED), str(BLUE)]}})
    plan = specsight.compile_plan(specsight.load_spec(spec), _vit().info, _vit().tokenizer)
    for row, path in zip(plan.rows, (RED, BLUE)):
        entry = plan.inputs[row.input]
        mine = torch.tensor(entry.values).reshape(entry.shape)
        torch.testing.assert_close(mine, _pixels(path), rtol=0, atol=1e-5)
    assert plan.invokes["a"].inputs == (str(RED), str(BLUE))


def test_vit_logits_match_the_model_called_directly() -> None:
    lm = _vit()
    spec = _vit_spec(
        {"a": {"image": [str(RED), str(BLUE)]}},
        {"logits": {"kind": "logits", "invoke": "a", "tokens": [0, 1, 2, 3, 4]}},
    )
    results = specsight.run(spec, model=lm)
    with torch.no_grad():
        expected = lm.model(pixel_values=torch.stack([_pixels(RED), _pixels(BLUE)])).logits
    torch.testing.assert_close(results["logits"], expected, rtol=1e-4, atol=1e-5)
    assert results.next_tokens["a"][0][0][0] in lm.info.labels  # top class, by label


def test_vit_patching_sweep_with_image_files_beside_the_spec(tmp_path: Path) -> None:
    """Images are read relative to the spec's folder; patching the class token of the last
    layer from the clean image restores the clean output exactly, the patches do nothing there."""
    shutil.copy(RED, tmp_path / "red.png")
    shutil.copy(BLUE, tmp_path / "blue.png")
    spec = _vit_spec(
        {
            "clean": {"image": "red.png"},
            "corrupt": {"image": "blue.png"},
            "patched": {
                "image": "blue.png",
                "sweep": {"layer": "all", "pos": "all"},
                "ops": [
                    {
                        "op": "patch",
                        "site": "resid_post.{layer}",
                        "positions": "{pos}",
                        "from": "clean",
                    }
                ],
            },
        },
        {
            "clean": {"kind": "logit_diff", "invoke": "clean", "target": "cat", "foil": "bird"},
            "corrupt": {"kind": "logit_diff", "invoke": "corrupt", "target": "cat", "foil": "bird"},
            "patched": {"kind": "logit_diff", "invoke": "patched", "target": "cat", "foil": "bird"},
        },
    )
    path = tmp_path / "vit.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    results = specsight.run(path, model=_vit())
    grid = results["patched"]
    assert results.axes("patched") == ["layer", "pos"] and tuple(grid.shape) == (4, 17)
    torch.testing.assert_close(grid[3, 0], results["clean"], rtol=0, atol=1e-5)
    torch.testing.assert_close(grid[3, 1:], results["corrupt"].expand(16), rtol=0, atol=1e-5)
    assert (grid[0] - results["corrupt"]).abs().max() > 1e-4  # early layers matter
    labels = results.manifest["tensors"]["patched"]["axis_labels"]["pos"]
    assert labels[:3] == ["0:[CLS]", "1:p0,0", "2:p0,1"] and labels[-1] == "16:p3,3"
    # one forward per cell gives the same grid (prefix reuse and batching are exact)
    one_by_one = specsight.run(path, model=_vit(), max_batch=1)
    torch.testing.assert_close(one_by_one["patched"], grid, rtol=0, atol=1e-5)


def test_different_images_never_share_a_prefix() -> None:
    """Rows of two images have the same placeholder tokens; their inputs keep them apart."""
    spec = _vit_spec(
        {"a": {"image": [str(RED), str(BLUE)], "ops": [{"op": "zero", "site": "mlp_out.3"}]}},
        {"p": {"kind": "logits", "invoke": "a", "tokens": [0, 1]}},
    )
    plan = specsight.compile_plan(specsight.load_spec(spec), _vit().info, _vit().tokenizer)
    assert plan.forwards[0].shared_prefix == 0
    results = specsight.run(spec, model=_vit())
    assert (results["p"][0] - results["p"][1]).abs().max() > 1e-5


def test_vit_heads_and_attention_pattern() -> None:
    lm = _vit(eager=True)
    ops = [
        {"op": "save", "site": "attn_pattern.1", "name": "pattern"},
        {"op": "save", "site": "head_z.1", "heads": [1], "positions": 0, "name": "z1"},
    ]
    spec = _vit_spec({"a": {"image": str(RED), "ops": ops}}, attn_implementation="eager")
    results = specsight.run(spec, model=lm)
    pattern = results["pattern"]
    assert tuple(pattern.shape) == (17, 4, 17)  # [query, head, key]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(17, 4))
    assert pattern.permute(1, 0, 2).triu(1).abs().max() > 0  # bidirectional, not causal
    assert tuple(results["z1"].shape) == (1, 1, 16)


@pytest.mark.parametrize(
    ("invoke", "model", "message"),
    [
        ({"prompt": "a cat"}, "tiny-vit", "'prompt' does not fit this model"),
        ({"image": "red_square.png"}, "tiny-llama", "'image' does not fit this model"),
        ({"image": "red_sqare.png"}, "tiny-vit", "image file 'red_sqare.png' not found"),
        (
            {
                "image": "red_square.png",
                "ops": [{"op": "zero", "site": "embed", "positions": {"token": " cat"}}],
            },
            "tiny-vit",
            "cannot search for token ' cat': this model's inputs are not text",
        ),
        (
            {"image": "red_square.png", "generate": {"max_new_tokens": 2}},
            "tiny-vit",
            "only text models generate",
        ),
    ],
)
def test_image_input_errors_are_located(
    tmp_path: Path, invoke: dict, model: str, message: str
) -> None:
    shutil.copy(RED, tmp_path / "red_square.png")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"specsight": 1, "model": model, "invokes": {"a": invoke}}))
    with pytest.raises(SpecError) as exc:
        specsight.run(
            path, model=_vit() if model == "tiny-vit" else load_model(model, device="cpu")
        )
    assert message in str(exc.value)
    assert f"{path}:" in str(exc.value)  # file:line:col
    if "not found" in message:
        assert "did you mean 'red_square.png'" in str(exc.value)


def test_unknown_class_label_suggests_one() -> None:
    spec = _vit_spec(
        {"a": {"image": str(RED)}}, {"p": {"kind": "prob", "invoke": "a", "token": "brid"}}
    )
    with pytest.raises(SpecError, match="no output class is labelled 'brid'.*did you mean 'bird'"):
        specsight.run(spec, model=_vit())


def test_classifier_metrics_have_no_position() -> None:
    spec = _vit_spec(
        {"a": {"image": str(RED)}},
        {"p": {"kind": "prob", "invoke": "a", "token": "cat", "position": 3}},
    )
    with pytest.raises(SpecError, match="one output per image"):
        specsight.run(spec, model=_vit())


def test_unreadable_image_is_a_located_error(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not an image")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_vit_spec({"a": {"image": "broken.png"}})))
    with pytest.raises(SpecError, match="cannot read image 'broken.png'"):
        specsight.run(path, model=_vit())


# --------------------------------------------------------------------------- factory models

NETS = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, x):
            return x + self.mlp(self.norm(x))


    class Tagger(nn.Module):
        """[batch, seq, features] -> per-position class logits."""

        labels = ["noun", "verb", "other"]

        def __init__(self, d_in, d, n_blocks):
            super().__init__()
            self.proj = nn.Linear(d_in, d)
            self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))
            self.head = nn.Linear(d, 3)

        def forward(self, x):
            h = self.proj(x)
            for block in self.blocks:
                h = block(h)
            return self.head(h)


    def tagger(d_in=8, d=16, n_blocks=2):
        return Tagger(d_in, d, n_blocks)


    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            return {"logits": self.fc(torch.relu(self.conv(x)).flatten(1))}


    def convnet():
        return ConvNet()


    def not_a_module():
        return 42
    '''
)


@pytest.fixture
def factory_dir(tmp_path: Path) -> Path:
    (tmp_path / "toy_nets.py").write_text(NETS)
    rng = np.random.default_rng(0)
    save_file(
        {"x": rng.standard_normal((3, 5, 8)).astype("float32")}, tmp_path / "seqs.safetensors"
    )
    np.save(tmp_path / "digits.npy", rng.standard_normal((2, 1, 8, 8)).astype("float32"))
    return tmp_path


def _write(folder: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _tagger_spec(**extra) -> dict:
    return {
        "specsight": 1,
        "model": {"factory": "toy_nets:tagger", "args": {"d": 16}, "seed": 3},
        "invokes": {
            "base": {
                "input": {"file": "seqs.safetensors"},
                "ops": [{"op": "save", "site": "blocks.0"}],
            },
            "ablate": {
                "input": {"file": "seqs.safetensors", "key": "x"},
                "sweep": {"layer": [0, 1]},
                "ops": [{"op": "zero", "site": "blocks.{layer}.mlp", "positions": 2}],
            },
        },
        "metrics": {
            "verb": {"kind": "prob", "invoke": "base", "token": "verb", "position": 2},
            "ablate": {
                "kind": "logit_diff",
                "invoke": "ablate",
                "target": "noun",
                "foil": "verb",
                "position": 2,
            },
        },
        **extra,
    }


def _hand_tagger(folder: Path, zero_block: int | None) -> torch.Tensor:
    """The tagger built and run by hand (same seed), optionally with one MLP zeroed at pos 2."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_nets_hand", folder / "toy_nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(3)
    model = module.tagger(d=16).eval()
    handle = None
    if zero_block is not None:

        def hook(_mod, _inp, out):
            out = out.clone()
            out[:, 2] = 0
            return out

        handle = model.blocks[zero_block].mlp.register_forward_hook(hook)
    from safetensors.numpy import load_file

    x = torch.from_numpy(load_file(folder / "seqs.safetensors")["x"])
    with torch.no_grad():
        logits = model(x)
    if handle:
        handle.remove()
    return logits


def test_factory_model_runs_with_raw_paths_and_tensor_inputs(factory_dir: Path) -> None:
    results = specsight.run(_write(factory_dir, _tagger_spec()))
    clean = _hand_tagger(factory_dir, None)
    torch.testing.assert_close(results["verb"], torch.softmax(clean[:, 2], -1)[:, 1])
    assert results.axes("ablate") == ["layer", "prompt"]
    for layer in (0, 1):
        zeroed = _hand_tagger(factory_dir, layer)
        torch.testing.assert_close(results["ablate"][layer], zeroed[:, 2, 0] - zeroed[:, 2, 1])
    assert tuple(results["base/blocks.0"].shape) == (3, 5, 16)
    assert results.manifest["model"]["id"] == "factory:toy_nets:tagger"
    assert results.manifest["model"]["inputs"] == "tensor"
    # the same seed gives the same weights: a second run is bit-identical
    again = specsight.run(_write(factory_dir, _tagger_spec()))
    assert torch.equal(again["ablate"], results["ablate"])
    assert again.manifest["model"]["weights_sha256"] == results.manifest["model"]["weights_sha256"]


def test_factory_feature_maps_act_per_row(factory_dir: Path) -> None:
    """A conv feature map [batch, channels, h, w] is one position per row: zeroing it leaves
    only the classifier's bias; saved values come back flattened."""
    spec = {
        "specsight": 1,
        "model": {"factory": "toy_nets:convnet"},
        "invokes": {
            "clean": {"input": {"file": "digits.npy"}, "ops": [{"op": "save", "site": "conv"}]},
            "zeroed": {"input": {"file": "digits.npy"}, "ops": [{"op": "zero", "site": "conv"}]},
        },
        "metrics": {
            "zeroed": {"kind": "logits", "invoke": "zeroed", "tokens": [0, 1, 2]},
            "top": {"kind": "top_k", "invoke": "clean", "k": 3},
        },
    }
    results = specsight.run(_write(factory_dir, spec))
    torch.testing.assert_close(results["zeroed"][0], results["zeroed"][1])
    assert tuple(results["clean/conv"].shape) == (2, 1, 256)
    assert tuple(results["top"].shape) == (2, 3)


def test_factory_errors_say_what_and_where(factory_dir: Path) -> None:
    def error_of(spec: dict, kind: type[Exception] = SpecError) -> str:
        with pytest.raises(kind) as exc:
            specsight.run(_write(factory_dir, spec))
        return str(exc.value)

    spec = _tagger_spec()
    spec["invokes"]["ablate"]["sweep"] = {"layer": "all"}
    assert "layer: all needs a known layer stack" in error_of(spec)
    spec = _tagger_spec()
    spec["invokes"]["base"]["ops"] = [{"op": "save", "site": "resid_post.0"}]
    message = error_of(spec)
    assert "spec.yaml:" in message and "a model built by a factory has none" in message
    assert "blocks.0" in message
    spec = _tagger_spec()
    spec["metrics"]["verb"]["token"] = "vreb"
    assert "did you mean 'verb'" in error_of(spec)
    spec = _tagger_spec()
    spec["invokes"]["base"]["input"] = {"file": "digits.npy"}
    assert "every input needs the same shape" in error_of(spec)
    spec = _tagger_spec()
    spec["model"]["factory"] = "toy_nets:tager"
    message = error_of(spec, ModelLoadError)
    assert "has no function 'tager'" in message and "tagger" in message
    spec["model"]["factory"] = "no_such_module:tagger"
    assert "cannot import 'no_such_module'" in error_of(spec, ModelLoadError)
    spec["model"] = {"factory": "toy_nets:not_a_module"}
    assert "returned an object of type int, not a torch.nn.Module" in error_of(spec, ModelLoadError)
    spec["model"] = {"factory": "toy_nets:tagger", "args": {"width": 3}}
    assert "check model.args" in error_of(spec, ModelLoadError)
    spec = _tagger_spec()
    spec["invokes"]["base"] = {"prompt": "hello"}
    assert "this model is built by a factory: give 'input'" in error_of(spec)


def test_factory_model_is_refused_by_servers(factory_dir: Path) -> None:
    from specsight.remote.admission import prepare_job
    from specsight.remote.protocol import Limits
    from specsight.remote.submit import run_remote

    path = _write(factory_dir, _tagger_spec())
    with pytest.raises(SpecError) as exc:  # the client refuses before any request
        run_remote(path, url="http://127.0.0.1:9", api_key="unused")
    assert "never imports or runs code named by a spec" in str(exc.value)
    assert "spec.yaml:3:" in str(exc.value)
    spec = yaml.safe_load(path.read_text())
    with pytest.raises(SpecError, match="factory-remote|never imports"):  # and so does a server
        prepare_job(spec, load_model("tiny-llama", device="cpu"), Limits())


def test_cli_plan_and_sites_for_new_inputs(factory_dir: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["plan", str(_write(factory_dir, _tagger_spec()))])
    assert out.exit_code == 0, out.output
    assert "forward" in out.output
    out = runner.invoke(main, ["sites", "tiny-vit"])
    assert out.exit_code == 0 and "5 classes, 32x32 images in 17 positions" in out.output
    bad = runner.invoke(
        main,
        [
            "run",
            str(_write(factory_dir, {**_tagger_spec(), "model": {"factory": "toy_nets:tager"}})),
        ],
    )
    assert bad.exit_code != 0 and "has no function 'tager'" in bad.output
    assert "Traceback" not in bad.output


def test_run_error_for_output_without_logits(factory_dir: Path) -> None:
    (factory_dir / "odd.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.lin = torch.nn.Linear(8, 2)\n"
        "    def forward(self, x):\n"
        "        return self.lin(x).sum()\n"
        "def build():\n    return M()\n"
    )
    spec = {
        "specsight": 1,
        "model": {"factory": "odd:build"},
        "invokes": {"a": {"input": {"file": "seqs.safetensors"}}},
    }
    with pytest.raises(RunError, match="metrics need \\[batch, classes\\]"):
        specsight.run(_write(factory_dir, spec))


def test_image_specs_run_locally_only(tmp_path: Path) -> None:
    from specsight.remote.submit import run_remote

    shutil.copy(RED, tmp_path / "red.png")
    path = _write(tmp_path, _vit_spec({"a": {"image": "red.png"}}))
    with pytest.raises(SpecError, match="'image' inputs are files, which run locally only"):
        run_remote(path, url="http://127.0.0.1:9", api_key="unused")


def test_grayscale_vit_folder_with_its_own_preprocessor(tmp_path: Path) -> None:
    """A local ViT folder: one channel, 16x16 images, its preprocessor_config.json's mean/std."""
    import json

    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=16, patch_size=8, num_channels=1, id2label={0: "zero", 1: "one"},
    )  # fmt: skip
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    processor = {"image_mean": [0.25], "image_std": [0.5], "size": {"height": 16, "width": 16}}
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(processor))
    shutil.copy(RED, tmp_path / "red.png")
    spec = {
        "specsight": 1,
        "model": {"id": str(tmp_path / "vit"), "device": "cpu"},
        "invokes": {"a": {"image": "red.png", "ops": [{"op": "save", "site": "embed"}]}},
        "metrics": {"p": {"kind": "prob", "invoke": "a", "token": "one"}},
    }
    path = _write(tmp_path, spec)
    plan_info = specsight.models.load.load_model_info(str(tmp_path / "vit"))[0]
    assert plan_info.image["image_mean"] == [0.25] and plan_info.image["seq_len"] == 5
    results = specsight.run(path)
    assert tuple(results["a/embed"].shape) == (5, 32)
    from PIL import Image

    with Image.open(RED) as image:
        gray = np.asarray(image.convert("L").resize((16, 16), resample=2), dtype=np.float64)
    pixels = torch.tensor(((gray / 255 - 0.25) / 0.5)[None, None], dtype=torch.float32)
    model = ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()
    with torch.no_grad():
        expected = torch.softmax(model(pixel_values=pixels).logits, -1)[0, 1]
    torch.testing.assert_close(results["p"], expected, rtol=1e-4, atol=1e-6)


def test_servers_refuse_to_serve_image_models(tmp_path: Path) -> None:
    args = ["serve", "--model", "tiny-vit", "--insecure-no-auth", "--db", str(tmp_path / "j.db")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "reads image inputs; a server serves text models only" in result.output
