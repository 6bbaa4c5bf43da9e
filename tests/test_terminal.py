"""What the command line prints where nobody watches a terminal (CI logs, pipes): captured off
a TTY at 60 and 200 columns, lines are never wrapped, so each claim keeps its ``file:line:col``
on the line of its message, and grids still fit the width. ``-q`` names each failed claim;
a usage error under ``--json`` is JSON; the progress clock starts at the first forward."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CLEAN

MESSAGE = "a message long enough that a terminal of sixty columns would have to wrap it twice over"


def _spec(tmp_path: Path, *, fail: bool = False) -> Path:
    spec = {
        "specsight": 1,
        "model": "tiny-gpt2",
        "invokes": {
            "a": {"prompt": CLEAN, "sweep": {"layer": "all", "pos": "all"},
                  "ops": [{"op": "zero", "site": "resid_post.{layer}", "positions": ["{pos}"]}]},
        },
        "metrics": {"p": {"kind": "prob", "invoke": "a", "token": " Mary"}},
        "expect": [
            {"metric": "p", "greater_than": 0.0, "message": MESSAGE},
            {"metric": "p", "less_than": 0.0 if fail else 1.0, "message": "never below zero"},
        ],
    }  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _cli(*args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    script = Path(sys.executable).parent / "specsight"  # the installed command, as users run it
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "specsight"]
    command = [*launcher, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("columns", [60, 200])
def test_off_a_terminal_claims_stay_on_one_line_and_grids_fit(tmp_path, columns):
    spec = _spec(tmp_path)
    done = _cli("run", spec, columns=columns)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    claims = [line for line in lines if re.match(r"(ok  |FAIL) \S+:\d+:\d+ expect\[\d\]", line)]
    assert len(claims) == 2
    assert claims[0].endswith(f"({MESSAGE})")  # the whole claim on its line, however long
    assert len(claims[0]) > 60
    grid = [line for line in lines if re.match(r"\s+\d+\s+[+-]\d", line)]  # rows of the grid
    assert grid and max(len(line) for line in grid) <= columns
    assert "\x1b[" not in done.stdout  # no colour codes in a log


def test_without_columns_off_a_terminal_nothing_wraps(tmp_path):
    done = _cli("run", _spec(tmp_path))
    assert done.returncode == 0, done.stderr
    assert any(line.endswith(f"({MESSAGE})") for line in done.stdout.splitlines())


def test_quiet_names_each_failed_claim(tmp_path):
    spec = _spec(tmp_path, fail=True)
    done = _cli("run", "-q", spec)
    assert done.returncode == 1 and done.stdout == ""
    failed = [line for line in done.stderr.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1
    assert f"{spec}:" in failed[0] and "expect[1]" in failed[0] and "never below zero" in failed[0]
    assert done.stderr.rstrip().endswith("1 of 2 expectation(s) failed")


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--json", "--no-such-option", "x.yaml"], "No such option"),
        (["run", "--json"], "Missing argument"),
        (["validate", "--json", "--max-batch", "x"], "No such option"),
        (["run", "--json", "--max-batch", "zero", "x.yaml"], "not a valid integer"),
    ],
)
def test_usage_errors_under_json_are_json(args, message):
    done = _cli(*args)
    assert done.returncode == 2
    body = json.loads(done.stdout)
    assert body["ok"] is False and body["error"] == "UsageError" and message in body["message"]
    assert body["hint"].startswith("see ") and body["hint"].endswith(" --help")


def test_usage_errors_without_json_stay_text():
    done = _cli("run", "--no-such-option", "x.yaml")
    assert done.returncode == 2 and done.stdout == "" and "No such option" in done.stderr


def test_progress_clock_starts_at_the_first_forward_and_reads_elapsed_then_left(monkeypatch):
    from rich.progress import TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from specsight.cli.run import progress_callback

    update, progress = progress_callback(True)
    task = progress.tasks[0]
    assert task.start_time is None  # model loading and compiling are not on the clock
    texts = [
        c.text_format if isinstance(c, TextColumn) else type(c).__name__ for c in progress.columns
    ]
    elapsed, left = texts.index("elapsed"), texts.index("left")
    assert texts[elapsed + 1] == TimeElapsedColumn.__name__
    assert texts[left + 1] == TimeRemainingColumn.__name__ and elapsed < left
    try:
        update(4, 10)
        assert task.start_time is not None and progress.tasks[0].completed == 4
    finally:
        progress.stop()
