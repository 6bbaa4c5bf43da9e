"""The ablation family (mean_ablate, resample_ablate, noise, project_out, clamp, skip) and
``dims:``, each checked against hand-written PyTorch hooks on the same weights, item by item."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import specsight
from specsight.compile.ablations import derangement
from specsight.errors import SpecError
from tests.conftest import tiny
from tests.test_dataset import ROWS

LD = {"kind": "logit_diff", "target": "{io}", "foil": "{s}"}


def _spec(ops: list[dict[str, Any]], sweep: dict | None = None) -> dict[str, Any]:
    target: dict[str, Any] = {"prompt": "{clean}", "ops": ops}
    if sweep:
        target["sweep"] = sweep
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": {"rows": ROWS},
        "invokes": {"clean": {"prompt": "{clean}"}, "target": target},
        "metrics": {"ld": {**LD, "invoke": "target"}},
    }


def _ids(lm, text: str) -> torch.Tensor:
    return torch.tensor([lm.tokenizer.encode(text)])


def _ld(lm, row: dict[str, str], hooks: list[tuple[torch.nn.Module, str, Any]] = ()) -> float:
    """The logit difference of a row's clean prompt with forward (or pre-) hooks installed."""
    handles = []
    for module, kind, fn in hooks:
        register = (
            module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
        )
        handles.append(register(fn))
    try:
        with torch.inference_mode():
            logits = lm.model(_ids(lm, row["clean"])).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    io, s = (lm.tokenizer.encode_plain(row[c])[0] for c in ("io", "s"))
    return float(logits[io] - logits[s])


def _capture(lm, row: dict[str, str], module: torch.nn.Module) -> torch.Tensor:
    kept = {}

    def keep(_m, _a, out):
        kept["v"] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()

    _ld(lm, row, [(module, "post", keep)])
    return kept["v"]


def _replace(positions, value_at):
    """A forward hook writing ``value_at(pos)`` at each position of the (first) output."""

    def hook(_m, _a, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        for p in positions:
            hidden[0, p] = value_at(p)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    return hook


def _position(lm, row: dict[str, str], word: str, occurrence: int = 1) -> int:
    ids, needle = lm.tokenizer.encode(row["clean"]), lm.tokenizer.encode_plain(word)[0]
    return [i for i, t in enumerate(ids) if t == needle][occurrence - 1]


def _close(got: torch.Tensor, want: list) -> None:
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)


LM = tiny("tiny-llama")
LAYERS = LM.model.model.layers


def test_mean_ablate_per_position_over_a_reference_invoke():
    results = specsight.run(
        _spec(
            [{"op": "mean_ablate", "site": "mlp_out.{layer}", "from": "clean"}], {"layer": "all"}
        ),
        model=LM,
    )
    want = []
    for block in LAYERS:
        caps = [_capture(LM, r, block.mlp) for r in ROWS]
        longest = max(c.shape[0] for c in caps)
        mean = torch.stack(
            [
                torch.stack([c[p] for c in caps if c.shape[0] > p]).double().mean(0)
                for p in range(longest)
            ]
        ).float()
        want.append(
            [
                _ld(
                    LM,
                    r,
                    [
                        (
                            block.mlp,
                            "post",
                            _replace(
                                range(len(LM.tokenizer.encode(r["clean"]))), lambda p, m=mean: m[p]
                            ),
                        )
                    ],
                )
                for r in ROWS
            ]
        )
    _close(results["ld"], want)


def test_mean_ablate_over_positions_writes_one_mean_vector():
    op = {
        "op": "mean_ablate",
        "site": "mlp_out.1",
        "from": "clean",
        "over": "positions",
        "positions": [{"token": "{s}"}],
    }
    results = specsight.run(_spec([op]), model=LM)
    mlp = LAYERS[1].mlp
    mean = torch.cat([_capture(LM, r, mlp) for r in ROWS]).double().mean(0).float()
    want = [
        _ld(LM, r, [(mlp, "post", _replace([_position(LM, r, r["s"])], lambda p: mean))])
        for r in ROWS
    ]
    _close(results["ld"], want)


def test_resample_ablate_reads_another_item_by_a_seeded_derangement():
    op = {
        "op": "resample_ablate",
        "site": "resid_post.{layer}",
        "from": "clean",
        "positions": [{"token": "{s}", "occurrence": 2}],
        "seed": 5,
    }
    results = specsight.run(_spec([op], {"layer": "all"}), model=LM)
    order = derangement(len(ROWS), 5)
    assert all(order[i] != i for i in range(len(ROWS))) and sorted(order) == list(range(len(ROWS)))
    want = []
    for block in LAYERS:
        cells = []
        for i, row in enumerate(ROWS):
            other = ROWS[order[i]]
            value = _capture(LM, other, block)[_position(LM, other, other["s"], 2)]
            cells.append(
                _ld(
                    LM,
                    row,
                    [
                        (
                            block,
                            "post",
                            _replace([_position(LM, row, row["s"], 2)], lambda p, v=value: v),
                        )
                    ],
                )
            )
        want.append(cells)
    _close(results["ld"], want)
    other_seed = specsight.run(_spec([{**op, "seed": 6}], {"layer": "all"}), model=LM)
    assert derangement(3, 6) != order or torch.equal(other_seed["ld"], results["ld"])


def test_noise_is_scaled_by_the_empirical_std_and_seeded_per_item():
    op = {
        "op": "noise",
        "site": "embed",
        "positions": [{"token": "{s}"}],
        "std_of": "clean",
        "scale": 3,
        "seed": 4,
    }
    spec = _spec([op])
    spec["invokes"]["again"] = {
        "prompt": "{clean}",
        "sweep": {"layer": [0, 1]},
        "ops": [op, {"op": "scale", "site": "resid_post.{layer}", "factor": 1}],
    }
    spec["metrics"]["again"] = {**LD, "invoke": "again"}
    results = specsight.run(spec, model=LM)
    embed = LM.model.model.embed_tokens
    std = float(torch.cat([_capture(LM, r, embed) for r in ROWS]).double().std())
    want = []
    for i, row in enumerate(ROWS):
        pos = _position(LM, row, row["s"])
        draw = torch.randn(
            (1, LM.info.d_model), generator=torch.Generator().manual_seed(4 * 1_000_003 + i)
        )

        def hook(_m, _a, out, pos=pos, draw=draw):
            out = out.clone()
            out[0, pos] += (draw[0] * 3 * std).to(out.dtype)
            return out

        want.append(_ld(LM, row, [(embed, "post", hook)]))
    _close(results["ld"], want)
    # the same item gets the same noise in every cell and every invoke with this seed
    for cell in range(2):
        _close(results["again"][cell], want)


def test_project_out_removes_a_subspace():
    d = LM.info.d_model
    a = torch.linspace(-1, 1, d)
    b = torch.cos(torch.arange(d, dtype=torch.float32))
    op = {
        "op": "project_out",
        "site": "resid_post.1",
        "vectors": [a.tolist(), b.tolist(), (a + b).tolist()],
    }
    results = specsight.run(_spec([op]), model=LM)
    q, _ = torch.linalg.qr(torch.stack([a, b]).double().T)  # the span of a, b (a + b adds nothing)

    def hook(_m, _a, out):
        hidden = out[0] if isinstance(out, tuple) else out
        exact = hidden.double()
        new = (exact - exact @ q @ q.T).to(hidden.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    _close(results["ld"], [_ld(LM, r, [(LAYERS[1], "post", hook)]) for r in ROWS])


def test_clamp_and_dims_on_save():
    ops = [
        {"op": "clamp", "site": "mlp_act.1", "dims": [3, "10:12"], "value": 5},
        {"op": "save", "site": "mlp_act.1", "dims": ["8:12", 3], "name": "act"},
    ]
    results = specsight.run(_spec(ops), model=LM)
    down = LAYERS[1].mlp.down_proj
    seen = {}

    def clamp(_m, args):
        x = args[0].clone()
        x[..., [3, 10, 11]] = 5.0
        seen["x"] = x[0]
        return (x,)

    want = []
    for i, row in enumerate(ROWS):
        want.append(_ld(LM, row, [(down, "pre", clamp)]))
        saved = results["act"][i][: seen["x"].shape[0]]
        torch.testing.assert_close(saved, seen["x"][:, [3, 8, 9, 10, 11]])
    _close(results["ld"], want)
    assert results.manifest["tensors"]["act"]["axis_values"]["hidden"] == [3, 8, 9, 10, 11]


def test_skip_sets_a_layers_output_to_its_input():
    results = specsight.run(
        _spec([{"op": "skip", "site": "resid_post.{layer}"}], {"layer": "all"}), model=LM
    )

    def skip(_m, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    want = []
    for block in LAYERS:
        cells = []
        for row in ROWS:
            handle = block.register_forward_hook(skip, with_kwargs=True)
            try:
                cells.append(_ld(LM, row))
            finally:
                handle.remove()
        want.append(cells)
    _close(results["ld"], want)


@pytest.mark.parametrize(
    "op, sweep, expected",
    [
        (
            {"op": "clamp", "site": "mlp_act.1", "value": 1},
            None,
            "clamp sets chosen dims to a value",
        ),
        ({"op": "noise", "site": "embed"}, None, "give the noise's size"),
        (
            {"op": "noise", "site": "embed", "std": 1, "std_of": "clean"},
            None,
            "give the noise's size",
        ),
        (
            {"op": "zero", "site": "head_z.1", "heads": [0], "dims": [1]},
            None,
            "'dims' picks columns of a site without heads",
        ),
        (
            {"op": "zero", "site": "mlp_act.1", "dims": "100:200"},
            None,
            "dims '100:200' is outside 'mlp_act.1', which has width 128",
        ),
        ({"op": "skip", "site": "mlp_out.1"}, None, "'mlp_out.1' is not a layer's output"),
        (
            {"op": "mean_ablate", "site": "mlp_out.1", "from": "target"},
            None,
            "an invoke cannot read itself",
        ),
        (
            {"op": "mean_ablate", "site": "mlp_out.1", "from": "cleen"},
            None,
            "no invoke named 'cleen'",
        ),
        (
            {"op": "resample_ablate", "site": "mlp_out.1", "from": "one"},
            None,
            "both need the same two or more items",
        ),
        (
            {"op": "mean_ablate", "site": "mlp_out.1", "from": "swept"},
            None,
            "cannot mean_ablate from 'swept': it is swept",
        ),
    ],
)
def test_ablation_misuse_is_located(op, sweep, expected):
    spec = _spec([op], sweep)
    spec["invokes"]["one"] = {"prompt": "hello there"}
    spec["invokes"]["swept"] = {
        "prompt": "{clean}",
        "sweep": {"layer": "all"},
        "ops": [{"op": "zero", "site": "mlp_out.{layer}"}],
    }
    with pytest.raises(SpecError) as info:
        specsight.compile_plan(specsight.load_spec(spec), LM.info, LM.tokenizer)
    assert expected in str(info.value)
    assert "invokes.target.ops[0]" in str(info.value)


def test_saved_values_take_sweep_placeholders():
    refs = ["When Mary and John went to the store", "Tom and Anna went to the park"]
    value = {"saved": "ref/mlp_out.{layer}", "reduce": "mean"}
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {
            "ref": {"prompt": refs, "ops": [{"op": "save", "site": "mlp_out.*"}]},
            "abl": {
                "prompt": ROWS[0]["clean"],
                "sweep": {"layer": "all"},
                "ops": [{"op": "set", "site": "mlp_out.{layer}", "value": value}],
            },
        },
        "metrics": {
            "ld": {"kind": "logit_diff", "invoke": "abl", "target": " Mary", "foil": " John"}
        },
    }
    results = specsight.run(spec, model=LM)
    want = []
    for block in LAYERS:
        caps = [_capture(LM, {"clean": r, "io": " Mary", "s": " John"}, block.mlp) for r in refs]
        mean = torch.cat(caps).double().mean(0).float()
        n = len(LM.tokenizer.encode(ROWS[0]["clean"]))
        want.append(
            _ld(LM, ROWS[0], [(block.mlp, "post", _replace(range(n), lambda p, m=mean: m))])
        )
    _close(results["ld"], want)
    spec["invokes"]["abl"]["ops"][0]["value"]["saved"] = "ref/mlp_out.{layer}x"
    with pytest.raises(SpecError, match="no saved value named 'ref/mlp_out.{layer}x'"):
        specsight.run(spec, model=LM)


def test_a_project_out_file_is_inlined_for_a_server(tmp_path):
    import json

    import numpy as np
    import yaml

    from specsight.remote.submit import run_remote
    from tests.test_remote_client import URL, FakeServer, assert_same_tensors

    np.save(tmp_path / "dirs.npy", np.stack([np.linspace(-1, 1, 64), np.cos(np.arange(64))]))
    spec = _spec([{"op": "project_out", "site": "resid_post.1", "vectors": {"file": "dirs.npy"}}])
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    fake = FakeServer()
    with fake.client() as client:
        remote = run_remote(path, URL, client=client)
    assert_same_tensors(remote, specsight.run(path, model=LM))
    sent = json.loads(fake.posts()[0].content)["spec"]["invokes"]["target"]["ops"][0]["vectors"]
    assert np.allclose(sent, np.stack([np.linspace(-1, 1, 64), np.cos(np.arange(64))]))
