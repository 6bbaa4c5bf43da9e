"""Circuits: edge attribution (EAP, EAP-IG) and faithfulness under edge ablation, checked
against an independent split-residual forward written by hand (tests/circuit_reference.py),
the model called directly, and circuit files read back."""

from __future__ import annotations

import json

import pytest
import torch

import specsight
from specsight.errors import SpecError
from tests import circuit_reference as ref
from tests.conftest import CLEAN, CORRUPT, tiny

FAMILIES = ["tiny-llama", "tiny-gpt2"]
SECOND_CLEAN = "When Tom and Anna went to the park, Anna gave a ball to"
SECOND_CORRUPT = "When Tom and Anna went to the park, Tom gave a ball to"


def _spec(metrics: dict, *, two: bool = True) -> dict:
    clean = [CLEAN, SECOND_CLEAN] if two else [CLEAN]
    corrupt = [CORRUPT, SECOND_CORRUPT] if two else [CORRUPT]
    return {
        "specsight": 1,
        "model": "in-memory",
        "invokes": {"clean": {"prompt": clean}, "corrupt": {"prompt": corrupt}},
        "metrics": metrics,
    }


def _pair(**extra) -> dict:
    return {"clean": "clean", "corrupt": "corrupt", "target": " Mary", "foil": " John", **extra}


def _ids(lm, text: str) -> list[int]:
    return lm.tokenizer.encode(text)


def _scores(out, name: str = "eap") -> dict[str, float]:
    entry = out.manifest["tensors"][name]["axis_values"]
    ups, downs = entry["upstream"], entry["downstream"]
    scores = out.metrics[name]
    return {
        f"{u}->{d}": float(scores[i, j])
        for i, u in enumerate(ups)
        for j, d in enumerate(downs)
        if not torch.isnan(scores[i, j])
    }


@pytest.mark.parametrize("steps", [1, 3], ids=["eap", "eap_ig3"])
@pytest.mark.parametrize("name", FAMILIES)
def test_edge_scores_equal_a_hand_written_split_forward(name, steps):
    lm = tiny(name)
    method = {"method": "eap"} if steps == 1 else {"method": "eap_ig", "steps": steps}
    out = specsight.run(_spec({"eap": {"kind": "edge_attribution", **_pair(**method)}}), model=lm)
    got = _scores(out)
    target, foil = _ids(lm, " Mary")[0], _ids(lm, " John")[0]
    expected: dict[str, float] = {}
    for clean, corrupt in ((CLEAN, CORRUPT), (SECOND_CLEAN, SECOND_CORRUPT)):
        one = ref.eap_reference(
            lm, _ids(lm, clean), _ids(lm, corrupt), target, foil, -1, steps=steps
        )
        for edge, value in one.items():
            expected[edge] = expected.get(edge, 0.0) + value / 2
    assert set(got) == set(expected) == set(ref.edge_names(lm))
    scale = max(abs(v) for v in expected.values())
    for edge, value in expected.items():
        assert abs(got[edge] - value) <= 1e-4 * scale + 1e-7, (edge, got[edge], value)


def test_eap_ig_with_one_step_is_eap():
    lm = tiny("tiny-llama")
    metrics = {
        "eap": {"kind": "edge_attribution", **_pair()},
        "ig": {"kind": "edge_attribution", **_pair(method="eap_ig", steps=1)},
    }
    out = specsight.run(_spec(metrics), model=lm)
    assert torch.equal(out.metrics["eap"].nan_to_num(), out.metrics["ig"].nan_to_num())


def _logit_diff(lm, text: str) -> float:
    with torch.inference_mode():
        logits = lm.model(torch.tensor([_ids(lm, text)])).logits[0, -1]
    return float(logits[_ids(lm, " Mary")[0]] - logits[_ids(lm, " John")[0]])


@pytest.mark.parametrize("name", FAMILIES)
def test_full_graph_is_the_model_and_the_empty_graph_the_corrupt_run(name):
    lm = tiny(name)
    n_edges = len(ref.edge_names(lm))
    metrics = {
        "eap": {"kind": "edge_attribution", **_pair()},
        "faith": {"kind": "faithfulness", **_pair(circuit={"top": [0, n_edges], "from": "eap"})},
    }
    out = specsight.run(_spec(metrics, two=False), model=lm)
    full, empty = _logit_diff(lm, CLEAN), _logit_diff(lm, CORRUPT)
    assert float(out.metrics["faith/full"]) == pytest.approx(full, abs=1e-5 * (1 + abs(full)))
    assert float(out.metrics["faith/ablated"]) == pytest.approx(empty, abs=1e-5 * (1 + abs(empty)))
    assert float(out.metrics["faith"][1]) == 1.0  # every edge kept: the model, exactly
    assert float(out.metrics["faith/normalized"][0]) == pytest.approx(0.0, abs=1e-6)
    assert float(out.metrics["faith/circuit"][0]) == float(out.metrics["faith/ablated"])


@pytest.mark.parametrize("name", FAMILIES)
def test_ablating_one_edge_equals_the_reference_and_path_patching_it(name):
    lm = tiny(name)
    ups, downs = ref.graph(lm)
    edges = ref.edge_names(lm)
    kept = [e for e in edges if e != "head.0.1->head.2.0.v"]
    metrics = {"faith": {"kind": "faithfulness", **_pair(circuit={"edges": kept})}}
    out = specsight.run(_spec(metrics, two=False), model=lm)
    target, foil = _ids(lm, " Mary")[0], _ids(lm, " John")[0]
    clean, corrupt = _ids(lm, CLEAN), _ids(lm, CORRUPT)
    ablated = ref.edge_ablation_reference(
        lm, clean, corrupt, target, foil, -1, ["head.0.1->head.2.0.v"]
    )
    patched = ref.path_patch_reference(
        lm, clean, corrupt, ["head.0.1"], ["head.2.0.v"], target, foil, -1
    )
    got = float(out.metrics["faith/circuit"][0])
    assert ablated == pytest.approx(patched, abs=1e-6)
    assert got == pytest.approx(ablated, abs=1e-5 * (1 + abs(ablated)))
    assert got != pytest.approx(_logit_diff(lm, CLEAN), abs=1e-7)  # the edge matters


def test_a_circuit_of_several_edges_equals_the_reference_and_mean_ablation_differs():
    lm = tiny("tiny-llama")
    edges = ref.edge_names(lm)
    kept = [e for e in edges if e.endswith("->logits") or e.startswith("embed")]
    metrics = {
        "c": {"kind": "faithfulness", **_pair(circuit={"edges": kept})},
        "m": {"kind": "faithfulness", **_pair(circuit={"edges": kept}, ablation="mean")},
    }
    out = specsight.run(_spec(metrics, two=False), model=lm)
    target, foil = _ids(lm, " Mary")[0], _ids(lm, " John")[0]
    outside = [e for e in edges if e not in kept]
    expected = ref.edge_ablation_reference(
        lm, _ids(lm, CLEAN), _ids(lm, CORRUPT), target, foil, -1, outside
    )
    assert float(out.metrics["c/circuit"][0]) == pytest.approx(expected, abs=1e-5 * (1 + abs(expected)))  # fmt: skip
    assert float(out.metrics["m/circuit"][0]) != pytest.approx(expected, abs=1e-6)


def test_circuit_files_round_trip_and_refuse_another_model(tmp_path):
    lm = tiny("tiny-llama")
    metrics = {
        "eap": {"kind": "edge_attribution", **_pair(top=5)},
        "faith": {"kind": "faithfulness", **_pair(circuit={"top": [3, 12], "from": "eap"})},
    }
    out = specsight.run(_spec(metrics), model=lm)
    out.save(tmp_path / "run")
    assert (tmp_path / "run" / "circuits").stat().st_mode & 0o777 == 0o755
    written = json.loads((tmp_path / "run" / "circuits" / "faith.top12.json").read_text())
    assert written["specsight_circuit"] == 1 and len(written["edges"]) == 12
    assert written["spec_sha256"] == out.spec_sha256
    assert len(json.loads((tmp_path / "run" / "circuits" / "eap.json").read_text())["edges"]) == 5
    scores = _scores(out)
    top = sorted(scores, key=lambda e: -abs(scores[e]))[:12]
    assert [e["edge"] for e in written["edges"]] == top
    spec = _spec({"again": {"kind": "faithfulness", **_pair(circuit={"file": "run/circuits/faith.top12.json"})}})  # fmt: skip
    (tmp_path / "again.json").write_text(json.dumps(spec))
    again = specsight.run(str(tmp_path / "again.json"), model=lm)
    assert float(again.metrics["again"][0]) == pytest.approx(
        float(out.metrics["faith"][1]), rel=1e-6
    )
    with pytest.raises(SpecError, match="is for another model") as info:
        specsight.run(str(tmp_path / "again.json"), model=tiny("tiny-gpt2"))
    assert info.value.issues[0].line is not None


@pytest.mark.parametrize(
    ("circuit", "message"),
    [
        ({"edges": ["head.2.0->head.1.0.q"]}, "writes after 'head.1.0.q' reads"),
        ({"edges": ["head.0.0->head.1.0"]}, "not a downstream node"),
        ({"edges": ["head.0.9->logits"]}, "not an upstream node"),
        ({"top": 5, "from": "nope"}, "no metric named 'nope'"),
        ({"top": 10**6, "from": "eap"}, "the model's graph has"),
    ],
)
def test_bad_circuits_are_located_errors(circuit, message):
    metrics = {
        "eap": {"kind": "edge_attribution", **_pair()},
        "faith": {"kind": "faithfulness", **_pair(circuit=circuit)},
    }
    with pytest.raises(SpecError, match=message) as info:
        specsight.run(_spec(metrics), model=tiny("tiny-llama"))
    assert "metrics.faith.circuit" in str(info.value)


def test_prompts_of_different_lengths_and_invokes_with_ops_are_refused():
    spec = _spec({"eap": {"kind": "edge_attribution", **_pair()}})
    spec["invokes"]["corrupt"]["prompt"] = [CORRUPT, "Tom gave a ball to"]
    with pytest.raises(SpecError, match="item 1: the clean prompt has"):
        specsight.run(spec, model=tiny("tiny-llama"))
    spec = _spec({"eap": {"kind": "edge_attribution", **_pair()}})
    spec["invokes"]["clean"]["ops"] = [{"op": "zero", "site": "mlp_out.0"}]
    with pytest.raises(SpecError, match="may not sweep, generate or have ops that change the run"):
        specsight.run(spec, model=tiny("tiny-llama"))
    with pytest.raises(SpecError, match="steps is for method: eap_ig"):
        specsight.run(_spec({"eap": {"kind": "edge_attribution", **_pair(steps=3)}}), model=tiny("tiny-llama"))  # fmt: skip


def test_families_without_a_graph_are_refused():
    with pytest.raises(SpecError, match="has no component graph"):
        specsight.run(
            _spec({"eap": {"kind": "edge_attribution", **_pair()}}), model=tiny("tiny-gpt-neox")
        )


@pytest.fixture
def server(tmp_path):
    """The real server app serving tiny-llama."""
    from fastapi.testclient import TestClient

    from specsight.remote.auth import KeyRing
    from specsight.remote.client import RemoteClient
    from specsight.remote.jobs import JobStore
    from specsight.remote.server import create_app

    store = JobStore(tmp_path / "jobs.db")
    app = create_app({"tiny-llama": tiny()}, store=store, keys=KeyRing.from_raw_keys({"t": "k"}))
    try:
        with TestClient(app, base_url="http://testserver") as http:
            yield RemoteClient("http://testserver", "k", client=http)
    finally:
        store.close()


def test_circuits_and_path_patching_run_remotely_as_locally(server, tmp_path):
    """EAP, faithfulness of its top edges and of a circuit file (sent as its edges), and a
    swept path_patch: the server's results equal a local run's, bit for bit."""
    from specsight.remote.submit import run_remote
    from tests.test_remote_client import assert_same_tensors

    lm = tiny("tiny-llama")
    first = _spec({"eap": {"kind": "edge_attribution", **_pair(method="eap_ig", steps=2)},
                   "faith": {"kind": "faithfulness", **_pair(circuit={"top": [5, 30], "from": "eap"})}})  # fmt: skip
    first["model"] = "tiny-llama"
    first["invokes"]["patched"] = {
        "prompt": [CORRUPT, SECOND_CORRUPT],
        "sweep": {"head": "all"},
        "ops": [
            {
                "op": "path_patch",
                "senders": ["head.1.{head}"],
                "receivers": ["logits"],
                "from": "clean",
                "base": "corrupt",
            }
        ],  # fmt: skip
    }
    first["metrics"]["pp"] = {"kind": "logit_diff", "invoke": "patched", "target": " Mary", "foil": " John"}  # fmt: skip
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(first))
    local = specsight.run(path, model=lm, out=tmp_path / "run")
    assert_same_tensors(run_remote(path, "", client=server, timeout=120), local)
    second = _spec({"f": {"kind": "faithfulness", **_pair(circuit={"file": "run/circuits/faith.top30.json"})}})  # fmt: skip
    second["model"] = "tiny-llama"
    path.write_text(json.dumps(second))
    remote = run_remote(path, "", client=server, timeout=120)
    assert float(remote.metrics["f"][0]) == pytest.approx(
        float(local.metrics["faith"][1]), rel=1e-6
    )


def test_per_token_scores_sum_to_the_summed_ones_and_are_zero_before_the_prompts_differ():
    lm = tiny("tiny-llama")
    metrics = {
        "eap": {"kind": "edge_attribution", **_pair()},
        "tok": {"kind": "edge_attribution", **_pair(positions="per_token")},
    }
    out = specsight.run(_spec(metrics), model=lm)
    summed, per_token = out.metrics["eap"], out.metrics["tok"]
    assert tuple(per_token.shape) == (14, *summed.shape)
    assert out.manifest["tensors"]["tok"]["axes"] == ["pos", "upstream", "downstream"]
    edges = ~summed.isnan()
    scale = float(summed[edges].abs().max())
    assert float((per_token.sum(0)[edges] - summed[edges]).abs().max()) <= 1e-5 * scale
    # the prompts first differ at position 9: nothing upstream differs before it (causal)
    assert float(per_token[:9][:, edges].abs().max()) == 0.0
    assert float(per_token[9:][:, edges].abs().max()) > 0


def test_a_per_token_circuit_ablates_one_edge_at_one_position_as_the_reference_does(tmp_path):
    lm = tiny("tiny-gpt2")
    ups, downs = ref.graph(lm)
    target, foil = _ids(lm, " Mary")[0], _ids(lm, " John")[0]
    clean, corrupt = _ids(lm, CLEAN), _ids(lm, CORRUPT)
    every = [f"{e}@{p}" for e in ref.edge_names(lm) for p in range(len(clean))]
    kept = [e for e in every if e != "head.1.2->logits@9"]
    metrics = {
        "all": {"kind": "faithfulness", **_pair(circuit={"edges": every})},
        "one": {"kind": "faithfulness", **_pair(circuit={"edges": kept})},
    }
    out = specsight.run(_spec(metrics, two=False), model=lm)
    assert float(out.metrics["all"][0]) == 1.0
    _, clean_ups = ref.split_forward(lm, clean)
    _, corrupt_ups = ref.split_forward(lm, corrupt)
    replacement = clean_ups["head.1.2"].clone()
    replacement[9] = corrupt_ups["head.1.2"][9]
    logits, _ = ref.split_forward(lm, clean, edits={("head.1.2", "logits"): replacement})
    expected = float(logits[-1, target] - logits[-1, foil])
    got = float(out.metrics["one/circuit"][0])
    assert got == pytest.approx(expected, abs=1e-5 * (1 + abs(expected)))
    with pytest.raises(SpecError, match="all per position"):
        bad = {"f": {"kind": "faithfulness", **_pair(circuit={"edges": [every[0], "embed->logits"]})}}  # fmt: skip
        specsight.run(_spec(bad, two=False), model=lm)


def test_per_token_circuits_are_written_and_read_back(tmp_path):
    lm = tiny("tiny-llama")
    metrics = {
        "tok": {"kind": "edge_attribution", **_pair(positions="per_token", top=4)},
        "faith": {"kind": "faithfulness", **_pair(circuit={"top": [10], "from": "tok"})},
    }
    out = specsight.run(_spec(metrics), model=lm, out=tmp_path / "run")
    written = json.loads((tmp_path / "run" / "circuits" / "faith.top10.json").read_text())
    assert len(written["edges"]) == 10 and all("@" in e["edge"] for e in written["edges"])
    spec = _spec({"again": {"kind": "faithfulness", **_pair(circuit={"file": "run/circuits/faith.top10.json"})}})  # fmt: skip
    (tmp_path / "again.json").write_text(json.dumps(spec))
    again = specsight.run(str(tmp_path / "again.json"), model=lm)
    assert float(again.metrics["again"][0]) == pytest.approx(
        float(out.metrics["faith"][0]), rel=1e-6
    )
    uneven = _spec({"tok": {"kind": "edge_attribution", **_pair(positions="per_token")}})
    uneven["invokes"]["clean"]["prompt"][1] = "Then Tom and Anna went to the big park, Anna gave a ball to"  # fmt: skip
    uneven["invokes"]["corrupt"]["prompt"][1] = "Then Tom and Anna went to the big park, Tom gave a ball to"  # fmt: skip
    with pytest.raises(SpecError, match="nodes per position need items of one length"):
        specsight.run(uneven, model=lm)


def test_the_report_draws_the_strongest_edges_as_a_graph(tmp_path):
    lm = tiny("tiny-llama")
    out = specsight.run(_spec({"eap": {"kind": "edge_attribution", **_pair()}}), model=lm, out=tmp_path / "run")  # fmt: skip
    page = (tmp_path / "run" / "report.html").read_text()
    scores = _scores(out)
    strongest = max(scores, key=lambda e: abs(scores[e]))
    up, down = strongest.split("->")
    assert '<figure class="edge-graph">' in page
    assert f"{up} -&gt; {down}: {scores[strongest]:+.4g}" in page
