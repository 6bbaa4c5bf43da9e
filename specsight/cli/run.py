"""``specsight run`` (on this machine, or on a server with ``--remote``) and ``specsight
validate``; the progress bar runs show on a terminal."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import SpecError, printable
from .app import (
    check_verbosity,
    guard,
    json_option,
    main,
    strict_json,
    terminal_console,
    verbosity_options,
)

__all__ = ["progress_callback", "plain_progress"]

#: seconds between progress lines when stderr is not a terminal (a CI log, a file)
PLAIN_PROGRESS_S = 10.0


def plain_progress(interval: float = PLAIN_PROGRESS_S) -> Callable[[int, int], None]:
    """Progress as a plain line on stderr at most every ``interval`` seconds: a long run is
    not silent in a log until its end, and a short one prints nothing."""
    start = time.perf_counter()
    last = [start]

    def update(done: int, total: int) -> None:
        now = time.perf_counter()
        if done >= total or now - last[0] < interval:
            return
        last[0] = now
        rate = done / (now - start) if now > start else 0.0
        click.echo(
            f"rows {done}/{total} ({100 * done / total:.0f}%), {rate:.1f} rows/s, "
            f"{now - start:.0f} s",
            err=True,
        )

    return update


def progress_callback(enabled: bool) -> tuple[Callable[[int, int], None] | None, Any]:
    """A progress bar for runs of several forwards: rows done, rate, time spent and time left,
    counted from the first forward (model loading is not in the clock); stderr only."""
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("rows"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        transient=True,
        console=Console(stderr=True),  # on stderr (the stream checked above), never stdout
    )
    task = progress.add_task("rows", total=None, rate="", start=False)
    first: list[
        tuple[float, int]
    ] = []  # (time, rows) at the first report: the rate excludes set-up

    def update(done: int, total: int) -> None:
        if done >= total and not progress.live.is_started:
            return  # everything ran in one forward: nothing to show
        now = time.perf_counter()
        if not first:
            first.append((now, done))
            progress.start()
            progress.start_task(task)
        start, base = first[0]
        rate = f"{(done - base) / (now - start):.1f} rows/s" if now > start and done > base else ""
        progress.update(task, completed=done, total=total, rate=rate)

    return update, progress


def _print_run(results: Any, out: Path | None, verbose: bool) -> None:
    """The terminal summary, where the results went, and (``verbose``) plan size and timings."""
    from ..results import print_summary

    print_summary(results, terminal_console())
    if verbose:
        plan = results.manifest.get("plan", {})
        timings = results.manifest.get("timings", {})
        spent = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in timings.items())
        click.echo(
            f"plan: {plan.get('rows', '?')} rows in {plan.get('forwards', '?')} forwards "
            f"(at most {plan.get('max_batch', '?')} rows each); {spent}"
        )
    if out:
        wrote = f"wrote {out / 'results.safetensors'}, {out / 'manifest.json'} and the page "
        click.echo(printable(wrote + str(out / "report.html")))
    else:
        click.echo("results not saved: add --out FOLDER to keep them", err=True)


def _run_remote(
    spec_path: Path,
    url: str,
    api_key: str | None,
    out: Path | None,
    force: bool,
    show_progress: bool,
) -> Any:
    """``run --remote``: queue position and rows done on stderr; Ctrl-C cancels the job."""
    from ..remote.submit import run_remote

    update, progress = progress_callback(show_progress)
    shown: list[int | None] = []

    def on_status(status: Any) -> None:
        if not show_progress:
            return
        if status.state == "queued" and (not shown or shown[-1] != status.queue_position):
            shown.append(status.queue_position)
            click.echo(f"queued on {url}: position {status.queue_position}", err=True)
        elif status.state == "running" and status.progress.total and update is not None:
            update(status.progress.done, status.progress.total)

    try:
        return run_remote(spec_path, url, api_key=api_key, out=out, force=force, progress=on_status)
    except KeyboardInterrupt as exc:
        click.echo(str(exc) or "interrupted", err=True)
        sys.exit(130)
    finally:
        if progress is not None and progress.live.is_started:
            progress.stop()


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write results.safetensors and manifest.json here.",
)
@click.option(
    "--force", is_flag=True, help="Replace a run of another spec in --out (never other files)."
)
@click.option("--device", help="Override the spec's device (cpu, cuda, cuda:1, mps).")
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per forward at most (default: sized from free memory, at most 64 on CPU).",
)
@click.option(
    "--remote",
    metavar="URL",
    default=None,
    help="Run on a `specsight serve` server (e.g. http://host:8000) instead of this machine.",
)
@click.option(
    "--api-key",
    metavar="KEY",
    envvar="SPECSIGHT_API_KEY",
    show_envvar=True,
    default=None,
    help="The server's API key (with --remote).",
)
@click.option(
    "--sae",
    "saes",
    multiple=True,
    metavar="ID=PATH",
    help="An SAE folder (SAELens's format) that the spec names by id (saes: {x: {id: ID, "
    "site: ...}}); repeat for several. Not with --remote: the server names its own.",
)
@verbosity_options
@json_option
@guard
def run(
    spec_path: Path,
    out: Path | None,
    force: bool,
    device: str | None,
    max_batch: int | None,
    remote: str | None,
    api_key: str | None,
    saes: tuple[str, ...],
    quiet: bool,
    verbose: bool,
    as_json: bool,
) -> None:
    """Validate, compile and run SPEC on this machine (or on a server with --remote). -q: no
    summary and no progress; -v: also the plan's size and where the time went."""
    from ..api import run as run_spec
    from ..results import Results
    from .serve_config import sae_options

    check_verbosity(quiet, verbose)
    show_progress = not as_json and not quiet and sys.stderr.isatty()
    if remote is not None:
        if device is not None or max_batch is not None or saes:
            raise click.UsageError(
                "--device, --max-batch and --sae are the server's choice with --remote"
            )
        results: Results = _run_remote(spec_path, remote, api_key, out, force, show_progress)
    else:
        callback, progress = progress_callback(show_progress)
        if callback is None and not as_json and not quiet:
            callback = plain_progress()
        try:
            results = run_spec(
                spec_path,
                out=out,
                force=force,
                device=device,
                max_batch=max_batch,
                progress=callback,
                saes=sae_options(saes),
            )
        finally:
            if progress is not None and progress.live.is_started:
                progress.stop()
    if as_json:
        payload = {
            "ok": results.ok,
            "metrics": {name: t.tolist() for name, t in results.metrics.items()},
            "saves": {name: list(t.shape) for name, t in results.saves.items()},
            "next_tokens": results.next_tokens,
            "expectations": [o.to_dict() for o in results.expectations],
            "manifest": results.manifest,
            "out": str(out) if out else None,
        }
        click.echo(json.dumps(strict_json(payload), indent=2, allow_nan=False))
        sys.exit(0 if results.ok else 1)
    if not quiet:
        _print_run(results, out, verbose)
    if not results.ok:
        failed = [o for o in results.expectations if not o.ok]
        if quiet:  # the summary that lists them was not printed
            for outcome in failed:
                click.echo(printable(outcome.format()), err=True)
        click.echo(f"{len(failed)} of {len(results.expectations)} expectation(s) failed", err=True)
        sys.exit(1)


@main.command()
@click.argument(
    "spec_paths", metavar="SPEC...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@verbosity_options
@json_option
@guard
def validate(spec_paths: tuple[Path, ...], quiet: bool, verbose: bool, as_json: bool) -> None:
    """Check each SPEC without loading weights: compiled against the model when its files are
    here, else every check that needs no model (the output says which). -q: errors only; -v:
    say for each spec what it was checked against."""
    from ..api import validate as validate_spec

    check_verbosity(quiet, verbose)
    failures: list[SpecError] = []
    not_compiled: list[dict[str, str]] = []
    for path in spec_paths:
        try:
            note = validate_spec(path)
        except SpecError as exc:
            failures.append(exc)
            if not as_json:
                click.echo(printable(exc.render()), err=True)
            continue
        if note is not None:
            not_compiled.append({"file": str(path), "note": note})
        if not as_json and not quiet:
            how = " (compiled against its model's shapes and tokenizer)" if verbose else ""
            ok = f"ok: {path}" + (f" (not compiled: {note})" if note else how)
            click.echo(printable(ok))
    if as_json:
        issues = [i.to_dict() for exc in failures for i in exc.issues]
        payload = {
            "ok": not failures,
            "checked": len(spec_paths),
            "issues": issues,
            "not_compiled": not_compiled,
        }
        click.echo(json.dumps(payload, indent=2))
    if failures:
        sys.exit(2)
