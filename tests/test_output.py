"""Run folders (--out) are written atomically: never partial, never mixed with another run,
never replacing another spec's run without --force or files that are not a run; problems with
the folder are found before the run starts (exit 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import specsight
from specsight.cli import main
from specsight.errors import OutputError
from specsight.results import MANIFEST_FILE, REPORT_FILE, RESULTS_FILE, Results
from tests.conftest import ioi_spec, tiny

SPEC = ioi_spec(name="folder-a", sweep={"layer": "all", "pos": [9, 13]})
OTHER = ioi_spec(name="folder-b", sweep={"layer": "all", "pos": [0, 9]})


def _write(tmp_path: Path, spec: dict, name: str) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_rerun_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "run"
    specsight.run(SPEC, model=tiny("tiny-llama"), out=out)
    first = (out / MANIFEST_FILE).read_text()
    (out / "stale.png").write_bytes(b"a heatmap of an older run")
    specsight.run(SPEC, model=tiny("tiny-llama"), out=out)
    assert not (out / "stale.png").exists()  # the folder was replaced, not written into
    assert (out / MANIFEST_FILE).read_text() != first  # a new manifest (timings, created)
    files = sorted(p.name for p in out.iterdir())
    heatmap = ["ld.png", "ld.svg", "ld.csv"]  # the heatmap, drawn and as its cells
    assert files == sorted([MANIFEST_FILE, RESULTS_FILE, REPORT_FILE, *heatmap])
    assert _leftovers(tmp_path) == []
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644
    assert out.stat().st_mode & 0o777 == 0o755


def test_another_specs_run_is_kept_unless_forced(tmp_path):
    out = tmp_path / "run"
    specsight.run(SPEC, model=tiny("tiny-llama"), out=out)
    before = (out / RESULTS_FILE).read_bytes()
    with pytest.raises(OutputError, match="holds a run of another spec \\('folder-a'\\)") as err:
        specsight.run(OTHER, model=tiny("tiny-llama"), out=out)
    assert "--force" in str(err.value)
    assert (out / RESULTS_FILE).read_bytes() == before
    specsight.run(OTHER, model=tiny("tiny-llama"), out=out, force=True)
    assert Results.load(out).manifest["spec"]["name"] == "folder-b"


def test_a_folder_that_is_not_a_run_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(OutputError, match="holds files but no run"):
            specsight.run(SPEC, model=tiny("tiny-llama"), out=out, force=force)
    assert (out / "notes.txt").read_text() == "mine"


def test_an_interrupted_write_leaves_the_previous_run_intact(tmp_path, monkeypatch):
    out = tmp_path / "run"
    specsight.run(SPEC, model=tiny("tiny-llama"), out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("specsight.results.results.write_heatmaps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        specsight.run(SPEC, model=tiny("tiny-llama"), out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_a_full_disk_leaves_no_partial_folder(tmp_path, monkeypatch):
    out = tmp_path / "new"

    real = Path.write_bytes

    def full(path, data):
        if path.name == "results.safetensors":
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OutputError, match="No space left on device"):
        specsight.run(SPEC, model=tiny("tiny-llama"), out=out)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_folder_problems_are_found_before_running(tmp_path, monkeypatch):
    """An output that cannot be written fails in milliseconds with exit 2, not after the run
    as an internal error."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    spec = _write(tmp_path, SPEC, "s.yaml")

    def no_run(*_args, **_kwargs):  # the run must not start
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("specsight.models.load.load_model_ref", no_run)
    runner = CliRunner()
    for out, message in (
        (blocker / "run", "is a file, not a folder"),
        (blocker, "is a file"),
    ):
        result = runner.invoke(main, ["run", str(spec), "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert message in result.stderr and "Traceback" not in result.output


def test_an_unwritable_parent_is_refused_before_running(tmp_path, monkeypatch):
    """A folder whose parent the user cannot write (os.access says so; root can write anywhere,
    so the answer is the operating system's, simulated here)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode: False if str(path) == str(locked) else real_access(path, mode),
    )
    with pytest.raises(OutputError, match="not writable"):
        specsight.run(SPEC, model=tiny("tiny-llama"), out=locked / "run")
    assert list(locked.iterdir()) == []


_KILLED_WRITER = """
import os, signal, sys, time
from pathlib import Path
from specsight.results import folder as F

out, stage = Path(sys.argv[1]), sys.argv[2]
def write(tmp):
    (tmp / "manifest.json").write_text('{"spec": {"sha256": "s", "name": "new"}}')
    if stage == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
real = os.replace
def replace(src, dst):
    real(src, dst)
    if stage == "replacing":  # the old run moved aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
F.os.replace = replace
F.write_folder(out, write, "s", force=True)
"""


def _killed_write(out: Path, stage: str) -> None:
    import signal
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out), stage])
    assert done.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stage", ["writing", "replacing"])
def test_a_killed_write_is_cleaned_up_by_the_next(tmp_path, stage):
    """A write killed with SIGKILL leaves its temporary folders behind (nothing can run in the
    dying process); the next write beside it removes them, and puts the previous run back
    first when the kill came between moving it aside and renaming the new one in."""
    from specsight.results.folder import clean_stale, write_folder

    out = tmp_path / "run"
    old = '{"spec": {"sha256": "s", "name": "old"}}'
    write_folder(out, lambda tmp: (tmp / MANIFEST_FILE).write_text(old), "s")
    _killed_write(out, stage)
    left = _leftovers(tmp_path)
    assert left and all(name.startswith((".run.tmp-", ".run.old-")) for name in left)
    assert out.is_dir() == (stage == "writing")

    live = tmp_path / f".run.tmp-{os.getpid()}-busy"  # a live writer's folder is kept
    live.mkdir()
    clean_stale(out)
    assert _leftovers(tmp_path) == [live.name]
    assert (out / MANIFEST_FILE).read_text() == old  # the previous run, back in place
    live.rmdir()
    new = old.replace("old", "new")
    write_folder(out, lambda tmp: (tmp / MANIFEST_FILE).write_text(new), "s")
    assert _leftovers(tmp_path) == [] and (out / MANIFEST_FILE).read_text() == new


def test_files_and_folders_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    from specsight.results import folder as F

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(f"replace {Path(src).name[:8]} -> {Path(dst).name}")
        return real_replace(src, dst)

    monkeypatch.setattr(F.os, "fsync", fsync)
    monkeypatch.setattr(F.os, "replace", replace)
    out = tmp_path / "run"

    def write(tmp):
        (tmp / MANIFEST_FILE).write_text("{}")
        (tmp / RESULTS_FILE).write_bytes(b"x")

    F.write_folder(out, write, "s")
    rename = events.index("replace .run.tmp -> run")
    before = events[:rename]
    assert {"fsync " + MANIFEST_FILE, "fsync " + RESULTS_FILE} <= set(before)
    assert any(e.startswith("fsync .run.tmp-") for e in before)
    assert events[rename + 1 :] == ["fsync " + tmp_path.name]
