"""The run's HTML page (``report.html``): self-contained, escaped, every metric plotted with its
labels and colour centre, written by ``run --out`` and ``specsight report``, and working in a
real headless browser (Debian's chromium): no console errors, a hovered cell's tooltip, a
screenshot kept as a test artifact."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import specsight
from specsight.cli import main
from specsight.results import REPORT_FILE, Outcome, Results, render_report
from tests.conftest import CLEAN, CORRUPT, tiny

ROOT = Path(__file__).resolve().parent.parent
NASTY = "a </script><b>bold</b> & <!-- x"

#: the IOI sweep on tiny-llama as a spec file (its lines are what the page shows)
SPEC = f"""\
specsight: 1
name: report-tiny
model: tiny-llama
invokes:
  clean:
    prompt: "{CLEAN}"
  corrupt:
    prompt: "{CORRUPT}"
  patched:
    prompt: "{CORRUPT}"
    sweep: {{layer: all, pos: all}}
    ops:
      - {{op: patch, site: "resid_post.{{layer}}", positions: ["{{pos}}"], from: clean}}
  odd:
    prompt: "{NASTY}"
    generate: {{max_new_tokens: 3}}
metrics:
  clean_ld: {{kind: logit_diff, invoke: clean, target: " Mary", foil: " John"}}
  corrupt_ld: {{kind: logit_diff, invoke: corrupt, target: " Mary", foil: " John"}}
  ld: {{kind: logit_diff, invoke: patched, target: " Mary", foil: " John"}}
  recovery: {{kind: recovery, patched: ld, clean: clean_ld, corrupt: corrupt_ld}}
  top: {{kind: top_k, invoke: clean, k: 5}}
expect:
  - {{metric: recovery, where: {{pos: 0}}, approx: 0, atol: 0.01, message: "the first token is shared"}}
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    spec = folder / "report_tiny.yaml"
    spec.write_text(SPEC)
    specsight.run(spec, model=tiny("tiny-llama"), out=folder / "run")
    return folder / "run"


def _payload(page: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="specsight-data">(.*?)</script>', page)
    assert match, "no embedded data"
    return json.loads(match.group(1))


def _metric(page: str, name: str) -> dict[str, Any]:
    return next(m for m in _payload(page)["metrics"] if m["name"] == name)


def _synthetic(metrics: dict[str, torch.Tensor], tensors: dict[str, Any], **extra: Any) -> Results:
    content = {"specsight": 1, "model": "m", "invokes": {"a": {"prompt": NASTY}}}
    manifest = {
        "spec": {"name": "synthetic", "file": None, "sha256": "0" * 64, "content": content},
        "model": {"id": "m", "dtype": "float32", "device": "cpu"},
        "tensors": tensors,
    }
    return Results(metrics, {}, manifest, {"a": [[("</script>", 0.5)]]}, {"a": [NASTY]}, **extra)


def _meta(kind: str, axes: list[str], shape: list[int], **more: Any) -> dict[str, Any]:
    values = {a: list(range(n)) for a, n in zip(axes, shape)}
    return {"kind": "metric", "metric_kind": kind, "axes": axes, "axis_values": values, **more}


# --------------------------------------------------------------------------- the page


def test_run_out_writes_a_self_contained_report(run_dir):
    page = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # nothing to fetch: no external src/href, stylesheet link, import or url()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"<link\b|@import|url\(\s*['\"]?(https?:)?//", page, re.I)
    assert "default-src 'none'" in page  # and the page's policy forbids fetching anything
    for name in ("clean_ld", "corrupt_ld", "ld", "recovery", "top"):
        assert f"<h3>{name} " in page
        assert _metric(page, name)
    assert "report-tiny" in page and "tiny-llama" in page


def test_prompts_and_generated_text_are_escaped(run_dir):
    page = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    assert NASTY not in page and "<b>bold" not in page
    assert "a &lt;/script&gt;&lt;b&gt;bold&lt;/b&gt; &amp; &lt;!-- x" in page
    assert page.count("</script>") == 2  # only the page's own data and script elements
    assert "Generated text" in page


def test_escaping_of_synthetic_text_in_data_and_spec():
    results = _synthetic(
        {"v": torch.tensor([1.0, -2.0])},
        {"v": _meta("logit_diff", ["pos"], [2], axis_labels={"pos": ["0:</script>", "1:<b>"]})},
        expectations=[Outcome(0, False, "<spec> expect[0]", "v > 1 </script>", "x < y", "<i>")],
    )
    page = render_report(results)
    assert page.count("</script>") == 2 and "<b>" not in page and "<i>" not in page
    assert "\\u003c/script\\u003e" in page  # labels embedded as JSON with < escaped
    assert _metric(page, "v")["labels"]["pos"] == ["0:</script>", "1:<b>"]
    assert "v &gt; 1 &lt;/script&gt;" in page and "x &lt; y" in page


def test_spec_is_shown_with_its_source_lines(run_dir):
    page = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    lines = SPEC.splitlines()
    assert "report_tiny.yaml (sha256 " in page
    assert '<div class="line" id="L1"><span class="ln">1</span><span>specsight: 1</span>' in page
    expect_line = next(i for i, line in enumerate(lines, 1) if "first token is shared" in line)
    metric_line = next(i for i, line in enumerate(lines, 1) if line.startswith("  ld:"))
    assert f'href="#L{expect_line}"' in page  # the verdict links to its claim
    assert f'href="#L{metric_line}"' in page  # the metric to its definition
    assert '<span class="badge ok">ok</span>' in page and "expect 1/1 all held" in page


def test_a_changed_spec_file_falls_back_to_the_recorded_content(run_dir, tmp_path):
    results = Results.load(run_dir)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(SPEC + "# edited after the run\n")
    results.manifest["spec"]["file"] = str(spec_file)
    page = render_report(results)
    assert "has changed since the run; the spec as recorded in the manifest" in page
    assert "edited after the run" not in page
    assert "<span>name: report-tiny</span>" in page  # the recorded content, dumped as YAML


def test_axes_labels_and_colour_centres(run_dir):
    page = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    ld, recovery, top = (_metric(page, n) for n in ("ld", "recovery", "top"))
    assert ld["axes"] == ["layer", "pos"] and ld["shape"] == [4, 14]
    assert ld["labels"]["pos"][9].startswith("9:") and ld["labels"]["layer"] == list("0123")
    assert ld["center"] == 0.0 and recovery["center"] == 0.0  # signed: diverging around 0
    assert top["shape"] == [5] and top["center"] is None  # probabilities: sequential
    assert top["labels"]["k"][0].startswith("0: '")  # the decoded tokens label the k axis
    clean_ld = _metric(page, "clean_ld")
    assert clean_ld["shape"] == [] and len(clean_ld["values"]) == 1
    results = Results.load(run_dir)
    assert ld["values"] == pytest.approx(results["ld"].flatten().tolist())


def test_a_baseline_metric_centres_the_scale_and_stderr_is_embedded():
    meta = _meta("logit_diff", ["layer", "head"], [2, 3], baseline_metric="base")
    companion = {"companion_of": "v", "axes": ["layer", "head"]}
    results = _synthetic(
        {"base": torch.tensor(1.5), "v": torch.rand(2, 3) + 1, "v/stderr": torch.rand(2, 3)},
        {"base": _meta("logit_diff", [], []), "v": meta, "v/stderr": companion},
    )
    page = render_report(results)
    v = _metric(page, "v")
    assert v["center"] == 1.5 and v["baseline_metric"] == "base"
    assert v["extra"]["stderr"] == pytest.approx(results["v/stderr"].flatten().tolist())
    assert [m["name"] for m in _payload(page)["metrics"]] == ["base", "v"]  # no companions


def test_more_than_two_axes_get_slice_pickers_and_huge_tensors_one_slice():
    results = _synthetic(
        {"h": torch.rand(3, 4, 5), "big": torch.randn(4, 300, 60)},
        {
            "h": _meta("prob", ["layer", "pos", "head"], [3, 4, 5]),
            "big": _meta("logit_diff", ["layer", "pos", "item"], [4, 300, 60]),
        },
    )
    page = render_report(results)
    h, big = _metric(page, "h"), _metric(page, "big")
    assert h["shape"] == [3, 4, 5] and len(h["values"]) == 60
    assert "choose the other axes&#x27; values" in page
    assert big["shape"] == [4, 300] and big["axes"] == ["layer", "pos"]
    assert "showing the first slice of [4, 300, 60]" in page


def test_writing_the_report_of_a_30_by_14_sweep_is_cheap():
    meta = _meta("logit_diff", ["layer", "pos"], [30, 14])
    meta["axis_labels"] = {"pos": [f"{i}: tok" for i in range(14)]}
    results = _synthetic({"ld": torch.randn(30, 14)}, {"ld": meta})
    render_report(results)
    start = time.perf_counter()
    page = render_report(results)
    assert time.perf_counter() - start < 0.5
    assert len(_metric(page, "ld")["values"]) == 420


# --------------------------------------------------------------------------- the command


def test_report_command_writes_the_page(run_dir, tmp_path):
    runner = CliRunner()
    target = tmp_path / "pages" / "ioi.html"
    result = runner.invoke(main, ["report", str(run_dir), "--out", str(target)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(target)
    assert target.read_text(encoding="utf-8") == render_report(Results.load(run_dir))
    result = runner.invoke(main, ["report", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"report": str(run_dir / REPORT_FILE)}


def test_report_of_a_folder_that_is_no_run_is_a_usage_error(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a run folder: it has no manifest.json" in result.stderr
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2


def test_cli_run_out_writes_report(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("specsight: 1\nmodel: tiny-llama\ninvokes:\n  a: {prompt: hello there}\n")
    result = CliRunner().invoke(main, ["run", str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "hello there" in (tmp_path / "out" / REPORT_FILE).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- a real browser


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        pytest.fail(
            "the report's browser test needs Debian's chromium: "
            "apt-get install -y --no-install-recommends chromium (.ci/run installs it)"
        )
    return path


def test_report_works_in_a_headless_browser(run_dir):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs playwright: pip install -e '.[dev]'")
    artifacts = Path(os.environ.get("SPECSIGHT_TEST_ARTIFACTS", "runs/test-artifacts"))
    artifacts = artifacts if artifacts.is_absolute() else ROOT / artifacts
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report.png"
    shot.unlink(missing_ok=True)
    ld = Results.load(run_dir)["ld"]
    metrics = _payload((run_dir / REPORT_FILE).read_text(encoding="utf-8"))["metrics"]
    number = [m["name"] for m in metrics].index("ld")  # the page's box metric-<number>
    messages, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: messages.append((m.type, m.text)))
            page.on("pageerror", lambda e: messages.append(("pageerror", str(e))))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((run_dir / REPORT_FILE).resolve().as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=10_000)
            cell = page.locator(f"#metric-{number} svg.heatmap rect.cell[data-r='2'][data-c='9']")
            cell.hover()
            page.wait_for_selector("#tip:not([hidden])", timeout=5_000)
            tip = page.inner_text("#tip")
            page.screenshot(path=str(shot), full_page=True)
            top = [m["name"] for m in metrics].index("top")
            page.locator(f"#metric-{top} svg.lineplot rect.hit").hover()  # the middle point
            line_tip = page.inner_text("#tip").splitlines()
        finally:
            browser.close()
    assert [m for m in messages if m[0] in ("error", "pageerror")] == []
    assert all(url.startswith(("file:", "data:", "about:")) for url in requests), requests
    lines = tip.splitlines()
    assert lines[:3] == ["ld", "layer = 2", f"pos = {metrics[number]['labels']['pos'][9]}"]
    shown = next(line for line in lines if line.startswith("value = "))
    assert np.float32(float(shown.removeprefix("value = "))) == np.float32(float(ld[2, 9]))
    assert line_tip[:2] == ["top", f"k = {metrics[top]['labels']['k'][2]}"]
    assert line_tip[2].startswith("value = ") and line_tip[3].startswith("token ")
    assert shot.is_file() and shot.stat().st_size > 0
