"""The plan's transforms keep each part's meaning, for every kind: N jobs merged into shared
forwards give each job what it gives alone (fp32 within 1e-6, token ids equal), for every op
kind and every metric kind and every pair of them; a job's results do not change when another
job's spec does; blocks of items and shards give what one plan gives. The references are the
jobs run alone (a plan alone is checked against hand-written hooks elsewhere)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

import specsight
from specsight.compile import Budget, compile_plan
from specsight.engine import EngineOutput, Executor, given_functions, merge_shards
from specsight.plan import Op, merge_plans, metric_kind, shard_forwards, shardable
from specsight.plan.codec import kinds_of
from specsight.spec import METRIC_KINDS
from tests.conftest import CLEAN, CORRUPT, tiny
from tests.sae_reference import tiny_sae

MODEL = "tiny-llama"
#: two random SAEs that jobs name alike ('s'): merged jobs must each keep their own
SAES = {seed: str(tiny_sae(Path(tempfile.mkdtemp()) / "sae", seed=seed)) for seed in (1, 2)}
#: prompts of one token length (14 on the tiny tokenizer), with the names at 1, 3 and 9
PROMPTS = [
    CLEAN,
    CORRUPT,
    "When John and Mary went to the store, Mary gave a drink to",
    "When John and Mary went to the store, John gave a drink to",
]
LD = {"kind": "logit_diff", "target": " Mary", "foil": " John"}


def _job(ops: list[dict], *, clean: int = 0, corrupt: int = 1, metrics: dict | None = None,
         **extra: Any) -> dict[str, Any]:  # fmt: skip
    """A job: a clean and a corrupted prompt, ``ops`` on the corrupted one, its logit
    difference and a save of the residual stream."""
    spec = {
        "specsight": 1,
        "model": MODEL,
        "invokes": {
            "clean": {"prompt": PROMPTS[clean]},
            "corrupt": {
                "prompt": PROMPTS[corrupt],
                "ops": [*ops, {"op": "save", "site": "resid_post.1", "name": "resid"}],
            },
        },
        "metrics": {"ld": {**LD, "invoke": "corrupt"}, **(metrics or {})},
    }
    spec.update(extra)
    return spec


def _vector(width: int = 64, scale: float = 0.1) -> list[float]:
    return [scale * ((i % 7) - 3) for i in range(width)]


#: one job per op kind of the spec (and so of every op kind of the plan)
OP_JOBS: dict[str, dict[str, Any]] = {
    "zero": _job([{"op": "zero", "site": "mlp_out.0", "positions": [9]}]),
    "scale": _job([{"op": "scale", "site": "attn_out.1", "positions": "all", "factor": 0.5}]),
    "add": _job([{"op": "add", "site": "resid_post.0", "positions": [13], "vector": _vector()}]),
    "set": _job([{"op": "set", "site": "resid_post.0", "positions": [13], "value": _vector()}]),
    "patch": _job([{"op": "patch", "site": "resid_post.0", "positions": [9], "from": "clean"}]),
    "clamp": _job([{"op": "clamp", "site": "mlp_act.1", "dims": [0, 3], "value": 2.0}]),
    "skip": _job([{"op": "skip", "site": "resid_post.1", "positions": "all"}]),
    "project_out": _job(
        [{"op": "project_out", "site": "resid_mid.1", "vectors": [_vector(), _vector(scale=-0.2)]}]
    ),
    "noise": _job([{"op": "noise", "site": "embed", "positions": [1, 3], "std": 0.5, "seed": 4}]),
    "noise_std_of": _job(
        [{"op": "noise", "site": "embed", "positions": [1], "std_of": "clean", "scale": 2}]
    ),
    "mean_ablate": _job([{"op": "mean_ablate", "site": "mlp_out.1", "from": "clean"}]),
    "python": _job([{"op": "python", "site": "mlp_out.0", "positions": [9, 13], "fn": "shift"}]),
}
OP_JOBS["sae"] = _job(
    [{"op": "zero", "site": "sae.s.features", "positions": [13], "dims": "0:20"}],
    saes={"s": {"path": SAES[1], "site": "resid_post.1"}},
)
OP_JOBS["saved"] = _job([])
OP_JOBS["saved"]["invokes"]["clean"]["ops"] = [
    {"op": "save", "site": "resid_post.0", "positions": [9], "name": "kept"}
]
OP_JOBS["saved"]["invokes"]["corrupt"]["ops"][:0] = [
    {"op": "add", "site": "resid_post.0", "positions": [9], "vector": {"saved": "kept"}},
    {"op": "set", "site": "resid_post.1", "positions": [9], "value": {"saved": "kept"}},
]
OP_JOBS["mean_diff"] = _job([])
OP_JOBS["mean_diff"]["invokes"]["clean"]["ops"] = [
    {"op": "save", "site": "resid_post.0", "positions": [9], "name": "kp"},
    {"op": "save", "site": "resid_post.0", "positions": [2, 13], "name": "kn"},
]
OP_JOBS["mean_diff"]["invokes"]["corrupt"]["ops"][:0] = [
    {"op": "add", "site": "resid_post.0", "positions": [9], "vector": {"mean_diff": ["kp", "kn"], "norm": "match_site"}},
]  # fmt: skip
OP_JOBS["resample_ablate"] = _job([])
OP_JOBS["resample_ablate"]["invokes"]["clean"]["prompt"] = PROMPTS[:3]
OP_JOBS["resample_ablate"]["invokes"]["corrupt"]["prompt"] = PROMPTS[1:4]
OP_JOBS["resample_ablate"]["invokes"]["corrupt"]["ops"][:0] = [
    {"op": "resample_ablate", "site": "mlp_out.0", "positions": [9], "from": "clean", "seed": 1}
]
OP_JOBS["grad"] = _job(
    [{"op": "save", "site": "resid_post.0", "positions": [9, 13], "grad": True}],
    backward={"metric": "ld"},
)
OP_JOBS["generate"] = _job([{"op": "add", "site": "resid_post.1", "positions": "last",
                             "vector": _vector(), "steps": "all"}])  # fmt: skip
OP_JOBS["generate"]["invokes"]["corrupt"]["generate"] = {"max_new_tokens": 3}
OP_JOBS["generate"]["metrics"] = {"clean_ld": {**LD, "invoke": "clean"}}
OP_JOBS["path_patch"] = _job([{"op": "path_patch", "senders": ["head.0.1", "mlp.0"],
                               "receivers": ["head.2.1.q", "mlp.1", "logits"], "from": "clean",
                               "base": "unpatched"}])  # fmt: skip
OP_JOBS["path_patch"]["invokes"]["unpatched"] = {"prompt": PROMPTS[1]}
OP_JOBS["sweep"] = _job(
    [{"op": "patch", "site": "resid_post.{layer}", "positions": ["{pos}"], "from": "clean"}]
)
OP_JOBS["sweep"]["invokes"]["corrupt"]["sweep"] = {"layer": "all", "pos": [9, 12, 13]}
OP_JOBS["sweep"]["invokes"]["corrupt"]["ops"].pop()  # a save of one site per cell: none

#: what circuit metrics read: the clean and corrupt invokes, and the logit difference
CIRCUIT = {"clean": "clean", "corrupt": "corrupt", "target": " Mary", "foil": " John"}
#: one job per metric kind
METRIC_JOBS: dict[str, dict[str, Any]] = {
    "logits": _job(
        [], metrics={"m": {"kind": "logits", "invoke": "corrupt", "tokens": [" Mary", 7]}}
    ),
    "logprob": _job([], metrics={"m": {"kind": "logprob", "invoke": "clean", "token": " Mary"}}),
    "prob": _job(
        [], metrics={"m": {"kind": "prob", "invoke": "corrupt", "token": 5, "position": 9}}
    ),
    "accuracy": _job([], metrics={"m": {"kind": "accuracy", "invoke": "clean", "target": " Mary"}}),
    "top_k": _job([], metrics={"m": {"kind": "top_k", "invoke": "corrupt", "k": 4}}),
    "kl": _job(
        [{"op": "zero", "site": "mlp_out.1"}],
        metrics={"m": {"kind": "kl", "invoke": "corrupt", "reference": "clean"}},
    ),
    "loss": _job([], metrics={"m": {"kind": "loss", "invoke": "clean"}}),
    "python": _job([], metrics={"m": {"kind": "python", "invoke": "corrupt", "fn": "margin"}}),
    "logit_lens": _job(
        [], metrics={"m": {"kind": "logit_lens", "invoke": "corrupt", "token": " Mary", "k": 3}}
    ),
    "edge_attribution": _job(
        [],
        metrics={"m": {"kind": "edge_attribution", **CIRCUIT, "method": "eap_ig", "steps": 2}},
    ),
    "faithfulness": _job(
        [],
        metrics={
            "e": {"kind": "edge_attribution", **CIRCUIT},
            "m": {"kind": "faithfulness", **CIRCUIT, "circuit": {"top": [3, 40], "from": "e"}},
        },
    ),
    "dla": _job(
        [{"op": "zero", "site": "head_z.1", "heads": [2], "positions": [13]}],
        metrics={"m": {"kind": "dla", "invoke": "corrupt", "target": " Mary", "foil": " John"}},
    ),
    "attribution": _job(
        [],
        metrics={
            "m": {
                "kind": "attribution",
                "clean": "clean",
                "corrupt": "corrupt",
                "target": " Mary",
                "foil": " John",
            }
        },  # fmt: skip
    ),
    "recovery": _job(
        [{"op": "patch", "site": "resid_post.{layer}", "positions": [9], "from": "clean"}],
        metrics={
            "clean_ld": {**LD, "invoke": "clean"},
            "base_ld": {**LD, "invoke": "base"},
            "ld_effect": {**LD, "invoke": "corrupt", "baseline": "base_ld"},
            "m": {"kind": "recovery", "patched": "ld", "clean": "clean_ld", "corrupt": "base_ld"},
        },
    ),
}
METRIC_JOBS["probe"] = _job(
    [],
    # l2 1.0: a well-posed fit, whose weights move as little as the activations do between a
    # merged run and a lone one (with 1e-3 these few separable items leave them ill-determined)
    metrics={
        "m": {
            "kind": "probe",
            "invoke": "items",
            "site": "resid_post.0:2",
            "label": "{y}",
            "l2": 1.0,
        }
    },  # fmt: skip
)
# items that end in different words: raw-space probe weights are the standardised ones over
# each feature's spread across the items, so features that barely vary (the same last token)
# would turn last-bit differences between a merged and a lone run into large ones
WORDS = ["red apple", "blue sky", "a green frog", "the dark night", "cold water", "big house",
         "small bird", "warm bread"]  # fmt: skip
METRIC_JOBS["probe"]["dataset"] = {"rows": [{"t": t, "y": i % 2} for i, t in enumerate(WORDS)]}
METRIC_JOBS["probe"]["invokes"]["items"] = {"prompt": "{t}"}
METRIC_JOBS["top_features"] = _job(
    [{"op": "scale", "site": "sae.s.error", "positions": [13], "factor": 0.5}],
    metrics={"m": {"kind": "top_features", "invoke": "corrupt", "sae": "s", "k": 4}},
    saes={"s": {"path": SAES[2], "site": "resid_post.1"}},
)
METRIC_JOBS["logit_diff"] = METRIC_JOBS["recovery"]
METRIC_JOBS["recovery"]["invokes"]["base"] = {"prompt": PROMPTS[1]}
METRIC_JOBS["recovery"]["invokes"]["corrupt"]["sweep"] = {"layer": "all"}
METRIC_JOBS["recovery"]["invokes"]["corrupt"]["ops"].pop()
JOBS = {**{f"op:{k}": v for k, v in OP_JOBS.items()}, **{f"metric:{k}": v for k, v in METRIC_JOBS.items()}}  # fmt: skip


#: the Python functions the python jobs name: a shift of a site's values, a top-2 margin
FUNCTIONS = {
    "shift": lambda values: values * 0.5 + 0.25,
    "margin": lambda logits: logits.topk(2, dim=-1).values.diff(dim=-1)[:, 0],
}


@pytest.fixture(autouse=True)
def _functions():
    """Every test here runs with the python jobs' functions given (as specsight.run does)."""
    with given_functions(FUNCTIONS):
        yield


def _plan(spec: dict[str, Any], max_batch: int = 16, **budget: Any):
    lm = tiny(MODEL)
    spec = specsight.load_spec(copy.deepcopy(spec))
    budget = Budget(max_batch=max_batch, **budget)
    return compile_plan(spec, lm.info, lm.tokenizer, budget=budget)


def _executor() -> Executor:
    lm = tiny(MODEL)
    return Executor(lm.model, pad_id=lm.tokenizer.pad_id)


def _variant(job: dict[str, Any]) -> dict[str, Any]:
    """The job on the other prompts (each prompt swapped for the one two places on), so that a
    job that read another's rows would read other values."""
    spec = copy.deepcopy(job)
    for row in spec.get("dataset", {}).get("rows", []):  # a dataset's own prompts move too
        texts = WORDS if row["t"] in WORDS else PROMPTS
        row["t"] = texts[(texts.index(row["t"]) + 2) % len(texts)]
    for invoke in spec["invokes"].values():
        if invoke["prompt"] == "{t}":
            continue
        prompts = invoke["prompt"] if isinstance(invoke["prompt"], list) else [invoke["prompt"]]
        moved = [PROMPTS[(PROMPTS.index(p) + 2) % len(PROMPTS)] for p in prompts]
        invoke["prompt"] = moved if isinstance(invoke["prompt"], list) else moved[0]
    return spec


PLANS = {name: _plan(spec) for name, spec in JOBS.items()}
PLANS.update({f"{name}'": _plan(_variant(spec)) for name, spec in JOBS.items()})
ALONE: dict[str, EngineOutput] = {}


def _alone(name: str) -> EngineOutput:
    if name not in ALONE:
        ALONE[name] = _executor().run(PLANS[name])
    return ALONE[name]


def assert_same(got: EngineOutput, want: EngineOutput, tol: float = 1e-6) -> None:
    """The same tensors (floats within ``tol``, relative and absolute; ids exactly), next
    tokens and generated ids."""
    for table in ("metrics", "saves"):
        mine, theirs = getattr(got, table), getattr(want, table)
        assert mine.keys() == theirs.keys(), table
        for name, tensor in theirs.items():
            if tensor.is_floating_point():
                # float32 resolves a value to its tensor's largest magnitude (probe weights ~20)
                scale = max(1.0, float(tensor.nan_to_num().abs().max())) if tensor.numel() else 1.0
                torch.testing.assert_close(mine[name], tensor, rtol=tol, atol=tol * scale, equal_nan=True, msg=name)  # fmt: skip
            else:
                assert torch.equal(mine[name], tensor), name
    assert got.generated == want.generated
    assert got.next_tokens.keys() == want.next_tokens.keys()
    for row, (ids, probs) in want.next_tokens.items():
        assert got.next_tokens[row][0] == ids
        torch.testing.assert_close(torch.tensor(got.next_tokens[row][1]), torch.tensor(probs), rtol=tol, atol=tol)  # fmt: skip


def test_the_jobs_cover_every_op_kind_and_every_metric_kind():
    ops = {type(op).kind for plan in PLANS.values() for op in plan.ops}
    assert ops == set(kinds_of(Op))
    metrics = {type(m).kind for plan in PLANS.values() for m in plan.metrics}
    assert metrics == set(METRIC_KINDS) == {metric_kind(k).kind for k in METRIC_KINDS}
    assert any(plan.backward for plan in PLANS.values())
    assert any(any(True for _ in plan.generating()) for plan in PLANS.values())


def test_every_job_merged_with_every_other_gives_what_it_gives_alone():
    names = [name + ("'" if i % 2 else "") for i, name in enumerate(JOBS)]
    outs = _executor().run_merged([PLANS[n] for n in names])
    for name, out in zip(names, outs):
        assert_same(out, _alone(name))


@pytest.mark.parametrize("first", list(JOBS))
def test_every_pair_of_kinds_merged_gives_each_what_it_gives_alone(first):
    executor = _executor()
    for second in JOBS:
        if second == first:
            continue
        a, b = executor.run_merged([PLANS[first], PLANS[second + "'"]])
        assert_same(a, _alone(first))
        assert_same(b, _alone(second + "'"))


def test_a_job_does_not_change_when_another_jobs_spec_changes():
    """The same job beside two versions of another (other prompts, reference, ops): its results
    stay what it gives alone, and the other job never reads its rows."""
    base = METRIC_JOBS["kl"]
    other = copy.deepcopy(base)
    other["invokes"]["clean"]["prompt"] = PROMPTS[2]
    other["invokes"]["corrupt"]["prompt"] = PROMPTS[3]
    other["invokes"]["corrupt"]["ops"] = [{"op": "scale", "site": "mlp_out.0", "factor": 3.0}]
    plans = [_plan(base), _plan(other)]
    executor = _executor()
    first, second = executor.run_merged(plans)
    assert_same(first, executor.run(plans[0]))
    assert_same(second, executor.run(plans[1]))
    # the two kl values differ: each read its own reference row
    assert not torch.allclose(first.metrics["m"], second.metrics["m"])


def test_the_variants_differ_from_their_jobs():
    """Each pair holds a job and another job's variant: their values differ, so reading the
    wrong rows would show."""
    for name in JOBS:
        mine, theirs = _alone(name), _alone(name + "'")
        metric = "ld" if "ld" in mine.metrics else "clean_ld"
        assert not torch.allclose(mine.metrics[metric], theirs.metrics[metric]), name


def test_merged_names_and_rows_are_kept_apart():
    merged, parts = merge_plans([PLANS["metric:kl"], PLANS["metric:kl"]])
    assert [p.tag for p in parts] == ["j0:", "j1:"]
    for metric in merged.metrics:
        part = next(p for p in parts if p.own(metric.name))
        assert metric.invoke.startswith(part.tag)
        assert all(r in part.rows for r in metric.rows)
        assert all(r in part.rows for r, _ in metric.reference_reads())
    for op in merged.ops:
        part = next(p for p in parts if op.row in p.rows)
        assert all(k.startswith(part.tag) for k in (*op.reads(), op.stores() or part.tag))


def test_plans_round_trip_through_json_with_their_reference_types():
    from specsight.plan import Plan
    from specsight.plan.refs import Name, RowRef, Rows

    for name, plan in PLANS.items():
        again = Plan.from_json(plan.to_json())
        assert again == plan, name
        assert again.to_json() == plan.to_json(), name
        for op in again.ops:
            assert type(op.row) is RowRef
            assert all(isinstance(k, Name) for k in op.reads())
        for forward in again.forwards:
            assert type(forward.rows) is Rows


# --- blocks and shards against one plan -----------------------------------------------------

ITEMS = [
    {"c": PROMPTS[i], "k": PROMPTS[j], "io": io, "s": s}
    for (i, j, io, s) in [(0, 1, " Mary", " John"), (3, 2, " John", " Mary")] * 3
]


def _over_items(job: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(job)
    spec["dataset"] = {"rows": ITEMS}
    for invoke in spec["invokes"].values():
        if invoke["prompt"] in PROMPTS[:2]:
            invoke["prompt"] = "{c}" if invoke["prompt"] == PROMPTS[0] else "{k}"
    for metric in spec["metrics"].values():
        for field in ("target", "foil"):
            if metric.get(field) in (" Mary", " John"):
                metric[field] = "{io}" if metric[field] == " Mary" else "{s}"
    return spec


#: the jobs whose items do not read each other, over a dataset
BLOCKABLE = [
    name
    for name in JOBS
    if specsight.compile.why_one_plan(specsight.load_spec(_over_items(JOBS[name]))) is None
    and "attribution" not in name
]


@pytest.mark.parametrize("name", BLOCKABLE)
def test_blocks_give_what_one_plan_gives(name):
    lm = tiny(MODEL)
    spec = _over_items(JOBS[name])
    one = specsight.run(copy.deepcopy(spec), model=lm, functions=FUNCTIONS)
    blocked = specsight.run(
        spec, model=lm, block_rows=len(PLANS[name].rows) + 1, functions=FUNCTIONS
    )
    assert blocked.manifest["plan"]["blocks"] > 1
    for key, tensor in one.tensors.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(blocked[key], tensor, rtol=1e-6, atol=1e-6, equal_nan=True)
        else:
            assert torch.equal(blocked[key], tensor), key


def _many(job: dict[str, Any]) -> dict[str, Any]:
    """The job with four corrupted prompts (where it has one): rows for several forwards."""
    spec = copy.deepcopy(job)
    corrupt = spec["invokes"]["corrupt"]
    paired = ("attribution", "edge_attribution", "faithfulness")  # clean and corrupt, one each
    one_prompt = any(m.get("kind") in paired for m in spec["metrics"].values())
    if isinstance(corrupt["prompt"], str) and not one_prompt:
        corrupt["prompt"] = [PROMPTS[1], PROMPTS[3], PROMPTS[2], PROMPTS[1]]
        if "unpatched" in spec["invokes"]:  # a path_patch's unpatched run: the same prompts
            spec["invokes"]["unpatched"]["prompt"] = corrupt["prompt"]
    return spec


#: plans of two rows a forward: every kind that can split has several forwards in its last
#: stage to split
SMALL = {name: _plan(_many(spec), max_batch=2) for name, spec in JOBS.items()}
SHARDABLE = [name for name, plan in SMALL.items() if shardable(plan) is None]


@pytest.mark.parametrize("name", SHARDABLE)
def test_shards_give_what_one_plan_gives(name):
    plan = SMALL[name]
    executor = _executor()
    outputs = [executor.run_shard(plan, s) for s in shard_forwards(plan, 3)]
    assert_same(merge_shards(plan, outputs), executor.run(plan), tol=0)


def test_only_kinds_that_cannot_split_are_refused_by_shards():
    refused = {name: shardable(plan) for name, plan in SMALL.items() if name not in SHARDABLE}
    reasons = ("generates", "backward pass", "reads stored values", "forwards of its own")
    assert all(any(r in why for r in reasons) for why in refused.values()), refused
    assert set(refused) == {
        "op:grad",
        "op:generate",
        "metric:logit_lens",
        "metric:dla",
        "metric:probe",
        "metric:top_features",
        "metric:attribution",
        "metric:edge_attribution",
        "metric:faithfulness",
    }


# --- hooks never outlive a run ----------------------------------------------------------------


class _Stop(Exception):
    pass


def _state(model: torch.nn.Module) -> tuple:
    """What a run must leave as it was: every hook, every module's own attributes (a replaced
    ``forward``), parameters' gradient flags and training modes."""
    return (
        [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],  # fmt: skip
        [sorted(k for k in vars(m) if not k.startswith("_")) for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
    )


@pytest.mark.parametrize("where", ["after a forward", "inside a forward"])
@pytest.mark.parametrize("name", list(JOBS))
def test_a_run_that_raises_leaves_the_model_as_it_was(name, where):
    lm = tiny(MODEL)
    before = _state(lm.model)
    handle = None
    if where == "after a forward":

        def stop(*_: Any) -> None:
            raise _Stop

        executor = Executor(lm.model, pad_id=lm.tokenizer.pad_id, progress=stop)
    else:  # the last layer fails while the run's hooks are on every other module

        def fail(*_: Any) -> None:
            raise _Stop

        handle = lm.model.model.layers[-1].register_forward_pre_hook(fail)
        executor = _executor()
    try:
        with pytest.raises(_Stop):
            executor.run(SMALL[name])
    finally:
        if handle is not None:
            handle.remove()
    assert _state(lm.model) == before


def test_reusing_untouched_runs_changes_no_module_of_the_model():
    """Forwards that start at a late layer run the layers below on one row; no layer's
    ``forward`` is replaced meanwhile (a user's model stays the user's)."""
    lm = tiny(MODEL)
    spec = copy.deepcopy(OP_JOBS["sweep"])
    spec["invokes"]["corrupt"]["sweep"] = {"layer": "2:4", "pos": [9, 12, 13]}
    plan = _plan(spec)
    assert any(f.from_base and f.shared_prefix for f in plan.forwards)
    seen: list[tuple[int, bool]] = []

    def watcher(index: int) -> Any:
        def watch(module: torch.nn.Module, *_: Any) -> None:
            seen.append((index, "forward" in vars(module)))

        return watch

    layers = lm.model.model.layers
    handles = [layer.register_forward_pre_hook(watcher(i)) for i, layer in enumerate(layers)]
    try:
        out = _executor().run(plan)
    finally:
        for handle in handles:
            handle.remove()
    assert seen and not any(replaced for _, replaced in seen)
    # the layers below a late forward's first do not run: layer 0 runs for the clean row and
    # the corrupted sequence's untouched run only, layer 3 in every forward too
    late = sum(1 for f in plan.forwards if f.from_base and f.shared_prefix)
    calls = [sum(1 for i, _ in seen if i == layer) for layer in range(len(layers))]
    assert calls[0] == 2 and calls[3] == 2 + late
    plain = _plan(spec, prefix_reuse=False, position_reuse=False)  # every layer and position
    assert not any(f.from_base for f in plain.forwards)
    assert_same(out, _executor().run(plain))


def test_the_server_runs_a_large_dataset_job_in_blocks_like_a_local_run():
    """A job over more rows than a block holds runs alone in blocks of items on the server's
    worker, beside jobs that share forwards; each gives what it gives locally."""
    from specsight.remote import admission, batching
    from specsight.remote.protocol import Limits

    lm = tiny(MODEL)
    big = _over_items(JOBS["metric:recovery"])
    small = [JOBS["metric:kl"], _variant(JOBS["op:zero"])]
    jobs = [admission.prepare_job(copy.deepcopy(s), lm, Limits()) for s in (big, *small)]
    block_rows = len(PLANS["metric:recovery"].rows) + 1
    results = batching.run_jobs(jobs, lm, block_rows=block_rows)
    assert results[0].manifest["plan"]["blocks"] == len(ITEMS)
    assert [r.manifest["timings"]["batched_jobs"] for r in results] == [1.0, 2.0, 2.0]
    for result, spec in zip(results, (big, *small)):
        local = specsight.run(copy.deepcopy(spec), model=lm)
        assert result.tensors.keys() == local.tensors.keys()
        for name, tensor in local.tensors.items():
            torch.testing.assert_close(result[name], tensor, rtol=1e-6, atol=1e-6, equal_nan=True)
