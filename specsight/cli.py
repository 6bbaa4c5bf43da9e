"""The ``specsight`` command line: run, validate, plan, schema, models.

Exit codes: 0 ok, 1 run failure, 2 bad spec or usage. ``--json`` prints results or errors as
data on stdout (strict JSON: a NaN or infinite value is written as null). A user mistake never
shows a traceback; an internal error does, labelled as one.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import SpecError, SpecsightError

__all__ = ["main"]


def _strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, so ``json.dumps`` writes strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value


def _emit_error(exc: SpecsightError, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, **exc.to_dict()}, indent=2))
    elif isinstance(exc, SpecError):
        click.echo(exc.render(), err=True)
    else:
        click.echo(f"error: {exc}", err=True)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn specsight errors into messages and exit codes; label anything else internal."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except SpecsightError as exc:
            _emit_error(exc, as_json)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as exc:  # a bug in specsight, not a user mistake
            if as_json:
                click.echo(
                    json.dumps({"ok": False, "error": "InternalError", "message": repr(exc)})
                )
            else:
                traceback.print_exc()
                click.echo(
                    f"internal error: {exc!r} (this is a bug in specsight; please report it)",
                    err=True,
                )
            sys.exit(1)

    return wrapper


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print results or errors as JSON."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="specsight")
def main() -> None:
    """Run declarative intervention experiments on PyTorch / Hugging Face models."""


def _progress_callback(enabled: bool) -> tuple[Callable[[int, int], None] | None, Any]:
    """A progress bar for runs of several forwards: rows done, rate, time left (stderr only)."""
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
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        transient=True,
        console=Console(stderr=True),  # on stderr (the stream checked above), never stdout
    )
    task = progress.add_task("rows", total=None, rate="")
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
        start, base = first[0]
        rate = f"{(done - base) / (now - start):.1f} rows/s" if now > start and done > base else ""
        progress.update(task, completed=done, total=total, rate=rate)

    return update, progress


def _run_remote(
    spec_path: Path, url: str, api_key: str | None, out: Path | None, show_progress: bool
) -> Any:
    """``run --remote``: queue position and rows done on stderr; Ctrl-C cancels the job."""
    from .remote.client import run_remote

    update, progress = _progress_callback(show_progress)
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
        return run_remote(spec_path, url, api_key=api_key, out=out, progress=on_status)
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
@json_option
@_guard
def run(
    spec_path: Path,
    out: Path | None,
    device: str | None,
    max_batch: int | None,
    remote: str | None,
    api_key: str | None,
    as_json: bool,
) -> None:
    """Validate, compile and run SPEC on this machine (or on a server with --remote)."""
    from .api import run as run_spec
    from .results import Results

    show_progress = not as_json and sys.stderr.isatty()
    if remote is not None:
        if device is not None or max_batch is not None:
            raise click.UsageError("--device and --max-batch are the server's choice with --remote")
        results: Results = _run_remote(spec_path, remote, api_key, out, show_progress)
    else:
        callback, progress = _progress_callback(show_progress)
        try:
            results = run_spec(
                spec_path, out=out, device=device, max_batch=max_batch, progress=callback
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
        click.echo(json.dumps(_strict_json(payload), indent=2, allow_nan=False))
        sys.exit(0 if results.ok else 1)
    import shutil

    from rich.console import Console

    from ._summary import print_summary

    print_summary(
        results, Console(highlight=False, width=max(shutil.get_terminal_size().columns, 120))
    )
    if out:
        click.echo(f"wrote {out / 'results.safetensors'} and {out / 'manifest.json'}")
    if not results.ok:
        failed = sum(not o.ok for o in results.expectations)
        click.echo(f"{failed} of {len(results.expectations)} expectation(s) failed", err=True)
        sys.exit(1)


@main.command()
@click.argument(
    "spec_paths", metavar="SPEC...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@json_option
@_guard
def validate(spec_paths: tuple[Path, ...], as_json: bool) -> None:
    """Check that each SPEC is well formed (no model needed)."""
    from .api import load_spec

    failures: list[SpecError] = []
    for path in spec_paths:
        try:
            load_spec(path)
            if not as_json:
                click.echo(f"ok: {path}")
        except SpecError as exc:
            failures.append(exc)
            if not as_json:
                click.echo(exc.render(), err=True)
    if as_json:
        issues = [i.to_dict() for exc in failures for i in exc.issues]
        click.echo(
            json.dumps({"ok": not failures, "checked": len(spec_paths), "issues": issues}, indent=2)
        )
    if failures:
        sys.exit(2)


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per forward at most (default: sized from free memory).",
)
@json_option
@_guard
def plan(spec_path: Path, max_batch: int | None, as_json: bool) -> None:
    """Compile SPEC and show the plan: forwards, rows, hooks, memory estimate."""
    from .api import compile_plan, load_spec
    from .models import load_ref_info

    spec = load_spec(spec_path)
    info, tokenizer = load_ref_info(spec.model, base_dir=str(spec_path.resolve().parent))
    from .models import resolve_device

    device = resolve_device(spec.model.device)
    compiled = compile_plan(spec, info, tokenizer, max_batch=max_batch, device=device)
    if as_json:
        click.echo(compiled.to_json())
    else:
        click.echo(compiled.explain())


@main.command()
@click.option(
    "--check",
    "check_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    is_flag=False,
    flag_value="schemas/spec.v1.json",
    help="Fail if this file differs from the current schema (default schemas/spec.v1.json).",
)
@click.option(
    "--write",
    "write_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the schema to this file.",
)
def schema(check_path: Path | None, write_path: Path | None) -> None:
    """Print the JSON Schema of spec v1 (or check / write a copy of it)."""
    from .spec import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if check_path is not None:
        if not check_path.exists() or check_path.read_text() != text:
            click.echo(
                f"{check_path} is stale: regenerate it with `specsight schema --write {check_path}`",
                err=True,
            )
            sys.exit(1)
        click.echo(f"{check_path} is up to date")
        return
    if write_path is not None:
        write_path.parent.mkdir(parents=True, exist_ok=True)
        write_path.write_text(text)
        click.echo(f"wrote {write_path}")
        return
    click.echo(text, nl=False)


@main.command()
@click.argument("model_id", metavar="MODEL")
@json_option
@_guard
def sites(model_id: str, as_json: bool) -> None:
    """Show MODEL's canonical sites and module tree (no weights loaded)."""
    from .models import load_model_info
    from .sites import describe_sites

    info, _ = load_model_info(model_id)
    if as_json:
        click.echo(info.to_json())
    else:
        click.echo(describe_sites(info))


@main.command()
@json_option
@_guard
def models(as_json: bool) -> None:
    """List the built-in and tiny models."""
    from .models import list_models

    entries = list_models()
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    width = max(len(e["name"]) for e in entries)
    for entry in entries:
        cached = ""
        if entry.get("kind") == "builtin":
            cached = " (cached)" if entry.get("cached") else " (converted on first use)"
        click.echo(f"{entry['name']:<{width}}  {entry['kind']:<8} {entry['description']}{cached}")
    click.echo("Also: any Hugging Face model id available offline, or a local model folder.")


def _register_more() -> None:
    from ._cli_check import register as register_check
    from ._cli_serve import register as register_serve

    register_check(main)
    register_serve(main, _guard)


_register_more()
