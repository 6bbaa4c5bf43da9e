"""The report's attention view and plot exports, in headless chromium: a saved attention
pattern is drawn query x key per head with the prompt's tokens on both axes (its cells are the
saved weights), and each plot downloads as SVG and CSV whose cells are the tensor's values."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
import torch

import specsight
from specsight.models.load import load_model
from specsight.results import render_report
from tests.conftest import CLEAN, ioi_spec, tiny
from tests.test_report import _chromium


def _page_run(html: str, tmp_path, steps):
    playwright = pytest.importorskip("playwright.sync_api")
    path = tmp_path / "report.html"
    path.write_text(html, encoding="utf-8")
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True)
        try:
            page = browser.new_context(accept_downloads=True).new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(path.resolve().as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=10_000)
            out = steps(page)
        finally:
            browser.close()
    assert errors == []
    return out


def _data(html: str) -> dict:
    return json.loads(re.search(r'id="specsight-data">(.*?)</script>', html, re.S)[1])


def test_a_saved_attention_pattern_is_drawn_per_head_with_its_tokens(tmp_path):
    lm = load_model("tiny-llama", device="cpu", attn_implementation="eager")
    spec = {
        "specsight": 1,
        "model": {"id": "tiny-llama", "attn_implementation": "eager"},
        "invokes": {"a": {"prompt": CLEAN, "ops": [{"op": "save", "site": "attn_pattern.1", "name": "p"}]}},
    }  # fmt: skip
    results = specsight.run(spec, model=lm)
    pattern = results["p"]  # [query, head, key]
    tokens = lm.tokenizer.token_strs(lm.tokenizer.encode(CLEAN))
    html = render_report(results)
    entry = next(m for m in _data(html)["metrics"] if m["name"] == "p")
    index = _data(html)["metrics"].index(entry)
    assert entry["axes"][:3] == ["query", "key", "head"]
    assert entry["labels"]["key"][9] == f"9: {tokens[9]!r}"

    def steps(page):
        box = f"#attention #metric-{index}"
        cells = page.locator(f"{box} svg rect.cell")
        count = cells.count()
        fills = f"Array.from(document.querySelectorAll('{box} svg rect.cell'), r => r.getAttribute('fill'))"
        fills_0 = page.evaluate(fills)
        options = page.locator(f"{box} select[data-axis='2'] option").count()
        page.select_option(f"{box} select[data-axis='2']", "3")
        fills_3 = page.evaluate(fills)
        page.locator(f"{box} rect.cell[data-r='13'][data-c='9']").hover()
        return count, options, fills_0, fills_3, page.inner_text("#tip")

    count, options, fills_0, fills_3, tip = _page_run(html, tmp_path, steps)
    assert count == pattern.shape[0] * pattern.shape[2]  # query x key
    assert options == pattern.shape[1] and fills_0 != fills_3  # a picker per head redraws
    shown = float(re.search(r"value = (\S+)", tip)[1])
    assert shown == pytest.approx(float(pattern[13, 3, 9]), rel=1e-5, abs=1e-7)
    assert f"key = 9: {tokens[9]!r}" in tip


def test_each_plot_downloads_as_svg_and_csv(tmp_path):
    spec = ioi_spec(sweep={"layer": "all", "pos": [1, 9, -1]}, baseline="base", recovery="rec")
    results = specsight.run(spec, model=tiny())
    html = render_report(results)
    metrics = _data(html)["metrics"]
    index = [m["name"] for m in metrics].index("rec")

    def steps(page):
        out = {}
        for kind in ("svg", "csv"):
            with page.expect_download() as info:
                page.click(f"#metric-{index} .exports a.export-{kind}")
            out[kind] = Path(info.value.path()).read_text(encoding="utf-8")
        return out

    files = _page_run(html, tmp_path, steps)
    assert files["svg"].startswith("<?xml") and "<svg" in files["svg"] and "rect" in files["svg"]
    rows = list(csv.DictReader(io.StringIO(files["csv"])))
    rec = results["rec"]
    assert len(rows) == rec.numel()
    labels = metrics[index]["labels"]
    for row in rows:
        cell = (labels["layer"].index(row["layer"]), labels["pos"].index(row["pos"]))
        assert float(row["rec"]) == pytest.approx(float(rec[cell]), rel=1e-6, abs=1e-9)
    assert torch.isfinite(rec).all()
