"""CLI commands for specs as tests: ``check`` (run specs and their expectations), ``diff`` (two
run folders) and ``rerun`` (a run folder's spec again, compared with its results)."""

from __future__ import annotations

import json
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..errors import SpecError, SpecsightError, printable
from .app import (
    check_verbosity,
    guard,
    json_option,
    main,
    strict_json,
    terminal_console,
    verbosity_options,
)

__all__: list[str] = []

_SPEC_SUFFIXES = (".yaml", ".yml", ".json")
#: files that mark a folder as data, not specs: an SAE's (its cfg.json) and a run's (manifest)
_DATA_MARKERS = ("sae_weights.safetensors", "results.safetensors")


@dataclass
class _Checked:
    path: str
    status: str = "ok"  # ok, failed, error, invalid
    seconds: float = 0.0
    outcomes: list[Any] = field(default_factory=list)
    error: str = ""
    diff: Any = None


def _collect(paths: tuple[Path, ...]) -> list[Path]:
    """The spec files of ``paths``: files as given, folders' .yaml/.yml/.json files except in
    SAE and run folders (their cfg.json and manifest.json are data)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.suffix in _SPEC_SUFFIXES
                    and p.is_file()
                    and not any((p.parent / marker).is_file() for marker in _DATA_MARKERS)
                )
            )
        else:
            found.append(path)
    return found


def _model_key(spec: Any, device: str | None) -> tuple:
    ref = spec.model
    return (
        ref.name,
        tuple(sorted((k, repr(v)) for k, v in ref.args.items())),
        ref.dtype,
        device or ref.device,
        ref.revision,
        ref.attn_implementation,
        ref.seed,
    )


def _check_one(
    path: Path, models: dict, device: str | None, against: Path | None, rtol: float, atol: float
) -> _Checked:
    from ..api import load_model_for, load_spec, run

    item = _Checked(str(path))
    started = time.perf_counter()
    try:
        spec = load_spec(path)
        key = _model_key(spec, device)
        if key not in models:
            models[key] = load_model_for(spec, device=key[3])
        results = run(spec, model=models[key])
        item.outcomes = results.expectations
        if against is not None:
            from ..results import Results, compare_runs

            item.diff = compare_runs(results, Results.load(against), rtol=rtol, atol=atol)
        if not results.ok or (item.diff is not None and not item.diff.ok):
            item.status = "failed"
    except SpecError as exc:
        item.status, item.error = "invalid", exc.render()
    except SpecsightError as exc:
        item.status, item.error = "error", str(exc)
    item.seconds = time.perf_counter() - started
    return item


def _junit(items: list[_Checked], path: Path) -> None:
    suites = ET.Element("testsuites", name="specsight check")
    for item in items:
        cases = item.outcomes or [None]
        failures = sum(1 for o in item.outcomes if not o.ok) + (
            item.diff is not None and not item.diff.ok
        )
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=item.path,
            tests=str(len(cases) + (item.diff is not None)),
            failures=str(failures),
            errors=str(int(item.status in ("error", "invalid"))),
            time=f"{item.seconds:.3f}",
        )
        if item.status in ("error", "invalid"):
            case = ET.SubElement(suite, "testcase", classname=item.path, name="run")
            ET.SubElement(case, "error", message=item.status).text = item.error
            continue
        for outcome in item.outcomes:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=item.path,
                name=f"expect[{outcome.index}] {outcome.claim}",
            )
            if not outcome.ok:
                ET.SubElement(
                    case, "failure", message=outcome.claim
                ).text = f"{outcome.location}\n{outcome.detail}"
        if item.diff is not None:
            case = ET.SubElement(
                suite, "testcase", classname=item.path, name="results match the reference run"
            )
            if not item.diff.ok:
                ET.SubElement(case, "failure", message="results differ").text = item.diff.format()
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


def _report(items: list[_Checked], quiet: bool = False, verbose: bool = False) -> None:
    from rich.table import Table
    from rich.text import Text

    console = terminal_console()
    bad = [i for i in items if i.status != "ok" or (i.diff is not None and not i.diff.ok)]
    if quiet and not bad:
        return
    table = Table(box=None, padding=(0, 2))
    for column in ("spec", "status", "expectations", "seconds"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    style = {"ok": "green", "failed": "red", "error": "red", "invalid": "yellow"}
    for item in items:
        held = sum(o.ok for o in item.outcomes)
        table.add_row(
            Text(printable(str(item.path))), Text(item.status, style=style[item.status]),
            f"{held}/{len(item.outcomes)}", f"{item.seconds:.1f}",
        )  # fmt: skip
    if not quiet:
        console.print(table)
    for item in items:
        for outcome in item.outcomes:
            if verbose or not outcome.ok:
                console.print(Text(printable(outcome.format())))
        if item.error:
            console.print(Text(printable(f"{item.path}: {item.error}")))
        if item.diff is not None and not item.diff.ok:
            console.print(
                Text(printable(f"{item.path} against the reference run:\n{item.diff.format()}"))
            )
    counts = {s: sum(i.status == s for i in items) for s in style}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no specs")


def _exit_code(items: list[_Checked]) -> int:
    if any(i.status == "invalid" for i in items):
        return 2
    return 1 if any(i.status in ("failed", "error") for i in items) else 0


@main.command()
@click.argument(
    "paths",
    metavar="PATHS...",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, path_type=Path),
)
@click.option(
    "--junit", type=click.Path(dir_okay=False, path_type=Path), help="Write a JUnit XML report."
)
@click.option(
    "--against",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Compare results with this run folder (one spec only).",
)
@click.option("--rtol", type=float, default=1e-5, show_default=True)
@click.option("--atol", type=float, default=1e-6, show_default=True)
@click.option("--device", help="Override every spec's device.")
@verbosity_options
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
@guard
def check(
    paths: tuple[Path, ...],
    junit: Path | None,
    against: Path | None,
    rtol: float,
    atol: float,
    device: str | None,
    quiet: bool,
    verbose: bool,
    as_json: bool,
) -> None:
    """Run specs (files or folders) and their expectations: exit 0 when all hold,
    1 when any fails, 2 for a bad spec. -q: only what failed; -v: every claim's verdict."""
    check_verbosity(quiet, verbose)
    specs = _collect(paths)
    if not specs:
        raise click.UsageError("no .yaml/.yml/.json specs under the given paths")
    if against is not None and len(specs) != 1:
        raise click.UsageError("--against compares one spec's results; give one spec")
    models: dict = {}
    items = [_check_one(p, models, device, against, rtol, atol) for p in specs]
    if junit is not None:
        _junit(items, junit)
    if as_json:
        payload = [
            {
                "spec": i.path, "status": i.status, "seconds": round(i.seconds, 3),
                "expectations": [o.to_dict() for o in i.outcomes], "error": i.error or None,
                "diff": None if i.diff is None else i.diff.format(),
            }
            for i in items
        ]  # fmt: skip
        click.echo(json.dumps(payload, indent=2))
    else:
        _report(items, quiet, verbose)
    sys.exit(_exit_code(items))


@main.command()
@click.argument("run_a", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("run_b", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--rtol", type=float, default=1e-5, show_default=True)
@click.option("--atol", type=float, default=1e-6, show_default=True)
@verbosity_options
@json_option
@guard
def diff(
    run_a: Path, run_b: Path, rtol: float, atol: float, quiet: bool, verbose: bool, as_json: bool
) -> None:
    """Compare two run folders (written by --out): manifests, then every tensor. -q: nothing
    (the exit code says); -v: every tensor, not the 20 that differ most."""
    from ..results import compare_runs

    check_verbosity(quiet, verbose)
    result = compare_runs(_load_run(run_a), _load_run(run_b), rtol=rtol, atol=atol)
    _print_diff(result, as_json, quiet=quiet, verbose=verbose)
    sys.exit(0 if result.ok else 1)


def _print_diff(
    result: Any,
    as_json: bool,
    verdict: str | None = None,
    *,
    quiet: bool = False,
    verbose: bool = False,
) -> None:
    if as_json:
        click.echo(json.dumps(strict_json(result.to_dict()), indent=2, default=str))
        return
    if quiet:
        return
    click.echo(result.format(limit=len(result.tensors) if verbose else 20))
    if verdict:
        click.echo(verdict)


@main.command()
@click.argument(
    "run_dir", metavar="RUN", type=click.Path(file_okay=False, exists=True, path_type=Path)
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Write the new run here."
)
@click.option("--rtol", type=float, default=0.0, show_default=True)
@click.option("--atol", type=float, default=0.0, show_default=True)
@click.option(
    "--sae",
    "saes",
    multiple=True,
    metavar="ID=PATH",
    help="An SAE folder the spec names by id, as for `specsight run --sae`.",
)
@verbosity_options
@json_option
@guard
def rerun(
    run_dir: Path,
    out: Path | None,
    rtol: float,
    atol: float,
    saes: tuple[str, ...],
    quiet: bool,
    verbose: bool,
    as_json: bool,
) -> None:
    """Run a run folder's spec again and report whether the results match (exactly, by
    default). -q: nothing (the exit code says); -v: every tensor."""
    from ..api import rerun_folder
    from .serve_config import sae_options

    check_verbosity(quiet, verbose)
    result = rerun_folder(run_dir, out=out, rtol=rtol, atol=atol, saes=sae_options(saes))
    verdict = "rerun matches" if result.ok else "rerun does NOT match"
    _print_diff(result, as_json, verdict, quiet=quiet, verbose=verbose)
    sys.exit(0 if result.ok else 1)


def _load_run(folder: Path) -> Any:
    from ..results import MANIFEST_FILE, RESULTS_FILE, Results

    for name in (MANIFEST_FILE, RESULTS_FILE):
        if not (folder / name).is_file():
            raise click.UsageError(
                f"{folder} is not a run folder: it has no {name} (write one with --out)"
            )
    return Results.load(folder)
