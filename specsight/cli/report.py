"""``specsight report RUN``: write a run folder's self-contained HTML page (``report.html``:
spec, model and manifest facts, interactive metric plots, verdicts, next tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .app import guard, json_option, main
from .check import _load_run

__all__: list[str] = []


@main.command()
@click.argument(
    "run_dir", metavar="RUN", type=click.Path(file_okay=False, exists=True, path_type=Path)
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the page here (default: RUN/report.html).",
)
@json_option
@guard
def report(run_dir: Path, out: Path | None, as_json: bool) -> None:
    """Write RUN's page (a run folder written by --out): one HTML file that opens offline."""
    from ..errors import OutputError
    from ..results import REPORT_FILE, write_report

    results = _load_run(run_dir)
    path = out if out is not None else run_dir / REPORT_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_report(results, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    click.echo(json.dumps({"report": str(path)}) if as_json else str(path))
