"""``docs/notebook.ipynb`` executed in a real Jupyter kernel (nbclient, ipykernel): every cell
runs without error, the run shows itself inline as HTML (claims and coloured grids), the tidy
frame and the Dataset render as tables, the heatmap as a PNG, and the per-item table shows
each item's own names."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = ROOT / "docs" / "notebook.ipynb"


def _kernel(tmp_path, monkeypatch) -> str:
    """A kernel spec that runs this interpreter (the one specsight is installed in), found
    before any other python3 kernel the machine may have."""
    folder = tmp_path / "jupyter" / "kernels" / "specsight-test"
    folder.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "specsight tests", "language": "python"}
    (folder / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "specsight-test"


@pytest.mark.slow
def test_the_notebook_runs_from_install_to_the_ioi_result(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        assert not cell.get("outputs"), "commit the notebook without outputs"
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name=_kernel(tmp_path, monkeypatch),
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [
        (i, o) for i, c in enumerate(notebook.cells) if c.cell_type == "code" for o in c.outputs
    ]
    assert not [o for _, o in outputs if o.output_type == "error"]
    html = [o["data"]["text/html"] for _, o in outputs if "text/html" in o.get("data", {})]
    inline = next(page for page in html if 'class="ss-run"' in page)
    assert "expect 6/6 held" in inline and "<script" not in inline
    assert inline.count('<td style="background:') >= 30 * 4  # the layer x pos grid, coloured
    assert any("<table" in page and "stderr" in page for page in html)  # the tidy frame
    assert any("image/png" in o.get("data", {}) for _, o in outputs)  # the heatmap
    # the per-item cell shows each item's own names next to its value
    per_item = next(
        o["data"]["text/plain"]
        for i, o in outputs
        if "text/plain" in o.get("data", {}) and "io" in o["data"]["text/plain"] and "value" in o["data"]["text/plain"]
        and "item" in o["data"]["text/plain"]
    )  # fmt: skip
    assert "Mark" in per_item or "Mary" in per_item
