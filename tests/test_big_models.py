"""Models placed across devices by accelerate (``model: {device_map: ...}``): on the CPU, every
other decoder layer offloaded to disk (its weights read from an offload folder as it runs), and
placement by ``device_map: auto`` with a ``max_memory`` that sends part of the model to disk.
Every family's canonical sites (saved, patched, zeroed), patches whose source and target
layers sit on different sides, the example specs' tiny twins, gradients and generation give
the numbers of the same checkpoint loaded whole (fp32, within 1e-5)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import yaml

import specsight
from specsight.models.load import load_model
from specsight.sites import family_table
from tests.conftest import CLEAN
from tests.test_families import FAMILY_MODELS, _family_run

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "specs"
TOL = 1e-5


@functools.cache
def _folder(name: str) -> Path:
    """The tiny model saved as a checkpoint folder (with its tokenizer)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f"specsight-{name}-")) / "ckpt"
    lm = load_model(name, device="cpu")
    lm.model.save_pretrained(str(folder))
    if lm.info.inputs == "text":
        lm.tokenizer.save(folder / "tokenizer.json")
        (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    else:  # the image processor's settings are read from the folder
        lm.model.config.save_pretrained(str(folder))
    return folder


def alternate_layers(model: torch.nn.Module, layers: str, every: int = 2) -> dict[str, str]:
    """A device_map placing decoder layer i on disk when i % every == 1, the others and every
    module outside the layers on the CPU."""
    placed: dict[str, str] = {}

    def walk(module: torch.nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if full == layers:
                for i in range(len(child)):  # type: ignore[arg-type]
                    placed[f"{full}.{i}"] = "disk" if i % every == 1 else "cpu"
            elif layers.startswith(full + "."):
                walk(child, full)
            else:
                placed[full] = "cpu"

    walk(model, "")
    return placed


@functools.cache
def _split(name: str) -> specsight.models.load.LoadedModel:  # type: ignore[name-defined]
    folder = _folder(name)
    whole = load_model(str(folder), device="cpu")
    layers = family_table(whole.info)["layers"]
    placement = alternate_layers(whole.model, layers)
    offload = folder.parent / "offload"
    split = load_model(str(folder), device="cpu", device_map=placement, offload_folder=str(offload))
    assert sorted(set(split.placement.values())) == ["cpu", "disk"]
    meta = [n for n, p in split.model.named_parameters() if p.device.type == "meta"]
    assert meta and all(".1." in n or ".3." in n for n in meta), meta[:4]  # odd layers on disk
    return split


def _same(a: specsight.Results, b: specsight.Results) -> None:
    assert list(a.manifest["tensors"]) == list(b.manifest["tensors"])
    for name in a.manifest["tensors"]:
        x, y = a[name], b[name]
        if x.is_floating_point():
            torch.testing.assert_close(y, x, rtol=TOL, atol=TOL, equal_nan=True, msg=name)
        else:
            assert torch.equal(x, y), name


def _on(spec: dict, name: str) -> dict:
    return {**spec, "model": str(_folder(name))}


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_every_family_site_gives_the_whole_models_numbers(name):
    """Each canonical site saved, patched from the clean run and zeroed, at layer 1 (on disk)."""
    whole = _family_run(name)["results"]
    spec = _on(whole.manifest["spec"]["content"], name)
    _same(whole, specsight.run(spec, model=_split(name)))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gpt-neox", "tiny-mamba"])
def test_patches_across_the_split_sweeps_gradients_and_generation(name):
    whole = load_model(str(_folder(name)), device="cpu")
    spec = {
        "specsight": 1,
        "model": str(_folder(name)),
        "invokes": {
            "clean": {"prompt": CLEAN, "ops": [
                {"op": "save", "site": "resid_post.0", "name": "r0"},
                *({"op": "save", "site": f"resid_post.{i}", "grad": True, "name": f"g{i}"}
                  for i in range(whole.info.n_layers)),
            ]},
            "corrupt": {"prompt": CLEAN.replace("John gave", "Mary gave")},
            "patched": {
                "prompt": CLEAN.replace("John gave", "Mary gave"),
                "sweep": {"layer": "all", "pos": "all"},
                "ops": [{"op": "patch", "site": "resid_post.{layer}", "positions": ["{pos}"],
                         "from": "clean"}],
            },
            "moved": {  # layer 0's clean output (CPU) written into layer 1 (disk)
                "prompt": CLEAN,
                "ops": [{"op": "set", "site": "resid_post.1", "value": {"saved": "r0"}}],
            },
            "steered": {"prompt": "The store", "generate": {"max_new_tokens": 6},
                        "ops": [{"op": "add", "site": "resid_post.2", "vector": {"saved": "r0",
                                 "reduce": "mean"}, "coeff": 2.0}]},
        },
        "metrics": {
            "ld": {"kind": "logit_diff", "invoke": "patched", "target": " Mary", "foil": " John"},
            "clean_ld": {"kind": "logit_diff", "invoke": "clean", "target": " Mary",
                         "foil": " John"},
            "moved_ld": {"kind": "logit_diff", "invoke": "moved", "target": " Mary",
                         "foil": " John"},
        },
        "backward": {"metric": "clean_ld"},
    }  # fmt: skip
    a = specsight.run(spec, model=whole)
    b = specsight.run(spec, model=_split(name))
    _same(a, b)
    assert b["g1"].abs().sum() > 0  # a gradient through the offloaded layer
    assert a.manifest["generated"] == b.manifest["generated"]


@pytest.mark.parametrize("spec_file", ["steering_tiny.yaml", "steering_generate_tiny.yaml"])
def test_the_tiny_example_twins_on_a_split_model(spec_file):
    spec = yaml.safe_load((GOLDEN / spec_file).read_text())
    spec["model"] = str(_folder("tiny-llama"))
    whole = load_model(str(_folder("tiny-llama")), device="cpu")
    _same(specsight.run(spec, model=whole), specsight.run(spec, model=_split("tiny-llama")))


@pytest.mark.parametrize("spec_file", ["ioi_dataset_tiny.yaml", "causal_tracing_tiny.yaml"])
def test_the_dataset_twins_on_a_split_model(spec_file):
    spec = yaml.safe_load((GOLDEN / spec_file).read_text())
    spec["model"] = str(_folder("tiny-llama"))
    whole = load_model(str(_folder("tiny-llama")), device="cpu")
    a = specsight.run(spec, model=whole)
    b = specsight.run(spec, model=_split("tiny-llama"))
    _same(a, b)
    # in blocks of items too: the join does not care where the layers are
    _same(a, specsight.run(spec, model=_split("tiny-llama"), block_rows=40))


def test_device_map_auto_with_max_memory_from_a_spec(tmp_path):
    folder = _folder("tiny-gpt2")
    budget = sum(p.numel() * 4 for p in load_model(str(folder), device="cpu").model.parameters())
    spec = {
        "specsight": 1,
        "model": {"id": str(folder), "device_map": "auto", "max_memory": {"cpu": budget // 2},
                  "offload_folder": str(tmp_path / "off")},
        "invokes": {"a": {"prompt": CLEAN, "sweep": {"layer": "all"},
                          "ops": [{"op": "zero", "site": "mlp_out.{layer}"}]}},
        "metrics": {"ld": {"kind": "logit_diff", "invoke": "a", "target": " Mary",
                           "foil": " John"}},
    }  # fmt: skip
    split = specsight.run(spec)
    assert "disk" in split.manifest["model"]["placement"].values()
    whole = specsight.run({**spec, "model": str(folder)})
    _same(whole, split)
    assert split.manifest["model"]["weights_sha256"] == whole.manifest["model"]["weights_sha256"]


def test_a_server_serves_a_split_model_and_refuses_placements_in_specs(tmp_path):
    from fastapi.testclient import TestClient

    from specsight.remote.auth import KeyRing
    from specsight.remote.jobs import JobStore
    from specsight.remote.server import create_app
    from tests.test_server import KEYS, fetch, submit, wait

    folder = str(_folder("tiny-llama"))
    spec = {
        "specsight": 1,
        "model": folder,
        "invokes": {
            "clean": {"prompt": CLEAN},
            "patched": {"prompt": CLEAN.replace("John gave", "Mary gave"),
                        "sweep": {"layer": "all"},
                        "ops": [{"op": "patch", "site": "resid_post.{layer}", "from": "clean"}]},
        },
        "metrics": {"ld": {"kind": "logit_diff", "invoke": "patched", "target": " Mary",
                           "foil": " John"}},
    }  # fmt: skip
    local = specsight.run(spec, model=load_model(folder, device="cpu"))
    store = JobStore(tmp_path / "jobs.sqlite")
    app = create_app(
        {folder: _split("tiny-llama")}, store=store, keys=KeyRing.from_raw_keys(KEYS), idle_s=0.01
    )
    try:
        with TestClient(app) as client:
            job = submit(client, spec).json()["id"]
            assert wait(client, job).state == "succeeded"
            torch.testing.assert_close(fetch(client, job)["ld"], local["ld"], rtol=TOL, atol=TOL)
            placed = {**spec, "model": {"id": folder, "device_map": "auto"}}
            refused = submit(client, placed)
            assert refused.status_code == 422
            assert "places a model on this machine" in refused.text
    finally:
        store.close()


def test_plan_shows_the_placement_from_pretrained_makes(tmp_path):
    from click.testing import CliRunner

    from specsight.cli import main
    from specsight.models.load.placement import planned_placement
    from specsight.plan import human_bytes

    folder = _folder("tiny-gpt2")
    whole = load_model(str(folder), device="cpu")
    total = sum(p.numel() * 4 for p in whole.model.parameters())
    model = {"id": str(folder), "device_map": "auto", "max_memory": {"cpu": total // 2},
             "offload_folder": str(tmp_path / "off")}  # fmt: skip
    spec = specsight.load_spec(
        {"specsight": 1, "model": model, "invokes": {"a": {"prompt": CLEAN}}}
    )
    planned = planned_placement(spec.model)
    loaded = specsight.api.load_model_for(spec)
    actual: dict[str, list[str]] = {}
    for module, where in loaded.placement.items():
        actual.setdefault(str(where), []).append(module)
    assert {d: sorted(e["modules"]) for d, e in planned.items()} == {
        d: sorted(m) for d, m in actual.items()
    }
    assert sum(e["bytes"] for e in planned.values()) == total
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**spec.model_dump(exclude_none=True), "model": model}))
    out = CliRunner().invoke(main, ["plan", str(path)]).output
    assert "placement (device_map 'auto'; weights per device):" in out
    assert "disk" in out and "cpu" in out
    on_cpu = human_bytes(planned["cpu"]["bytes"])
    assert f"on cpu (where inputs go): weights {on_cpu} + activations" in out


SPECS = ROOT / "specs"
BUILTIN_EXAMPLES = sorted(
    p.name for p in SPECS.glob("*.yaml") if "smollm2-135m" in p.read_text().split("invokes:")[0]
)


@pytest.fixture(scope="module")
def smol_split(tmp_path_factory, smollm):
    """The built-in model with layers 1, 11 and 21 on disk (every disk layer is read from
    the offload folder at every forward and decode step: three keep the tests quick)."""
    placement = alternate_layers(smollm.model, "model.layers", every=10)
    offload = tmp_path_factory.mktemp("smol-offload")
    split = load_model(
        "smollm2-135m", device="cpu", device_map=placement, offload_folder=str(offload)
    )
    assert split.weights_sha256 == smollm.weights_sha256  # the same weights, placed
    return split


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN_EXAMPLES)
def test_every_example_on_the_split_built_in_model(name, smollm, smol_split):
    """The example specs on SmolLM2 with three layers on disk: the whole model's numbers and
    verdicts."""
    whole = specsight.run(SPECS / name, model=smollm)
    split = specsight.run(SPECS / name, model=smol_split)
    _same(whole, split)
    assert [o.ok for o in split.expectations] == [o.ok for o in whole.expectations]
    assert split.ok
