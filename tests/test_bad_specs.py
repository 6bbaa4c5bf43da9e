"""The bad-input corpus: every malformed spec in tests/bad_specs gives its expected located error.

Each ``tests/bad_specs/NN_name.yaml`` holds one realistic mistake; its first line says which
error code it must produce (``# expect: unknown-op``; JSON files are listed in ``JSON_EXPECT``).
``NN_name.err`` beside it is the golden rendering of the error (``SpecError.render()`` with the
path relative to the repository root). ``pytest --update-golden`` rewrites the golden files,
except those of the cases in ``XFAIL``: they hold, written by hand, the output wanted once the
compiler is fixed.

A spec goes through the same steps as ``specsight plan``: load, validate, compile against the
tiny model's ModelInfo and tokenizer (no weights). A user mistake must never escape as anything
other than a :class:`SpecError`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from specsight.cli import main
from specsight.compile import compile_plan
from specsight.errors import SpecError
from specsight.spec import MAX_BYTES, load_file, validate_spec

ROOT = Path(__file__).resolve().parent.parent
BAD = Path(__file__).resolve().parent / "bad_specs"
REL = BAD.relative_to(ROOT)

#: expected error codes of the JSON cases (YAML cases carry a ``# expect:`` first line)
JSON_EXPECT = {
    "47_duplicate_key.json": ["duplicate-key"],
    "48_json_syntax.json": ["json-syntax"],
    "60_json_nan.json": ["bad-value"],
    "61_json_top_level_list.json": ["not-a-mapping"],
    "75_json_comment.json": ["json-syntax"],
}

#: issues about the file as a whole: no line, no path
FILE_LEVEL = {"too-large", "empty", "encoding", "file-not-found"}

#: issues about the document's text rather than one part of the spec: a line but maybe no path
TEXT_LEVEL = {"yaml-syntax", "json-syntax", "multiple-documents", "not-a-mapping"}


def _too_large() -> str:
    """A spec whose prompt was pasted from a whole book: just over the size limit."""
    words = " ".join(["Mary"] * (MAX_BYTES // 5 + 10))
    return (
        "# expect: too-large\n"
        "specsight: 1\n"
        "model: {id: tiny-llama}\n"
        "invokes:\n"
        f'  clean: {{prompt: "{words}"}}\n'
    )


#: cases whose golden file holds the output the compiler should give, not what it gives today
#: cases whose message is known to be wrong, with the reason (none at present)
XFAIL: dict[str, str] = {}

#: cases built at run time (too big to commit); their golden file sits in bad_specs all the same
GENERATED: dict[str, Callable[[], str]] = {"51_too_large.yaml": _too_large}

CASES = sorted([p.name for p in BAD.iterdir() if p.suffix in (".yaml", ".json")] + list(GENERATED))


@functools.cache
def _model_info(model_id: str):
    from specsight.models.load import load_model_info

    return load_model_info(model_id)


def check(path: str) -> None:
    """Load, validate and compile one spec file exactly as ``specsight plan`` does."""
    doc = load_file(path)
    spec = validate_spec(doc)
    info, tokenizer = _model_info(spec.model.id)
    compile_plan(spec, info, tokenizer, doc=doc)


def expected_codes(name: str, text: str) -> list[str]:
    if name in JSON_EXPECT:
        return JSON_EXPECT[name]
    first = text.splitlines()[0] if text else ""
    match = re.fullmatch(r"# expect: ([a-z\-, ]+)", first)
    assert match, f"{name}: the first line must be '# expect: CODE[, CODE...]'"
    return [code.strip() for code in match.group(1).split(",")]


def error_of(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, SpecError]:
    """(the spec's text, the SpecError it raises), with file paths relative to the repo root."""
    monkeypatch.chdir(ROOT)
    rel = f"{REL.as_posix()}/{name}"
    if name in GENERATED:
        text = GENERATED[name]()
        target = tmp_path / name
        target.write_text(text, encoding="utf-8")
        load_path = str(target)
    else:
        text = (BAD / name).read_text(encoding="utf-8", errors="replace")
        load_path = rel
    with pytest.raises(SpecError) as info:
        check(load_path)
    error = info.value
    if load_path != rel:  # show a generated file under its corpus name
        issues = [
            dataclasses.replace(i, file=rel) if i.file == load_path else i for i in error.issues
        ]
        error = SpecError(issues)
    return text, error


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(reason=XFAIL[n])) if n in XFAIL else n for n in CASES],
)
def test_bad_spec(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, update_golden: bool):
    text, error = error_of(name, tmp_path, monkeypatch)
    rendered = error.render() + "\n"
    assert "Traceback" not in rendered

    codes = [issue.code for issue in error.issues]
    assert codes == expected_codes(name, text), rendered

    rel = f"{REL.as_posix()}/{name}"
    for issue in error.issues:
        assert issue.file == rel, rendered
        assert issue.message, rendered
        if issue.code in FILE_LEVEL:
            continue
        assert issue.line is not None and issue.col is not None, rendered
        top_level_key = issue.code == "missing-key" and issue.line <= 2
        if issue.code not in TEXT_LEVEL and not top_level_key:
            assert issue.path, f"{issue.code} issue has no path: {rendered}"

    golden = BAD / (Path(name).stem + ".err")
    if update_golden and name not in XFAIL:  # those hold the wanted output, written by hand
        golden.write_text(rendered, encoding="utf-8")
    assert golden.exists(), f"no golden file {golden.name}: run pytest --update-golden"
    assert rendered == golden.read_text(encoding="utf-8")


def test_corpus_is_large_and_golden_files_are_not_orphans():
    assert len(CASES) >= 40
    stems = {Path(name).stem for name in CASES}
    orphans = [p.name for p in BAD.glob("*.err") if p.stem not in stems]
    assert not orphans


def test_errors_point_at_the_mistaken_line():
    """Spot-checks, by hand, that errors point at the line of the mistake (the golden files pin
    every position; this guards against blessing a wrong one with --update-golden)."""
    lines = {
        "02_typo_op_key.yaml": 12,  # postions:
        "03_unknown_op.yaml": 9,
        "14_unknown_site.yaml": 8,
        "25_patch_from_unknown.yaml": 9,
        "43_yaml_anchor.yaml": 6,
        "46_duplicate_key.yaml": 7,
        "49_yaml_bad_indent.yaml": 7,
    }
    for name, line in lines.items():
        with pytest.raises(SpecError) as info:
            check(str(BAD / name))
        assert info.value.issues[0].line == line, (name, info.value.render())


# ----------------------------------------------------------------------------- the CLI

#: bad specs that ``validate`` catches (it loads and validates; it does not compile)
CLI_CASES = [
    "03_unknown_op.yaml",
    "12_invoke_name_space.yaml",
    "44_billion_laughs.yaml",
    "48_json_syntax.json",
    "53_empty.yaml",
]


def _cli(args: list[str]):
    runner = CliRunner()
    return runner.invoke(main, args, catch_exceptions=False)


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_validate_reports_located_error(name: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    rel = f"{REL.as_posix()}/{name}"
    result = _cli(["validate", rel])
    assert result.exit_code == 2
    golden = (BAD / (Path(name).stem + ".err")).read_text(encoding="utf-8")
    assert result.stderr == golden
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_validate_json_lists_issues(name: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    rel = f"{REL.as_posix()}/{name}"
    result = _cli(["validate", "--json", rel])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and payload["checked"] == 1
    assert payload["issues"]
    for issue in payload["issues"]:
        assert {"file", "line", "col", "path", "code", "message", "hint"} <= set(issue)
        assert issue["file"] == rel


def test_cli_validate_several_files_reports_each(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    paths = [f"{REL.as_posix()}/{name}" for name in CLI_CASES[:2]]
    result = _cli(["validate", *paths])
    assert result.exit_code == 2
    for path in paths:
        assert path in result.stderr


@pytest.mark.parametrize(
    "name", ["14_unknown_site.yaml", "33_unknown_sweep_variable.yaml", "06_wrong_version.yaml"]
)
def test_cli_plan_bad_spec_exits_2(name: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    rel = f"{REL.as_posix()}/{name}"
    result = _cli(["plan", rel])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    golden = (BAD / (Path(name).stem + ".err")).read_text(encoding="utf-8")
    assert result.stderr == golden

    as_json = _cli(["plan", "--json", rel])
    assert as_json.exit_code == 2
    payload = json.loads(as_json.stdout)
    assert payload["ok"] is False and payload["error"] == "SpecError"
    assert all(issue["line"] for issue in payload["issues"])


def test_cli_missing_file_is_a_spec_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    result = _cli(["plan", f"{REL.as_posix()}/03_unknown_opp.yaml"])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
    assert "did you mean '03_unknown_op.yaml'" in result.stderr
    assert "Traceback" not in result.output


def test_real_process_shows_no_traceback():
    """One real process, so nothing CliRunner does hides a traceback or a wrong exit code."""
    rel = f"{REL.as_posix()}/03_unknown_op.yaml"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", "from specsight.cli import main; main()", "validate", rel],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr == (BAD / "03_unknown_op.err").read_text(encoding="utf-8")
    assert proc.stdout == ""
