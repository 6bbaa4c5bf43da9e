"""Dataset files read strictly and within limits: only regular files, under a byte limit per
file and per line (checked while streaming, before parsing); JSONL rows without duplicate
keys, deep nesting or lone surrogates; CSV with closed quotes, a field count per row that
matches the header, distinct header names and bounded fields; and every column a template
reads present and non-null in every row used. Each mistake is a located SpecError (exit 2)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

import specsight
from specsight.api import validate
from specsight.cli import main
from specsight.compile import dataset as D
from specsight.errors import SpecError
from tests.conftest import tiny

ROW = {
    "clean": "When Mary and John went to the store, John gave a drink to",
    "corrupt": "When Mary and John went to the store, Mary gave a drink to",
    "io": " Mary",
    "s": " John",
}


def _spec(dataset: Any, **extra: Any) -> dict[str, Any]:
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": dataset,
        "invokes": {"clean": {"prompt": "{clean}"}, "corrupt": {"prompt": "{corrupt}"}},
        "metrics": {
            "ld": {"kind": "logit_diff", "invoke": "corrupt", "target": "{io}", "foil": "{s}"}
        },
    }
    spec.update(extra)
    return spec


def _write(folder: Path, spec: dict[str, Any]) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _issues(folder: Path, name: str, content: str | bytes | None = None, **extra: Any) -> str:
    """The issues ``validate`` finds in the spec over dataset file ``name`` (written first
    when ``content`` is given)."""
    if content is not None:
        data = content.encode() if isinstance(content, str) else content
        (folder / name).write_bytes(data)
    with pytest.raises(SpecError) as info:
        validate(_write(folder, _spec({"file": name}, **extra)))
    return "\n".join(issue.format() for issue in info.value.issues)


def _cli(path: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["validate", str(path)])
    return result.exit_code, result.output


# --------------------------------------------------------------------------- what a file is


def test_a_device_a_folder_and_a_fifo_are_refused_without_reading(tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    assert "dataset file '/dev/zero' is a character device, not a regular file" in _issues(
        tmp_path, "/dev/zero"
    )
    assert "dataset file 'folder.jsonl' is a folder, not a regular file" in _issues(
        tmp_path, "folder.jsonl"
    )
    os.mkfifo(tmp_path / "pipe.jsonl")
    found: list[str] = []
    worker = threading.Thread(target=lambda: found.append(_issues(tmp_path, "pipe.jsonl")))
    worker.daemon = True
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "reading a FIFO hung"
    assert "'pipe.jsonl' is a FIFO (named pipe), not a regular file" in found[0]
    assert "dataset.file" in found[0]


def test_a_fifo_swapped_in_after_the_check_does_not_hang(tmp_path, monkeypatch):
    """Opening is non-blocking: a FIFO that replaces the file between stat and open is refused
    by the check on the opened file."""
    from specsight.compile import dataset_files
    from specsight.compile.dataset_files import DatasetFileError, _open_regular

    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "file").write_text("{}")
    regular = os.stat(tmp_path / "file")
    with monkeypatch.context() as patch, pytest.raises(DatasetFileError, match="FIFO"):
        patch.setattr(dataset_files.os, "stat", lambda _path: regular)  # what stat saw
        _open_regular(str(tmp_path / "pipe"), 10)


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "MAX_DATASET_BYTES", 1000)
    text = _issues(tmp_path, "big.jsonl", _jsonl([ROW] * 20))
    size = (tmp_path / "big.jsonl").stat().st_size
    assert f"dataset file 'big.jsonl' is {size:,} bytes; a dataset file may have at most 1,000" in (
        text
    )
    assert "split the file" in text


def test_a_long_line_is_refused_before_it_is_held_whole(tmp_path, monkeypatch):
    """A line over the limit stops the read there: the memory used stays near the limit,
    not the line's size."""
    monkeypatch.setattr(D, "MAX_LINE_BYTES", 10_000)
    (tmp_path / "long.jsonl").write_bytes(
        _jsonl([ROW]).encode() + b'{"clean": "' + b"x" * 5_000_000 + b'"}\n'
    )
    loaded = _loaded(_write(tmp_path, _spec({"file": "long.jsonl"})))
    tracemalloc.start()
    try:
        with pytest.raises(SpecError) as info:
            D.read_items(*loaded)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "'long.jsonl' line 2 is over 10,000 bytes, the most one line may have" in str(info.value)
    assert peak < 200_000, f"{peak:,} bytes traced while refusing a 5 MB line"
    assert "line 2 is over" in _issues(tmp_path, "long.jsonl")  # validate: the same issue


def test_a_line_at_the_limit_is_read(tmp_path, monkeypatch):
    line = json.dumps(ROW).encode()
    monkeypatch.setattr(D, "MAX_LINE_BYTES", len(line))
    (tmp_path / "ok.jsonl").write_bytes(line + b"\n" + line)  # the last line has no newline
    validate(_write(tmp_path, _spec({"file": "ok.jsonl"})))
    monkeypatch.setattr(D, "MAX_LINE_BYTES", len(line) - 1)
    assert "line 1 is over" in _issues(tmp_path, "ok.jsonl")


def test_the_digest_is_of_the_raw_bytes_and_a_bom_is_dropped(tmp_path):
    for name, raw in (
        ("bom.jsonl", b"\xef\xbb\xbf" + _jsonl([ROW, ROW]).encode()),
        ("crlf.csv", b"\xef\xbb\xbfclean,corrupt,io,s\r\n" + b"a,b, c, d\r\n" * 2),
    ):
        (tmp_path / name).write_bytes(raw)
        items = D.read_items(*_loaded(_write(tmp_path, _spec({"file": name}))))
        assert items is not None and items.sha256 == hashlib.sha256(raw).hexdigest()
        assert items.columns == ("clean", "corrupt", "io", "s")  # no BOM in the first name
        assert len(items.rows) == 2


def _loaded(path: Path) -> tuple[Any, Any]:
    from specsight.spec import document_of

    spec = specsight.load_spec(path)
    return spec, document_of(spec)


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    raw = _jsonl([ROW]).encode() + b'{"clean": "\xff"}\n'
    assert "'bad.jsonl' line 2 is not UTF-8" in _issues(tmp_path, "bad.jsonl", raw)


# --------------------------------------------------------------------------- JSONL


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"clean": "a", "clean": "b"}', "line 2: key 'clean' appears twice in one object"),
        ('{"clean": ' + "[" * 10_000 + "]" * 10_000 + "}", "line 2: lists or objects nested"),
        ("[" * 10_000 + "]" * 10_000, "line 2: lists or objects nested too deeply"),
        ('{"a": ' + '{"a": ' * 10_000 + "1" + "}" * 10_001, "line 2: lists or objects nested"),
        ('{"clean": {"x": 1}}', "line 2: column 'clean' holds a list or object"),
        (
            '{"clean": "x\\ud800y", "corrupt": "a", "io": " a", "s": " b"}',
            "line 2: column 'clean' holds a lone surrogate \\ud800; text must be whole",
        ),
        ('{"\\udc00": "x"}', "line 2: the name of a column holds a lone surrogate \\udc00"),
    ],
)
def test_broken_jsonl_rows_are_located(tmp_path, line, expected):
    text = _issues(tmp_path, "rows.jsonl", _jsonl([ROW]) + line + "\n")
    assert expected in text
    assert "dataset.file" in text


def test_a_surrogate_pair_escape_is_one_character(tmp_path):
    row = dict(ROW, clean=ROW["clean"] + " \\ud83d\\ude00")
    (tmp_path / "pair.jsonl").write_text(_jsonl([ROW]) + json.dumps(row).replace("\\\\", "\\"))
    items = D.read_items(*_loaded(_write(tmp_path, _spec({"file": "pair.jsonl"}))))
    assert items is not None and items.rows[1]["clean"].endswith(" \U0001f600")


def test_a_lone_surrogate_in_inline_rows_is_located_at_the_row():
    for dataset, path in (
        ({"rows": [ROW, dict(ROW, io=" \ud800")]}, ("dataset", "rows", 1, "io")),
        ([ROW, dict(ROW, io=" \ud800")], ("dataset", 1, "io")),
    ):
        with pytest.raises(SpecError) as info:
            validate(_spec(dataset))
        (issue,) = info.value.issues
        assert issue.path == path
        assert "dataset row 2, column 'io' holds a lone surrogate \\ud800" in issue.message


# --------------------------------------------------------------------------- CSV


HEADER = "clean,corrupt,io,s\n"
GOOD = "When Mary and John,When Mary and John, Mary, John\n"


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            HEADER + GOOD + '"When Mary,a, b, c\n' + GOOD * 3,
            "'q.csv' line 3: a quote opened in this row is never closed",
        ),
        (
            HEADER + '"When Mary,a, b, c\nx,y, z, w\n"q",r, s, t\n' + GOOD,
            "the row runs from line 2 to line 4: is a quote not closed?",
        ),
        (HEADER + GOOD + "x,y, z\n", "'q.csv' line 3: fewer fields than the header names (3;"),
        (HEADER + "x,y, z, w, v\n", "'q.csv' line 2: more fields than the header names (5;"),
        ("clean,corrupt,io,clean\n" + GOOD, "'q.csv' line 1: the header names column 'clean'"),
        (HEADER + "x" * 140_000 + ",a, b, c\n", "'q.csv' line 2: a field is over 100,000"),
        (HEADER + "x" * 100_001 + ",a, b, c\n", "column 'clean' holds 100,001 characters"),
        (HEADER + '"x" y,a, b, c\n', "'q.csv' line 2: ',' expected after '\"'"),
        ("\n" + GOOD, "'q.csv' line 1: no header line"),
        (HEADER.replace("\n", "\r") + GOOD, "'q.csv' line 1: a carriage return (\\r) ends a line"),
    ],
)
def test_csv_is_parsed_strictly(tmp_path, content, expected):
    text = _issues(tmp_path, "q.csv", content)
    assert expected in text, text
    assert "dataset.file" in text and "csv.Error" not in text


def test_a_smaller_field_limit_applies(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "MAX_FIELD_CHARS", 10)
    text = _issues(tmp_path, "q.csv", HEADER + "x" * 11 + ",a, b, c\n")
    assert "'q.csv' line 2: column 'clean' holds 11 characters; a field may have at most 10" in text


def test_quoted_fields_may_hold_line_breaks_and_empty_strings_are_values(tmp_path):
    spec = _spec({"file": "ok.csv"}, metrics={})
    spec["invokes"]["empty"] = {"prompt": "Then{s}"}
    (tmp_path / "ok.csv").write_text(
        HEADER + '"When Mary\nand John",When Mary and John, Mary,\n\n' + GOOD
    )
    items = D.read_items(*_loaded(_write(tmp_path, spec)))
    assert items is not None
    assert [row["clean"] for row in items.rows] == ["When Mary\nand John", "When Mary and John"]
    assert items.rows[0]["s"] == ""
    results = specsight.run(_write(tmp_path, spec), model=tiny())
    assert results.prompts["empty"] == ["Then", "Then John"]


# --------------------------------------------------------------------------- missing values


def test_a_row_without_a_column_a_template_uses_names_the_row_and_template(tmp_path):
    rows = [dict(ROW) for _ in range(8)]
    del rows[6]["corrupt"]  # line 7, used by invokes.corrupt.prompt
    del rows[2]["s"]  # line 3, used by the foil
    content = _jsonl(rows[:5]) + "\n" + _jsonl(rows[5:])  # a blank line 6: row 7 is on line 8
    text = _issues(tmp_path, "ioi.jsonl", content)
    assert (
        "invokes.corrupt.prompt: dataset row 7 (line 8 of ioi.jsonl) has no value for column "
        "'corrupt', which invokes.corrupt.prompt uses" in text
    )
    assert (
        "metrics.ld.foil: dataset row 3 (line 3 of ioi.jsonl) has no value for column 's'" in text
    )
    assert "'{" not in text  # no literal template ran


def test_null_values_used_by_templates_are_errors_and_unused_ones_are_not(tmp_path):
    rows = [dict(ROW, extra=None) for _ in range(3)]
    rows[1]["clean"] = None
    text = _issues(tmp_path, "ioi.jsonl", _jsonl(rows))
    assert "invokes.clean.prompt: dataset row 2 (line 2 of ioi.jsonl) holds null in column " in text
    assert "encodes to no tokens" not in text
    assert "extra" not in text
    rows[1]["clean"] = ROW["clean"]
    (tmp_path / "ioi.jsonl").write_text(_jsonl(rows))
    validate(_write(tmp_path, _spec({"file": "ioi.jsonl"})))


def test_positions_and_all_metric_fields_are_checked(tmp_path):
    rows = [dict(ROW), {k: v for k, v in ROW.items() if k != "io"}]
    spec = _spec({"rows": rows})
    spec["invokes"]["corrupt"]["ops"] = [
        {"op": "zero", "site": "resid_post.0", "positions": [{"token": "{io}"}]}
    ]
    spec["metrics"] = {
        "p": {"kind": "prob", "invoke": "clean", "token": "{io}"},
        "lp": {"kind": "logprob", "invoke": "clean", "tokens": [" a", "{io}"]},
        "at": {"kind": "logits", "invoke": "clean", "token": " a", "position": {"token": "{io}"}},
    }
    with pytest.raises(SpecError) as info:
        validate(spec)
    paths = {issue.path for issue in info.value.issues}
    assert paths == {
        ("invokes", "corrupt", "ops", 0, "positions"),
        ("metrics", "p", "token"),
        ("metrics", "lp", "tokens"),
        ("metrics", "at", "position"),
    }
    message = info.value.issues[0].message
    assert "dataset row 2 (dataset.rows[1]) has no value for column 'io'" in message


def test_rows_left_out_by_the_sample_may_lack_values(tmp_path):
    rows = [dict(ROW) for _ in range(10)]
    spec = _spec({"rows": rows, "sample": {"n": 3, "seed": 0}})
    items = D.read_items(*_loaded(_write(tmp_path, spec)))
    assert items is not None
    unused = next(i for i in range(10) if i not in items.indices)
    rows[unused] = {"clean": None}
    validate(_write(tmp_path, _spec({"rows": rows, "sample": {"n": 3, "seed": 0}})))
    rows[items.indices[0]] = {"clean": None}
    with pytest.raises(SpecError, match=f"dataset row {items.indices[0] + 1} "):
        validate(_write(tmp_path, _spec({"rows": rows, "sample": {"n": 3, "seed": 0}})))


def test_a_missing_value_stops_a_run_too(tmp_path):
    rows = [dict(ROW), {k: v for k, v in ROW.items() if k != "corrupt"}]
    (tmp_path / "ioi.jsonl").write_text(_jsonl(rows))
    with pytest.raises(SpecError, match="has no value for column 'corrupt'"):
        specsight.run(_write(tmp_path, _spec({"file": "ioi.jsonl"})), model=tiny())


# --------------------------------------------------------------------------- no dataset


def test_a_column_template_without_a_dataset_is_located():
    spec = _spec(None)
    del spec["dataset"]
    spec["invokes"] = {"a": {"prompt": "When {io} and John went"}}
    spec["metrics"] = {
        "p": {"kind": "prob", "invoke": "a", "token": "{io}"},
        "lp": {"kind": "logprob", "invoke": "a", "tokens": [" a", "{s}"]},
    }
    for check in (validate, lambda s: specsight.run(s, model=tiny())):
        with pytest.raises(SpecError) as info:
            check(spec)
        found = {i.path: (i.message, i.hint) for i in info.value.issues}
        message = "'{io}' names a dataset column, but the spec has no dataset:"
        assert found[("invokes", "a", "prompt")][0] == message
        assert "write {{io}} for literal braces" in found[("invokes", "a", "prompt")][1]
        assert found[("metrics", "p", "token")][0] == message
        assert found[("metrics", "lp", "tokens", 1)][1].startswith("add dataset: {file: ...}")


def test_escaped_braces_are_literal_text_without_a_dataset():
    spec = {"specsight": 1, "model": "tiny-llama", "invokes": {"a": {"prompt": "When {{io}} went"}}}
    lm = tiny()
    plan = specsight.compile_plan(specsight.load_spec(spec), lm.info, lm.tokenizer)
    assert list(plan.rows[0].tokens) == lm.tokenizer.encode("When {io} went")


# --------------------------------------------------------------------------- the CLI


def test_the_cli_exits_2_without_a_traceback(tmp_path):
    cases = {
        "deep.jsonl": '{"clean": ' + "[" * 10_000 + "]" * 10_000 + "}\n",
        "surrogate.jsonl": '{"clean": "\\ud800"}\n',
        "quote.csv": HEADER + '"x,y, z, w\n',
        "big.csv": HEADER + "x" * 200_000 + ",a, b, c\n",
        "missing.jsonl": _jsonl([ROW, {"clean": "x"}]),
    }
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        code, output = _cli(_write(tmp_path, _spec({"file": name})))
        assert code == 2, output
        assert "Traceback" not in output and "internal error" not in output
        assert "spec.yaml:" in output, output
    os.mkfifo(tmp_path / "pipe.jsonl")
    code, output = _cli(_write(tmp_path, _spec({"file": "pipe.jsonl"})))
    assert code == 2 and "FIFO" in output
    spec = _spec(None, metrics={"p": {"kind": "prob", "invoke": "a", "token": "{io}"}})
    spec.pop("dataset")
    spec["invokes"] = {"a": {"prompt": "When Mary went"}}
    code, output = _cli(_write(tmp_path, spec))
    assert code == 2 and "'{io}' names a dataset column" in output
