"""Python functions in ``specsight.run``: a ``python`` metric of each row's logits and a
``python`` op on a site's values, checked against the model called directly and against the
built-in kinds doing the same thing; called once per forward (batched), not per row; refused,
with a located message saying why, when not given, on the command line and by servers."""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner

import specsight
from specsight.cli import main
from specsight.errors import RunError, SpecError
from tests.conftest import CLEAN, CORRUPT, tiny

PROMPTS = [CLEAN, CORRUPT, "Hello there, my friend", "The cat sat on the"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(-1)
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def _spec(ops=(), metrics=None, sweep=None) -> dict:
    invoke = {"prompt": PROMPTS, "ops": list(ops)}
    if sweep:
        invoke["sweep"] = sweep
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": invoke},
        "metrics": metrics or {},
    }


def test_a_python_metric_is_the_function_of_each_rows_logits():
    lm = tiny()
    metrics = {"h": {"kind": "python", "fn": "entropy", "invoke": "a", "position": -2}}
    results = specsight.run(_spec(metrics=metrics), model=lm, functions={"entropy": entropy})
    for i, prompt in enumerate(PROMPTS):
        with torch.inference_mode():
            logits = lm.model(torch.tensor([lm.tokenizer.encode(prompt)])).logits[0, -2].float()
        assert float(results["h"][i]) == pytest.approx(float(entropy(logits[None])[0]), rel=1e-5)
    assert results.manifest["python"]["entropy"]["function"].endswith(".entropy")
    assert len(results.manifest["python"]["entropy"]["source_sha256"]) == 64


def test_a_python_metric_equals_the_built_in_metric_it_rewrites():
    target, foil = (tiny().tokenizer.encode_plain(t)[0] for t in (" Mary", " John"))
    metrics = {
        "mine": {"kind": "python", "fn": "ld", "invoke": "a", "reduce": "mean"},
        "theirs": {"kind": "logit_diff", "invoke": "a", "target": " Mary", "foil": " John", "reduce": "mean"},
    }  # fmt: skip
    ops = [{"op": "zero", "site": "mlp_out.{layer}", "positions": [-1]}]
    results = specsight.run(
        _spec(ops, metrics, sweep={"layer": "all"}),
        model=tiny(),
        functions={"ld": lambda logits: logits[:, target] - logits[:, foil]},
    )
    for part in ("", "/stderr", "/items"):
        torch.testing.assert_close(results["mine" + part], results["theirs" + part])


def test_a_python_op_equals_the_built_in_op_it_rewrites_and_runs_once_per_forward():
    calls: list[tuple[int, ...]] = []

    def halve(values: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(values.shape))
        return values * 0.5

    measured = {"p": {"kind": "prob", "invoke": "a", "token": " Mary"}}
    sweep = {"layer": "all"}
    mine = specsight.run(
        _spec([{"op": "python", "fn": "halve", "site": "mlp_out.{layer}", "positions": [-1, 2]}], measured, sweep),
        model=tiny(),
        functions={"halve": halve},
    )  # fmt: skip
    theirs = specsight.run(
        _spec([{"op": "scale", "factor": 0.5, "site": "mlp_out.{layer}", "positions": [-1, 2]}], measured, sweep),
        model=tiny(),
    )  # fmt: skip
    torch.testing.assert_close(mine["p"], theirs["p"], rtol=0, atol=0)
    forwards = mine.manifest["plan"]["forwards"]
    rows = 4 * len(PROMPTS)  # four layers x four prompts
    assert len(calls) <= forwards * 4 < rows * 2  # one call per site per forward, never per row
    assert sum(shape[0] for shape in calls) == rows * 2  # every (row, position) pair once
    assert all(shape[1] == 64 for shape in calls)


def test_a_python_op_on_heads_sees_only_their_columns():
    seen = []

    def negate(values):
        seen.append(values.shape[-1])
        return -values

    ops = [{"op": "python", "fn": "negate", "site": "head_z.1", "heads": [1], "positions": [-1]}]
    same = [{"op": "scale", "factor": -1.0, "site": "head_z.1", "heads": [1], "positions": [-1]}]
    measured = {"p": {"kind": "prob", "invoke": "a", "token": " Mary"}}
    mine = specsight.run(_spec(ops, measured), model=tiny(), functions={"negate": negate})
    theirs = specsight.run(_spec(same, measured), model=tiny())
    torch.testing.assert_close(mine["p"], theirs["p"], rtol=0, atol=0)
    assert set(seen) == {16}  # one head's head_dim


def test_a_function_not_given_is_a_located_spec_error(tmp_path):
    spec = _spec(metrics={"h": {"kind": "python", "fn": "entropy", "invoke": "a"}})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SpecError) as caught:
        specsight.run(path, model=tiny(), functions={"other": entropy})
    text = str(caught.value)
    assert (
        f"{path}:" in text
        and "metrics.h.fn" in text
        and "'entropy' names a Python function" in text
    )
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2 and "the command line and servers run no code" in result.output


def test_servers_refuse_python_functions():
    from specsight.remote import admission
    from specsight.remote.protocol import Limits

    spec = _spec([{"op": "python", "fn": "halve", "site": "mlp_out.0"}])
    with pytest.raises(SpecError, match="a server runs no code"):
        admission.prepare_job(spec, tiny(), Limits())
    with pytest.raises(SpecError, match="invokes.a.ops\\[0\\].fn"):
        admission.refuse_local_only(specsight.load_spec(spec), None)


def test_a_function_that_returns_the_wrong_shape_or_raises_is_a_run_error():
    metrics = {"h": {"kind": "python", "fn": "bad", "invoke": "a"}}
    with pytest.raises(RunError, match=r"returned shape \[4, 2\] for 4 rows"):
        specsight.run(_spec(metrics=metrics), model=tiny(), functions={"bad": lambda x: x[:, :2]})

    def broken(values):
        raise ValueError("no")

    ops = [{"op": "python", "fn": "broken", "site": "mlp_out.0"}]
    with pytest.raises(RunError, match="invokes.a.ops\\[0\\].*raised ValueError") as caught:
        specsight.run(_spec(ops), model=tiny(), functions={"broken": broken})
    assert isinstance(caught.value.__cause__, ValueError)  # the user's traceback is kept
    ops = [{"op": "python", "fn": "short", "site": "mlp_out.0"}]
    with pytest.raises(RunError, match="must return a tensor of their shape"):
        specsight.run(_spec(ops), model=tiny(), functions={"short": lambda v: v[:, :3]})


def test_a_python_metric_of_a_site_gets_the_values_the_rows_hold_there():
    """The site's values at the metric's position, checked against a hand-written hook."""
    lm = tiny()
    spec = _spec(metrics={"n": {"kind": "python", "fn": "norm", "invoke": "a", "site": "resid_post.2", "position": -3}})  # fmt: skip
    seen = []

    def norm(values):
        seen.append(tuple(values.shape))
        return values.norm(dim=-1)

    results = specsight.run(spec, model=lm, functions={"norm": norm})
    assert seen == [(len(PROMPTS), 64)]  # every row at once, after the run
    for i, prompt in enumerate(PROMPTS):
        kept = {}

        def keep(_module, _inputs, output, kept=kept):
            kept["h"] = (output[0] if isinstance(output, tuple) else output)[0, -3].clone()

        handle = lm.model.model.layers[2].register_forward_hook(keep)
        try:
            with torch.inference_mode():
                lm.model(torch.tensor([lm.tokenizer.encode(prompt)]))
        finally:
            handle.remove()
        assert float(results["n"][i]) == pytest.approx(float(kept["h"].norm()), rel=1e-5)
    bad = _spec(
        metrics={"n": {"kind": "python", "fn": "norm", "invoke": "a", "site": "resid_post.*"}}
    )
    with pytest.raises(SpecError, match="names 4 sites; a python metric reads one"):
        specsight.run(bad, model=lm, functions={"norm": norm})
