"""Views of a run checked against the tensors they show: labels rendered per item, strongest
cells that leave out a patch carrying the answer itself, the PNG's colours (red above the
centre, as on the page), each heatmap's CSV and SVG, and the page's findings first."""

from __future__ import annotations

import csv
import re

import pytest
import torch

import specsight
from specsight.results import Results, render_report, render_summary
from specsight.results.colours import DIVERGING, SEQUENTIAL, matplotlib_cmap
from specsight.results.plots import write_heatmaps
from tests.conftest import ROOT, ioi_spec, tiny

ROWS = [
    {"prompt": "When Mary and John went to the store, John gave a drink to", "answer": " Mary"},
    {"prompt": "When Tom and Anna went to the park, Anna gave a book to", "answer": " Tom"},
    {"prompt": "Then Bob and Alice walked home, Alice gave a drink to", "answer": " Bob"},
]


def test_a_templated_label_is_rendered_per_item():
    spec = {
        "specsight": 1,
        "model": "tiny-llama",
        "dataset": {"rows": ROWS},
        "invokes": {"a": {"prompt": "{prompt}"}},
        "metrics": {"p": {"kind": "prob", "invoke": "a", "token": "{answer}", "reduce": "mean"}},
    }
    results = specsight.run(spec, model=tiny())
    text = render_summary(results, width=200)
    line = next(line for line in text.splitlines() if line.lstrip().startswith("p ("))
    assert "{answer}" not in line
    assert "prob of ' Mary', prob of ' Tom', ... (3 items)" in line
    assert f"{float(results['p']):+.3f}" in line


def _single_prompt_recovery() -> Results:
    spec = ioi_spec(sweep={"layer": "all", "pos": [-1]}, baseline="base", recovery="rec")
    return specsight.run(spec, model=tiny())


def test_strongest_cells_leave_out_a_patch_that_carries_the_answer_itself():
    results = _single_prompt_recovery()
    rec = results["rec"]
    last = rec.shape[0] - 1  # the last layer's residual at the last position is the answer
    assert float(rec[last, 0]) == pytest.approx(1.0, abs=1e-4)
    lines = render_summary(results, width=200).splitlines()
    start = next(i for i, line in enumerate(lines) if "strongest cells of rec" in line)
    block = lines[start + 1 : start + 8]
    assert block[0].lstrip().startswith("(not ranked:") and f"layer={last}" in block[0]
    ranked = [line for line in block[1:] if re.match(r"\s+[+-]\d", line)]
    assert all(f"layer={last}," not in line for line in ranked)
    complete = ((rec - 1).abs() <= 1e-4).flatten()
    expected = (rec.flatten().abs().masked_fill(complete, -1)).topk(len(ranked)).values
    shown = [float(line.split()[0]) for line in ranked]
    assert shown == pytest.approx(expected.tolist(), abs=1e-3)


def test_the_png_is_red_above_the_centre_and_blue_below(tmp_path):
    """The heatmap PNG read back: a cell of +1 is drawn red and one of -1 blue, as the page
    and the inline view draw them."""
    pyplot_image = pytest.importorskip("matplotlib.image")
    metrics = {"m": torch.tensor([[-1.0, 1.0]])}
    meta = {"axes": ["row", "col"], "axis_values": {"row": [0], "col": [0, 1]}, "signed": True}
    [png] = write_heatmaps(metrics, {"tensors": {"m": meta}}, tmp_path)
    pixels = pyplot_image.imread(png)[..., :3] * 255
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 60) & (pixels[..., 2] < 70)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 60)
    assert red.sum() > 500 and blue.sum() > 500
    assert red.nonzero()[1].mean() > blue.nonzero()[1].mean()  # +1 is the right-hand cell
    for t, stop in ((0.0, DIVERGING[0]), (1.0, DIVERGING[-1])):
        assert [round(255 * c) for c in matplotlib_cmap(True)(t)[:3]] == list(stop)
    script = (ROOT / "specsight/results/report_assets/report.js").read_text()
    assert str([list(s) for s in DIVERGING]).replace(" ", "") in script.replace(" ", "")
    assert str([list(s) for s in SEQUENTIAL]).replace(" ", "") in script.replace(" ", "")


def test_each_heatmap_is_exported_as_csv_and_svg(tmp_path):
    results = _single_prompt_recovery()
    results.save(tmp_path / "run")
    meta = results.manifest["tensors"]["rec"]
    with (tmp_path / "run" / "rec.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == results["rec"].numel()
    for row in rows:
        cell = (
            meta["axis_values"]["layer"].index(int(row["layer"])),
            meta["axis_values"]["pos"].index(int(row["pos"])),
        )
        assert float(row["rec"]) == float(results["rec"][cell])
    svg = (tmp_path / "run" / "rec.svg").read_text(encoding="utf-8")
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg


def test_the_page_puts_findings_first_and_names_the_centre_of_its_scale():
    results = _single_prompt_recovery()
    page = render_report(results)
    order = [page.index(f'<section id="{s}">') for s in ("metrics", "facts", "spec")]
    assert order == sorted(order)
    assert "<details><summary>model, timings, versions" in page
    data = re.search(r'id="specsight-data">(.*?)</script>', page, re.S)[1]
    assert '"center_label":"baseline"' in data  # a recovery: white at its baseline, 0
    plain = _synthetic_signed()
    assert (
        '"center_label":null'
        in re.search(r'id="specsight-data">(.*?)</script>', render_report(plain), re.S)[1]
    )


def _synthetic_signed() -> Results:
    meta = {"axes": ["a", "b"], "axis_values": {}, "kind": "metric", "signed": True}
    manifest = {"tensors": {"m": meta}, "spec": {"name": "s"}, "model": {}, "plan": {}}
    return Results({"m": torch.tensor([[-1.0, 2.0]])}, {}, manifest)
