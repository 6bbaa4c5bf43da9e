"""Runs in shards: a plan's forwards split over shards, each run on its own (and its output sent
through the wire format), merge into exactly the output one ``execute`` of the plan gives;
plans that cannot be split say why; the merge refuses outputs that do not add up."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import specsight
from specsight.engine import (
    EngineOutput,
    execute,
    execute_shard,
    merge_shards,
    shard_from_bytes,
    shard_to_bytes,
)
from specsight.engine.reuse import UntouchedRuns
from specsight.plan import Forward, Plan, shard_forwards, shardable
from tests.conftest import CLEAN, CORRUPT, ioi_spec, tiny

ROOT = Path(__file__).resolve().parent.parent

#: prompts of CLEAN's 14 tokens, so the clean residual patches into every position
ITEMS = [
    {"p": CORRUPT, "io": " Mary", "s": " John"},
    {
        "p": "When John and Mary went to the store, Mary gave a drink to",
        "io": " John",
        "s": " Mary",
    },
    {"p": "When Mary and John went to the park, John gave a book to", "io": " Mary", "s": " John"},
    {"p": "When John and Mary went to the park, Mary gave a book to", "io": " John", "s": " Mary"},
    {
        "p": "When Mary and John went to the house, John gave a drink to",
        "io": " Mary",
        "s": " John",
    },
]
PATCH_CELL = (1, 2, 9)  # item, layer, position checked against hand-written hooks


def sweep_spec(model: str) -> dict:
    """Activation patching over items x layers x positions (280 cells), and an ablation sweep
    (mean ablation and seeded noise, 180 cells), with saves and every kind of metric that
    reads logits."""
    patch = {"op": "patch", "site": "resid_post.{layer}", "positions": ["{pos}"], "from": "clean"}
    reduce = {"stat": "mean", "ci": "bootstrap", "n_boot": 200, "level": 0.9, "seed": 3}
    return {
        "specsight": 1,
        "model": model,
        "dataset": ITEMS,
        "invokes": {
            "clean": {
                "prompt": CLEAN,
                "ops": [{"op": "save", "site": "resid_post.1", "name": "clean_resid"}],
            },
            "base": {"prompt": "{p}"},
            "swept": {
                "prompt": "{p}",
                "sweep": {"layer": "all", "pos": "all"},
                "ops": [
                    patch,
                    {"op": "save", "site": "resid_post.{layer}", "positions": [-1], "name": "last"},
                ],
            },
            "ablated": {
                "prompt": "{p}",
                "sweep": {"layer": "all", "pos": "5:14"},
                "ops": [
                    {
                        "op": "mean_ablate",
                        "site": "resid_pre.{layer}",
                        "positions": ["{pos}"],
                        "from": "clean",
                    },
                    {"op": "noise", "site": "resid_post.{layer}", "positions": [-2], "std": 0.1},
                ],
            },
        },
        "metrics": {
            "ld": {"kind": "logit_diff", "invoke": "swept", "target": "{io}", "foil": "{s}"},
            "base_ld": {"kind": "logit_diff", "invoke": "base", "target": "{io}", "foil": "{s}"},
            "clean_ld": {
                "kind": "logit_diff",
                "invoke": "clean",
                "target": " Mary",
                "foil": " John",
            },
            "rec": {"kind": "recovery", "patched": "ld", "clean": "clean_ld", "corrupt": "base_ld"},
            "p": {"kind": "prob", "invoke": "swept", "tokens": ["{io}"], "reduce": reduce},
            "top": {"kind": "top_k", "invoke": "swept", "k": 3},
            "ab": {"kind": "logprob", "invoke": "ablated", "tokens": ["{io}", "{s}"]},
            "kl": {"kind": "kl", "invoke": "ablated", "reference": "clean", "position": -3},
        },
    }


def compile_for(spec: dict, model: str, **options) -> Plan:
    lm = tiny(model)
    return specsight.compile_plan(specsight.load_spec(spec), lm.info, lm.tokenizer, **options)


@functools.cache
def compiled(model: str) -> tuple[Plan, EngineOutput]:
    """The sweep's plan (small forwards: many in the last stage) and its one-process output."""
    lm = tiny(model)
    plan = compile_for(sweep_spec(model), model, max_batch=8)
    return plan, execute(plan, lm.model, pad_id=lm.tokenizer.pad_id)


def run_shard(plan: Plan, model: str, forwards: tuple[int, ...]) -> bytes:
    lm = tiny(model)
    return shard_to_bytes(execute_shard(plan, lm.model, forwards, pad_id=lm.tokenizer.pad_id))


def assert_identical(one: EngineOutput, merged: EngineOutput) -> None:
    assert list(merged.metrics) == list(one.metrics)
    assert list(merged.saves) == list(one.saves)
    for kind in ("metrics", "saves"):
        for name, tensor in getattr(one, kind).items():
            assert torch.equal(getattr(merged, kind)[name], tensor), name
    assert merged.next_tokens == one.next_tokens


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_the_sweep_is_a_plan_worth_sharding(model):
    plan, one = compiled(model)
    assert shardable(plan) is None
    last = max(f.stage for f in plan.forwards)
    tail = [f for f in plan.forwards if f.stage == last]
    assert len(plan.rows) > 400 and len(tail) >= 10
    # forwards that read untouched runs, rows of several sequences in one of them
    assert any(f.from_base and len({plan.rows[r].tokens for r in f.rows}) > 1 for f in tail)
    assert {"ld", "rec", "p", "p/ci_low", "top", "top/ids", "ab", "kl"} <= set(one.metrics)
    assert set(one.saves) == {"clean_resid", "last"} and one.next_tokens
    for tensor in [*one.metrics.values(), *one.saves.values()]:
        assert not tensor.is_floating_point() or not tensor.isnan().any()  # equal means equal


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_shards_merge_into_exactly_one_run(model, n):
    plan, one = compiled(model)
    shards = shard_forwards(plan, n)
    assert len(shards) == n
    last = max(f.stage for f in plan.forwards)
    earlier = tuple(i for i, f in enumerate(plan.forwards) if f.stage < last)
    chunks = [s[len(earlier) :] for s in shards]
    assert all(s[: len(earlier)] == earlier and chunk for s, chunk in zip(shards, chunks))
    assert [i for chunk in chunks for i in chunk] == list(range(len(earlier), len(plan.forwards)))
    rows = [sum(len(plan.forwards[i].rows) for i in chunk) for chunk in chunks]
    assert max(rows) <= 2 * min(rows) + plan.max_batch * 4  # balanced by rows
    outputs = [shard_from_bytes(run_shard(plan, model, s)) for s in shards]
    assert_identical(one, merge_shards(plan, outputs[::-1]))  # in any order


def test_shards_give_the_hand_written_patch():
    """The merged cell is the clean residual patched in by a plain torch hook (and unreduced
    metrics merge too)."""
    model = "tiny-llama"
    plan, _ = compiled(model)
    lm = tiny(model)
    outputs = [shard_from_bytes(run_shard(plan, model, s)) for s in shard_forwards(plan, 3)]
    merged = merge_shards(plan, outputs)
    per_item = execute(plan, lm.model, pad_id=lm.tokenizer.pad_id, reduce=False)
    assert_identical(per_item, merge_shards(plan, outputs, reduce=False))
    item, layer, pos = PATCH_CELL
    block = lm.model.model.layers[layer]
    kept = {}

    def keep(_m, _a, out):
        kept["h"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    def patch(_m, _a, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        hidden[:, pos] = kept["h"][:, pos]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    with torch.inference_mode():
        for hook, prompt in ((keep, CLEAN), (patch, ITEMS[item]["p"])):
            handle = block.register_forward_hook(hook)
            try:
                logits = lm.model(torch.tensor([lm.tokenizer.encode(prompt)])).logits
            finally:
                handle.remove()
    io, s = (lm.tokenizer.encode_plain(ITEMS[item][k])[0] for k in ("io", "s"))
    expected = float(logits[0, -1, io] - logits[0, -1, s])
    assert plan.metrics[0].axes == ("layer", "pos", "item")
    assert abs(float(merged.metrics["ld"][layer, pos, item]) - expected) < 1e-4


def _batches(monkeypatch) -> list[tuple]:
    """Every batch of sequences whose untouched runs are computed, from now on."""
    seen: list[tuple] = []
    run = UntouchedRuns._run

    def record(self, sequences, device):
        seen.append(tuple(sequences))
        return run(self, sequences, device)

    monkeypatch.setattr(UntouchedRuns, "_run", record)
    return seen


def rechunked(plan: Plan, size: int) -> Plan:
    """``plan`` with the forwards that read untouched runs cut after every ``size`` rows of
    them (still right: a subset of a forward's rows starts no earlier), so that neighbouring
    forwards share some of their sequences but not all."""
    forwards: list[Forward] = []
    done = 0
    for f in plan.forwards:
        if not f.from_base:
            forwards.append(f)
            continue
        cuts = [0, *(i for i in range(1, len(f.rows)) if (done + i) % size == 0), len(f.rows)]
        forwards += [dataclasses.replace(f, rows=f.rows[a:b]) for a, b in zip(cuts, cuts[1:])]
        done += len(f.rows)
    return dataclasses.replace(plan, forwards=tuple(forwards))


def test_a_shard_reads_untouched_runs_from_the_batches_one_run_computes(monkeypatch):
    """12 sequences in forwards of about 3 rows: one run computes untouched runs in batches that
    depend on the forwards before, and evicts and recomputes them (it keeps 7); each shard
    computes the very same batches, and its results are bit-identical."""
    model = "tiny-llama"
    lm = tiny(model)
    names = [("Mary", "John"), ("John", "Mary")]
    items = [
        {"p": f"When {a} and {b} went to the {place}, {c} gave a {obj} to", "io": f" {a}"}
        for (a, b), c, place in itertools.product(names, ["Mary", "John"], ["store", "park"])
        for obj in (["drink", "book"] if place == "store" else ["drink"])
    ]
    assert len(items) == 12 and len({len(lm.tokenizer.encode(i["p"])) for i in items}) == 1
    spec = sweep_spec(model)
    spec["dataset"] = items
    del spec["invokes"]["ablated"], spec["invokes"]["base"]
    spec["metrics"] = {"p": {"kind": "prob", "invoke": "swept", "tokens": ["{io}"]}}
    plan = rechunked(compile_for(spec, model, max_batch=8), 3)
    assert shardable(plan) is None
    seen = _batches(monkeypatch)
    one = execute(plan, lm.model, pad_id=lm.tokenizer.pad_id)
    batches = set(seen)
    assert len(seen) > 12  # evicted runs are computed again
    shards = shard_forwards(plan, 4)
    outputs = []
    for forwards in shards:
        seen.clear()
        outputs.append(shard_from_bytes(run_shard(plan, model, forwards)))
        assert seen and set(seen) <= batches
    assert_identical(one, merge_shards(plan, outputs))
    # without the replay, later shards would batch their first sequences otherwise
    monkeypatch.setattr(UntouchedRuns, "replay", lambda self, forwards: None)
    naive = set()
    for forwards in shards:
        seen.clear()
        run_shard(plan, model, forwards)
        naive |= set(seen)
    assert naive - batches


def test_a_shard_run_in_another_process_merges_exactly(tmp_path):
    """Shards from fresh processes, given the plan as JSON (as a server would be)."""
    model = "tiny-gpt2"
    plan, one = compiled(model)
    (tmp_path / "plan.json").write_text(plan.to_json())
    shards = shard_forwards(plan, 2)
    script = (
        "import sys; from pathlib import Path\n"
        "from specsight.engine import execute_shard, shard_to_bytes\n"
        "from specsight.plan import Plan\n"
        "from tests.conftest import tiny\n"
        "folder = Path(sys.argv[1]); forwards = [int(i) for i in sys.argv[2].split(',')]\n"
        "plan = Plan.from_json((folder / 'plan.json').read_text())\n"
        f"lm = tiny({model!r})\n"
        "out = execute_shard(plan, lm.model, forwards, pad_id=lm.tokenizer.pad_id)\n"
        "(folder / sys.argv[3]).write_bytes(shard_to_bytes(out))\n"
    )
    running = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), ",".join(map(str, forwards)), str(i)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for i, forwards in enumerate(shards)
    ]
    assert [process.wait(timeout=300) for process in running] == [0] * len(shards)
    outputs = [shard_from_bytes((tmp_path / str(i)).read_bytes()) for i in range(len(shards))]
    assert_identical(one, merge_shards(plan, outputs))


def test_merge_refuses_outputs_that_do_not_add_up():
    model = "tiny-llama"
    plan, _ = compiled(model)
    shards = shard_forwards(plan, 2)
    first, second = (shard_from_bytes(run_shard(plan, model, s)) for s in shards)
    with pytest.raises(ValueError, match="no shard ran forwards"):
        merge_shards(plan, [first])
    other = dataclasses.replace(plan, seed=plan.seed + 1)
    with pytest.raises(ValueError, match="must come from this plan"):
        merge_shards(other, [first, second])
    second.values["clean_ld"] = second.values["clean_ld"] + 1  # rows both shards ran
    with pytest.raises(ValueError, match="shards disagree on metric 'clean_ld'"):
        merge_shards(plan, [first, second])
    with pytest.raises(ValueError, match="not a shard output"):
        shard_from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")


def test_a_shard_runs_every_earlier_forward_and_an_eval_model():
    model = "tiny-llama"
    plan, _ = compiled(model)
    lm = tiny(model)
    last = max(f.stage for f in plan.forwards)
    tail = [i for i, f in enumerate(plan.forwards) if f.stage == last]
    with pytest.raises(ValueError, match="every forward of the earlier stages"):
        execute_shard(plan, lm.model, tail, pad_id=lm.tokenizer.pad_id)
    lm.model.train(True)
    try:
        with pytest.raises(specsight.RunError, match="training mode"):
            execute_shard(plan, lm.model, shard_forwards(plan, 2)[0], pad_id=lm.tokenizer.pad_id)
    finally:
        lm.model.train(False)
    assert shard_forwards(plan, 1) == [tuple(range(len(plan.forwards)))]
    assert len(shard_forwards(plan, 10_000)) == len(tail)


def test_shardable_says_why_not():
    model = "tiny-llama"
    generating = {
        "specsight": 1,
        "model": model,
        "invokes": {"g": {"prompt": [CLEAN, CORRUPT], "generate": {"max_new_tokens": 3}}},
        "metrics": {},
    }
    assert "generates" in shardable(compile_for(generating, model, max_batch=1))
    backward = {
        "specsight": 1,
        "model": model,
        "invokes": {"x": {"prompt": CLEAN, "ops": [{"op": "save", "site": "embed", "grad": True}]}},
        "metrics": {"ld": {"kind": "logit_diff", "invoke": "x", "target": 5, "foil": 7}},
        "backward": {"metric": "ld"},
    }
    assert "backward pass" in shardable(compile_for(backward, model))
    lens = {
        "specsight": 1,
        "model": model,
        "invokes": {"a": {"prompt": [CLEAN, CORRUPT]}},
        "metrics": {"lens": {"kind": "logit_lens", "invoke": "a", "site": "resid_post.*", "k": 3}},
    }
    assert "logit_lens" in shardable(compile_for(lens, model, max_batch=1))
    one_forward = compile_for(ioi_spec(model, sweep={"layer": "all", "pos": [9]}), model)
    assert "nothing to split" in shardable(one_forward)
    with pytest.raises(ValueError, match="cannot run in shards"):
        shard_forwards(one_forward, 2)
    # the sources of the last stage's patches, mean ablations and kl references must come
    # from earlier stages: a plan with every forward in one stage has them in the same one
    plan, _ = compiled(model)
    flat = dataclasses.replace(
        plan, forwards=tuple(dataclasses.replace(f, stage=0) for f in plan.forwards)
    )
    assert "which the last stage writes" in shardable(flat)
    kl_only = sweep_spec(model)
    del kl_only["invokes"]["swept"]
    kl_only["invokes"]["ablated"]["sweep"] = {"layer": "all"}
    kl_only["invokes"]["ablated"]["ops"] = [{"op": "zero", "site": "mlp_out.{layer}"}]
    kl_only["metrics"] = {"kl": kl_only["metrics"]["kl"]}
    kl_plan = compile_for(kl_only, model, max_batch=4)
    assert shardable(kl_plan) is None
    flat = dataclasses.replace(
        kl_plan, forwards=tuple(dataclasses.replace(f, stage=0) for f in kl_plan.forwards)
    )
    assert "kl metric 'kl'" in shardable(flat)


def test_execute_is_unchanged_by_the_split_into_halves():
    """execute is run_forwards then build_output; its output still matches a plain forward."""
    model = "tiny-llama"
    lm = tiny(model)
    spec = {
        "specsight": 1,
        "model": model,
        "invokes": {"a": {"prompt": CLEAN, "ops": [{"op": "save", "site": "logits"}]}},
        "metrics": {},
    }
    out = execute(compile_for(spec, model, max_batch=4), lm.model, pad_id=lm.tokenizer.pad_id)
    with torch.inference_mode():
        plain = lm.model(input_ids=torch.tensor([lm.tokenizer.encode(CLEAN)])).logits[0]
    assert torch.equal(out.saves["a/logits"], plain)
