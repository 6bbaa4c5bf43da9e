"""The terminal summary fits the terminal: a grid wider than the width is split over several
tables (every column shown once), and small values are not printed as 0.000."""

from __future__ import annotations

import re

import specsight
from specsight.results import render_summary
from tests.conftest import CLEAN, ioi_spec, tiny


def test_a_wide_grid_is_split_to_fit_80_columns():
    results = specsight.run(ioi_spec(), model=tiny("tiny-llama"))
    grid = results["ld"]
    assert grid.ndim == 2 and grid.shape[1] >= 10
    for width in (80, 60, 200):
        text = render_summary(results, width=width)
        assert max(len(line) for line in text.splitlines()) <= width, width
        titles = re.findall(r"^ld (?:\[layer x pos\]|\(pos (\d+)-(\d+)\))", text, re.M)
        assert titles and titles[0] == ("", "")
        shown = sum(int(b) - int(a) + 1 for a, b in titles[1:]) + (
            int(titles[1][0]) if len(titles) > 1 else grid.shape[1]
        )
        assert shown == grid.shape[1], (width, titles)
        assert (len(titles) > 1) == (width < 120)


def test_small_values_are_not_printed_as_zero():
    noise = {"op": "noise", "site": "embed", "std": 1e-4, "seed": 0}
    spec = {
        "specsight": 1,
        "model": "tiny-gpt2",
        "invokes": {"a": {"prompt": CLEAN}, "b": {"prompt": CLEAN, "ops": [noise]}},
        "metrics": {"kl": {"kind": "kl", "invoke": "b", "reference": "a"}},
    }
    results = specsight.run(spec, model=tiny("tiny-gpt2"))
    value = float(results["kl"])
    assert 0 < abs(value) < 5e-4  # a barely moved distribution
    text = render_summary(results, width=100)
    assert f"kl = {value:+.2e}" in text and "kl = +0.000" not in text
