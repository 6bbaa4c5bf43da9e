"""Datasets: rows from JSONL, CSV or inline, sampled reproducibly; invokes over them run once per
item, patches pair item i with item i, and metrics read each item's own answer tokens. Values
are checked against hand-written hooks on the same weights, one item at a time."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import specsight
from specsight.api import validate
from specsight.errors import SpecError
from tests.conftest import assert_ratio_close, tiny

ROWS = [
    {
        "clean": "When Mary and John went to the store, John gave a drink to",
        "corrupt": "When Mary and John went to the store, Mary gave a drink to",
        "io": " Mary",
        "s": " John",
    },
    {
        "clean": "When Tom and Anna went to the park, Anna gave a book to",
        "corrupt": "When Tom and Anna went to the park, Tom gave a book to",
        "io": " Tom",
        "s": " Anna",
    },
    {  # shorter than the others: rows are padded in a batch
        "clean": "Then Bob and Alice walked home, Alice gave a drink to",
        "corrupt": "Then Bob and Alice walked home, Bob gave a drink to",
        "io": " Bob",
        "s": " Alice",
    },
]

S2 = {"token": "{s}", "occurrence": 2}
IO2 = {"token": "{io}", "occurrence": 2}


def dataset_spec(dataset: Any = None, **extra: Any) -> dict[str, Any]:
    """Per-item residual patching at the second name, over every layer, with per-item answers."""
    ld = {"kind": "logit_diff", "target": "{io}", "foil": "{s}"}
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": dataset if dataset is not None else {"rows": ROWS},
        "invokes": {
            "clean": {"prompt": "{clean}"},
            "base": {"prompt": "{corrupt}"},
            "patched": {
                "prompt": "{corrupt}",
                "sweep": {"layer": "all"},
                "ops": [
                    {
                        "op": "patch",
                        "site": "resid_post.{layer}",
                        "positions": [IO2],
                        "source_positions": [S2],
                        "from": "clean",
                    }
                ],
            },
        },
        "metrics": {
            "ld": {**ld, "invoke": "patched"},
            "clean_ld": {**ld, "invoke": "clean"},
            "base_ld": {**ld, "invoke": "base"},
            "recovery": {
                "kind": "recovery",
                "patched": "ld",
                "clean": "clean_ld",
                "corrupt": "base_ld",
            },
        },
    }
    spec.update(extra)
    return spec


# --------------------------------------------------------------------------- the reference


def _hand_ld(lm, prompt: str, io: str, s: str, hook=None, layer: int | None = None) -> float:
    ids = torch.tensor([lm.tokenizer.encode(prompt)])
    handle = None
    if hook is not None:
        handle = lm.model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            logits = lm.model(ids).logits
    finally:
        if handle is not None:
            handle.remove()
    a, b = (lm.tokenizer.encode_plain(t)[0] for t in (io, s))
    return float(logits[0, -1, a] - logits[0, -1, b])


def _nth(lm, prompt: str, word: str, n: int) -> int:
    ids, needle = lm.tokenizer.encode(prompt), lm.tokenizer.encode_plain(word)[0]
    return [i for i, t in enumerate(ids) if t == needle][n - 1]


def _hand_patch(lm, row: dict[str, str], layer: int) -> float:
    """The corrupted prompt with layer ``layer``'s output at the second name taken from the
    clean run, by hand."""
    kept = {}

    def keep(_m, _a, out):
        kept["h"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    _hand_ld(lm, row["clean"], row["io"], row["s"], keep, layer)
    src = _nth(lm, row["clean"], row["s"], 2)
    dst = _nth(lm, row["corrupt"], row["io"], 2)

    def patch(_m, _a, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        hidden[:, dst] = kept["h"][:, src]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    return _hand_ld(lm, row["corrupt"], row["io"], row["s"], patch, layer)


# --------------------------------------------------------------------------- values


def test_per_item_patching_equals_hand_written_hooks_item_by_item():
    lm = tiny("tiny-llama")
    results = specsight.run(dataset_spec(), model=lm)
    assert results.axes("ld") == ["layer", "item"]
    n_layers = lm.info.n_layers
    want = torch.tensor(
        [[_hand_patch(lm, row, layer) for row in ROWS] for layer in range(n_layers)]
    )
    torch.testing.assert_close(results["ld"], want, rtol=1e-5, atol=1e-5)
    clean = torch.tensor([_hand_ld(lm, r["clean"], r["io"], r["s"]) for r in ROWS])
    base = torch.tensor([_hand_ld(lm, r["corrupt"], r["io"], r["s"]) for r in ROWS])
    torch.testing.assert_close(results["clean_ld"], clean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["base_ld"], base, rtol=1e-5, atol=1e-5)
    # recovery item by item: each item's own clean and corrupted values
    assert_ratio_close(results["recovery"], want, clean, base)


def test_per_item_tokens_in_prob_and_tokens_metrics():
    lm = tiny("tiny-gpt2")
    spec = dataset_spec(model="tiny-gpt2")
    spec["metrics"] = {
        "p_io": {"kind": "prob", "invoke": "clean", "token": "{io}"},
        "both": {"kind": "logprob", "invoke": "clean", "tokens": ["{io}", "{s}", " the"]},
        "at_s2": {"kind": "logits", "invoke": "clean", "token": "{io}", "position": S2},
    }
    spec["invokes"] = {"clean": spec["invokes"]["clean"]}
    results = specsight.run(spec, model=lm)
    the = lm.tokenizer.encode_plain(" the")[0]
    for i, row in enumerate(ROWS):
        ids = torch.tensor([lm.tokenizer.encode(row["clean"])])
        with torch.inference_mode():
            logits = lm.model(ids).logits[0].float()
        io, s = (lm.tokenizer.encode_plain(row[c])[0] for c in ("io", "s"))
        probs = logits[-1].softmax(-1)
        assert results["p_io"][i].item() == pytest.approx(probs[io].item(), abs=1e-6)
        want = logits[-1].log_softmax(-1)[[io, s, the]]
        torch.testing.assert_close(results["both"][i], want, rtol=1e-5, atol=1e-5)
        s2 = _nth(lm, row["clean"], row["s"], 2)
        assert results["at_s2"][i].item() == pytest.approx(logits[s2, io].item(), abs=1e-5)
    assert results.axes("both") == ["item", "token"]


# --------------------------------------------------------------------------- files, samples


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> bytes:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(data)
    return data


def _spec_file(folder: Path, spec: dict[str, Any]) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_jsonl_csv_and_inline_rows_give_the_same_results(tmp_path):
    lm = tiny("tiny-llama")
    raw = _write_jsonl(tmp_path / "ioi.jsonl", ROWS)
    with open(tmp_path / "ioi.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)
    inline = specsight.run(dataset_spec(), model=lm)
    from_jsonl = specsight.run(_spec_file(tmp_path, dataset_spec({"file": "ioi.jsonl"})), model=lm)
    from_csv = specsight.run(_spec_file(tmp_path, dataset_spec({"file": "ioi.csv"})), model=lm)
    for results in (from_jsonl, from_csv):
        assert torch.equal(results["ld"], inline["ld"])
    recorded = from_jsonl.manifest["dataset"]
    assert recorded["sha256"] == hashlib.sha256(raw).hexdigest()
    assert recorded["rows"] == 3 and recorded["used"] == 3 and recorded["file"] == "ioi.jsonl"
    assert recorded["invokes"] == ["base", "clean", "patched"]
    assert from_jsonl.prompts["clean"] == [r["clean"] for r in ROWS]


def test_a_sample_is_reproducible_and_picks_rows_in_file_order(tmp_path):
    lm = tiny("tiny-llama")
    rows = [dict(ROWS[i % 3], n=i) for i in range(20)]
    _write_jsonl(tmp_path / "many.jsonl", rows)
    spec = dataset_spec({"file": "many.jsonl", "sample": {"n": 5, "seed": 7}})
    spec["invokes"] = {"clean": spec["invokes"]["clean"]}
    spec["metrics"] = {"clean_ld": spec["metrics"]["clean_ld"]}
    first = specsight.run(_spec_file(tmp_path, spec), model=lm)
    again = specsight.run(_spec_file(tmp_path, spec), model=lm)
    picked = first.manifest["dataset"]["sample"]
    assert picked == again.manifest["dataset"]["sample"] == sorted(picked) and len(picked) == 5
    assert torch.equal(first["clean_ld"], again["clean_ld"])
    want = torch.tensor(
        [_hand_ld(lm, rows[i]["clean"], rows[i]["io"], rows[i]["s"]) for i in picked]
    )
    torch.testing.assert_close(first["clean_ld"], want, rtol=1e-5, atol=1e-5)
    spec["dataset"]["sample"]["seed"] = 8
    other = specsight.run(_spec_file(tmp_path, spec), model=lm)
    assert other.manifest["dataset"]["sample"] != picked


# --------------------------------------------------------------------------- mistakes


def _issues(spec: Any) -> list[str]:
    with pytest.raises(SpecError) as info:
        lm = tiny("tiny-llama")
        specsight.compile_plan(specsight.load_spec(spec), lm.info, lm.tokenizer)
    return [issue.format() for issue in info.value.issues]


def _validate_issues(spec: Any) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate(spec)
    return [issue.format() for issue in info.value.issues]


def test_an_unknown_column_is_located_with_a_suggestion():
    spec = dataset_spec()
    spec["invokes"]["clean"]["prompt"] = "{claen}"
    spec["metrics"]["clean_ld"]["target"] = "{oi}"
    for issues in (_issues(spec), _validate_issues(spec)):
        text = "\n".join(issues)
        assert "invokes.clean.prompt: the dataset has no column 'claen'" in text
        assert "did you mean 'clean'" in text
        assert "metrics.clean_ld.target: the dataset has no column 'oi'" in text


def test_a_two_token_answer_names_the_item_and_column():
    rows = [dict(r) for r in ROWS]
    rows[2]["io"] = " Kate"  # three tokens for this tokenizer
    rows[2]["clean"] = rows[2]["clean"].replace("Bob", "Kate")
    rows[2]["corrupt"] = rows[2]["corrupt"].replace("Bob", "Kate")
    (issue,) = {
        i for i in _issues(dataset_spec({"rows": rows})) if "ld.target" in i and "clean" in i
    }
    assert "metrics.clean_ld.target: item 2, {io} = ' Kate': ' Kate' is 3 tokens" in issue


def test_a_position_missing_in_one_item_names_the_item(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[1]["corrupt"] = "When Tom and Anna went to the park, Mark gave a book to"
    _write_jsonl(tmp_path / "ioi.jsonl", rows)
    with pytest.raises(SpecError) as info:
        specsight.run(_spec_file(tmp_path, dataset_spec({"file": "ioi.jsonl"})), model=tiny())
    text = str(info.value)
    assert "item 1 (row 2 of ioi.jsonl), {io} = ' Tom'" in text
    assert "occurs only once in the prompt" in text
    assert "invokes.patched.ops[0].positions[0]" in text


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            lambda s: s["invokes"]["patched"]["sweep"].update(s=[0, 1]),
            "invokes.patched.sweep.s: sweep variable 's' has the name of a dataset column",
        ),
        (
            lambda s: s["invokes"].update(
                other={
                    "prompt": "hello",
                    "ops": [
                        {"op": "zero", "site": "resid_post.0", "positions": [{"token": "{s}"}]}
                    ],
                }
            ),
            "'{s}' is a dataset column, but invoke 'other' does not run over the dataset",
        ),
        (
            lambda s: s["invokes"]["patched"]["ops"][0].update(site="resid_post.{io}"),
            "'{io}' is a dataset column; 'site' is the same for every row",
        ),
        (
            lambda s: (
                s["metrics"].update(x={"kind": "prob", "invoke": "single", "token": "{io}"})
                or s["invokes"].update(single={"prompt": "hello there"})
            ),
            "metrics.x.token: '{io}' is a dataset column, but invoke 'single' does not run",
        ),
        (
            lambda s: s.update(dataset={"rows": ROWS, "sample": {"n": 9}}),
            "dataset.sample.n: sample.n is 9 but the dataset has 3 rows",
        ),
        (
            lambda s: s.update(dataset={"file": "x.jsonl", "rows": ROWS}),
            "give exactly one of 'file'",
        ),
    ],
)
def test_dataset_misuse_is_a_located_issue(change, expected):
    spec = dataset_spec()
    change(spec)
    assert any(expected in issue for issue in _issues(spec)), _issues(spec)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.jsonl", '{"a": "x"}\n{"a": \n', "'bad.jsonl' line 2: not valid JSON"),
        ("list.jsonl", '["a"]\n', "'list.jsonl' line 1: not a JSON object"),
        ("nested.jsonl", '{"a": [1]}\n', "column 'a' holds a list or object"),
        ("nan.jsonl", '{"a": NaN}\n', "NaN is not a number JSON allows"),
        ("extra.csv", "a,b\n1,2,3\n", "'extra.csv' line 2: more fields than the header names"),
        ("empty.jsonl", "\n\n", "the dataset has no rows"),
    ],
)
def test_broken_dataset_files_name_the_line(tmp_path, name, content, expected):
    (tmp_path / name).write_text(content)
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": {"file": name},
        "invokes": {"a": {"prompt": "{a}"}},
    }
    with pytest.raises(SpecError) as info:
        validate(_spec_file(tmp_path, spec))
    assert expected in str(info.value)


def test_a_missing_file_suggests_a_file_nearby(tmp_path):
    _write_jsonl(tmp_path / "ioi.jsonl", ROWS)
    with pytest.raises(SpecError) as info:
        validate(_spec_file(tmp_path, dataset_spec({"file": "ioi.json"})))
    assert "dataset.file: dataset file 'ioi.json'" in str(info.value)
    assert "did you mean 'ioi.jsonl'" in str(info.value)


def test_literal_braces_stay_in_prompts():
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": [{"w": " Mary"}],
        "invokes": {"a": {"prompt": "{{x}} and{w}"}},
    }
    results = specsight.run(spec, model=tiny())
    assert results.prompts["a"] == ["{x} and Mary"]


# --------------------------------------------------------------------------- remote


def test_remote_runs_inline_the_sampled_rows_and_record_the_file(tmp_path):
    from specsight.remote.submit import run_remote
    from tests.test_remote_client import URL, FakeServer, assert_same_tensors

    rows = [dict(ROWS[i % 3], n=i) for i in range(12)]
    raw = _write_jsonl(tmp_path / "ioi.jsonl", rows)
    path = _spec_file(tmp_path, dataset_spec({"file": "ioi.jsonl", "sample": {"n": 4, "seed": 3}}))
    fake = FakeServer()
    with fake.client() as client:
        remote = run_remote(path, URL, client=client)
    local = specsight.run(path, model=tiny())
    assert_same_tensors(remote, local)
    sent = json.loads(fake.posts()[0].content)["spec"]["dataset"]
    picked = local.manifest["dataset"]["sample"]
    assert sent == {"rows": [rows[i] for i in picked]}  # no path, no sample: the rows
    assert remote.manifest["dataset"] == local.manifest["dataset"]
    assert remote.manifest["dataset"]["sha256"] == hashlib.sha256(raw).hexdigest()


def test_a_server_refuses_dataset_files_and_too_many_rows():
    from specsight.remote import protocol as P
    from specsight.remote.admission import LimitError, prepare_job

    lm = tiny()
    with pytest.raises(SpecError, match="dataset files are not accepted here"):
        prepare_job(dataset_spec({"file": "/etc/passwd"}), lm, P.Limits())
    with pytest.raises(LimitError) as info:
        prepare_job(dataset_spec(), lm, P.Limits(max_dataset_rows=2))
    assert info.value.to_dict()["message"].startswith("dataset rows")


def test_the_new_features_run_remotely_as_they_run_locally(tmp_path):
    """Aggregates, effects, the ablation family, kl/loss/accuracy and a swept generation,
    through the wire protocol and the server's admission, against a local run."""
    from specsight.remote.submit import run_remote
    from tests.test_remote_client import URL, FakeServer, assert_same_tensors

    spec = dataset_spec(
        {"rows": ROWS},
        expect=[{"metric": "recovery", "where": {"layer": 3}, "approx": 0, "atol": 1e-4}],
    )
    spec["metrics"]["ld"]["reduce"] = {"ci": "bootstrap", "n_boot": 200}
    spec["metrics"]["ld"]["baseline"] = "base_ld"
    spec["metrics"]["recovery"]["of"] = "means"
    spec["invokes"]["ablated"] = {
        "prompt": "{clean}",
        "sweep": {"layer": "all"},
        "ops": [
            {"op": "mean_ablate", "site": "mlp_out.{layer}", "from": "clean"},
            {"op": "noise", "site": "embed", "positions": [{"token": "{s}"}], "std_of": "clean"},
            {"op": "resample_ablate", "site": "resid_post.0", "from": "clean", "positions": [-1]},
        ],
    }
    spec["invokes"]["steered"] = {
        "prompt": "{clean}",
        "sweep": {"c": [0.5, 2]},
        "generate": {"max_new_tokens": 3},
        "ops": [{"op": "scale", "site": "resid_post.1", "factor": "{c}"}],
    }
    spec["metrics"].update(
        {
            "kl": {"kind": "kl", "invoke": "ablated", "reference": "clean"},
            "loss": {"kind": "loss", "invoke": "ablated", "reduce": "median"},
            "acc": {"kind": "accuracy", "invoke": "ablated", "target": "{io}"},
        }
    )
    path = _spec_file(tmp_path, spec)
    fake = FakeServer()
    with fake.client() as client:
        remote = run_remote(path, URL, client=client)
    local = specsight.run(path, model=tiny())
    assert_same_tensors(remote, local)
    assert [o.ok for o in remote.expectations] == [o.ok for o in local.expectations] == [True]
    assert remote.manifest["generated"] == local.manifest["generated"]


def test_literal_braces_without_a_dataset_run_and_show_as_written():
    """Without a dataset, ``{{`` and ``}}`` are literal braces in prompts and metric tokens as
    they are with one: the model runs 'The set {x} and } end', results show that text, and the
    metric measures the token '{' (checked against the model called directly)."""
    from tests.conftest import tiny

    lm = tiny("tiny-llama")
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "invokes": {"a": {"prompt": "The set {{x}} and }} end"}},
        "metrics": {"p": {"kind": "prob", "invoke": "a", "token": "{{"}},
    }
    results = specsight.run(spec, model=lm)
    text = "The set {x} and } end"
    assert results.prompts["a"] == [text]
    with torch.inference_mode():
        logits = lm.model(torch.tensor([lm.tokenizer.encode(text)])).logits[0, -1]
    (brace,) = lm.tokenizer.encode_plain("{")
    expected = torch.softmax(logits.float(), -1)[brace]
    assert abs(float(results.metrics["p"]) - float(expected)) <= 1e-5 * float(expected) + 1e-9
