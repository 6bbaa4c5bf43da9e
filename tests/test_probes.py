"""Linear probes (``kind: probe``) against scikit-learn's LogisticRegression on the same saved
activations and the same split (StandardScaler, then C = 1 / (l2 * n_train), which is the mean
cross-entropy + l2 / 2 * |W|^2 that specsight minimises): equal held-out accuracy, weights and
bias within tolerance, AUROC equal to scikit-learn's roc_auc_score; and located errors for
misuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import specsight
from specsight.errors import SpecError
from tests.conftest import tiny

GOOD = ["love", "great", "happy", "wonderful", "excellent", "nice", "lovely", "fine"]
BAD = ["hate", "awful", "sad", "terrible", "horrible", "nasty", "bad", "poor"]
FRAMES = ["I think it is {w}", "The day was {w}", "Such a {w} thing", "It felt {w} to me"]


def _rows() -> list[dict]:
    rows = []
    for f, frame in enumerate(FRAMES):
        for i, (good, bad) in enumerate(zip(GOOD, BAD)):
            rows.append({"text": frame.format(w=good), "sentiment": "pos", "topic": (i + f) % 3})
            rows.append({"text": frame.format(w=bad), "sentiment": "neg", "topic": (i + f + 1) % 3})
    return rows


def _spec(label: str = "{sentiment}", **probe) -> dict:
    return {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": {"rows": _rows()},
        "invokes": {
            "run": {
                "prompt": "{text}",
                "ops": [{"op": "save", "site": "resid_post.*", "positions": "last"}],
            }
        },
        "metrics": {"p": {"kind": "probe", "invoke": "run", "label": label, "l2": 0.01, **probe}},
    }


def _sklearn(x: np.ndarray, y: np.ndarray, train, test, l2: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[train])
    model = LogisticRegression(C=1 / (l2 * len(train)), tol=1e-12, max_iter=100_000)
    model.fit(scaler.transform(x[train]), y[train])
    accuracy = model.score(scaler.transform(x[test]), y[test])
    weight = model.coef_ / scaler.scale_
    bias = model.intercept_ - (model.coef_ * scaler.mean_ / scaler.scale_).sum(-1)
    auroc = None
    if len(model.classes_) == 2:
        auroc = roc_auc_score(y[test], model.decision_function(scaler.transform(x[test])))
    return accuracy, weight, bias, auroc


@pytest.mark.parametrize(("label", "classes"), [("{sentiment}", ["neg", "pos"]), ("{topic}", ["0", "1", "2"])])  # fmt: skip
def test_probes_equal_scikit_learn(label, classes):
    out = specsight.run(_spec(label), model=tiny("tiny-llama"))
    meta = out.manifest["tensors"]["p"]
    assert meta["classes"] == classes and meta["axes"] == ["site"]
    held_out = out.metrics["p/held_out"].bool().numpy()
    test, train = np.flatnonzero(held_out), np.flatnonzero(~held_out)
    assert (len(train), len(test)) == (meta["split"]["train"], meta["split"]["test"]) == (48, 16)
    rows = _rows()
    key = label.strip("{}")
    y = np.array([classes.index(str(row[key])) for row in rows])
    for s in range(4):
        x = out.saves[f"run/resid_post.{s}"][:, 0].double().numpy()  # [item, d]
        accuracy, weight, bias, auroc = _sklearn(x, y, train, test, 0.01)
        assert float(out.metrics["p"][s]) == pytest.approx(accuracy, abs=1e-6)
        ours_w, ours_b = out.metrics["p/weight"][s].double().numpy(), out.metrics["p/bias"][s].double().numpy()  # fmt: skip
        scale = np.abs(weight).max()
        np.testing.assert_allclose(ours_w, weight, atol=1e-3 * scale)
        np.testing.assert_allclose(ours_b, bias, atol=1e-3 * (1 + np.abs(bias).max()))
        if auroc is None:
            assert torch.isnan(out.metrics["p/auroc"][s])
        else:
            assert float(out.metrics["p/auroc"][s]) == pytest.approx(
                auroc, abs=1e-6
            )  # stored as float32


def test_probe_weights_apply_to_the_raw_activations():
    out = specsight.run(_spec(), model=tiny("tiny-llama"))
    held_out = out.metrics["p/held_out"].bool()
    x = out.saves["run/resid_post.3"][:, 0]  # the last site's values
    scores = x @ out.metrics["p/weight"][-1].T + out.metrics["p/bias"][-1]
    predicted = (scores[:, 0] > 0).long()
    truth = torch.tensor([1 if row["sentiment"] == "pos" else 0 for row in _rows()])
    accuracy = (predicted[held_out] == truth[held_out]).double().mean()
    assert float(accuracy) == pytest.approx(float(out.metrics["p"][-1]), abs=1e-9)


def test_the_same_items_give_the_same_probe_and_another_seed_another_split():
    lm = tiny("tiny-llama")
    first, again = (specsight.run(_spec(), model=lm) for _ in range(2))
    assert torch.equal(first.metrics["p/weight"], again.metrics["p/weight"])
    other = specsight.run(_spec(split={"seed": 3}), model=lm)
    assert not torch.equal(first.metrics["p/held_out"], other.metrics["p/held_out"])


@pytest.mark.parametrize(
    ("change", "code", "where"),
    [
        ({"label": "{constant}"}, "probe-classes", ("label",)),
        ({"label": "{sentimnt}"}, "unknown-column", ("label",)),
        ({"site": "head_z.1"}, "probe-site", ("site",)),
        ({"invoke": "plain"}, "not-over-dataset", ("label",)),
        ({"invoke": "swept"}, "bad-probe", ("invoke",)),
        ({"split": {"by": "{topik}"}}, "unknown-column", ("split", "by")),
    ],
)
def test_misuse_is_a_located_error(change, code, where):
    spec = _spec()
    for row in spec["dataset"]["rows"]:
        row["constant"] = "same"
    spec["invokes"]["plain"] = {"prompt": "Hello there"}
    spec["invokes"]["swept"] = {
        "prompt": "{text}",
        "sweep": {"f": [0.5, 2.0]},
        "ops": [{"op": "scale", "site": "mlp_out.0", "factor": "{f}"}],
    }
    spec["metrics"]["p"].update(change)
    with pytest.raises(SpecError) as err:
        specsight.run(spec, model=tiny("tiny-llama"))
    issue = err.value.issues[0]
    assert (issue.code, issue.path) == (code, ("metrics", "p", *where))
    assert issue.hint


def test_a_probe_runs_remotely_as_it_runs_locally(tmp_path):
    import json

    from specsight.remote.submit import run_remote
    from tests.test_remote_client import URL, FakeServer, assert_same_tensors

    path = tmp_path / "probe.json"
    path.write_text(json.dumps(_spec()))
    fake = FakeServer()
    with fake.client() as client:
        remote = run_remote(path, URL, client=client)
    assert_same_tensors(remote, specsight.run(path))


@pytest.mark.parametrize("label", ["{sentiment}", "{topic}"])
def test_the_result_size_is_known_before_the_run(label):
    from specsight.compile import spec_sizes
    from specsight.engine import module_widths

    lm = tiny("tiny-llama")
    spec = _spec(label)
    out = specsight.run(spec, model=lm)
    real = {n: t.numel() * t.element_size() for n, t in out.tensors.items()}
    widths = module_widths(lm.model, pad_id=lm.tokenizer.pad_id)
    sizes = spec_sizes(specsight.load_spec(spec), lm.info, lm.tokenizer, module_widths=widths)
    assert sizes.tensors == real


def test_a_split_by_column_keeps_each_group_on_one_side():
    out = specsight.run(_spec(split={"by": "{topic}", "test": 0.3}), model=tiny("tiny-llama"))
    held = out.metrics["p/held_out"].bool().tolist()
    sides: dict[int, set[bool]] = {}
    for row, is_held in zip(_rows(), held):
        sides.setdefault(row["topic"], set()).add(is_held)
    assert all(len(s) == 1 for s in sides.values()) and any(held) and not all(held)
    spec = _spec(split={"by": "{constant}"})
    for row in spec["dataset"]["rows"]:
        row["constant"] = "same"
    with pytest.raises(SpecError) as err:
        specsight.run(spec, model=tiny("tiny-llama"))
    assert err.value.issues[0].code == "probe-split"


def test_claims_may_name_the_auroc_and_pick_a_site():
    spec = _spec()
    spec["expect"] = [
        {"metric": "p/auroc", "where": {"site": "resid_post.3"}, "greater_than": 0.5},
        {"metric": "p/train_accuracy", "greater_than": 0.9},
        {"metric": "p/held_out", "where": {"item": 0}, "less_than": 2},
    ]
    out = specsight.run(spec, model=tiny("tiny-llama"))
    auroc = float(out["p/auroc"][3])
    assert [o.ok for o in out.expectations] == [auroc > 0.5, bool((out["p/train_accuracy"] > 0.9).all()), True]  # fmt: skip


def test_the_summary_shows_accuracy_auroc_and_training_accuracy_per_site():
    text = specsight.run(_spec(), model=tiny("tiny-llama")).summary(width=200)
    assert "probes of neg, pos (48 train / 16 held-out items)" in text
    assert "resid_post.3: " in text and "[" in text
