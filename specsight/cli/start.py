"""Getting started without the repository: ``specsight examples [DIR]`` copies the example specs
shipped in the package (with their data and the schema), ``specsight init NAME`` writes a
starter spec whose first line points editors at the schema."""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path

import click

from ..errors import OutputError
from .app import check_verbosity, guard, json_option, main, verbosity_options

__all__: list[str] = []

_STARTER = """\
# yaml-language-server: $schema={schema}
# {name}: activation patching on one prompt pair. Run it with
#   specsight run {file} --out runs/{name}
# The clean prompt's answer is " Mary"; the corrupted one swaps the second name, so the model
# prefers " John". Patching the clean residual stream into the corrupted run, one layer at a
# time at the last position, shows from which layer on the answer is decided there.
specsight: 1
name: {quoted}
model: {model}
invokes:
  clean:
    prompt: "When Mary and John went to the store, John gave a drink to"
  corrupt:
    prompt: "When Mary and John went to the store, Mary gave a drink to"
  patched:
    prompt: "When Mary and John went to the store, Mary gave a drink to"
    sweep: {{layer: all}}
    ops:
      - {{op: patch, site: "resid_post.{{layer}}", positions: [-1], from: clean}}
metrics:
  clean_ld: {{kind: logit_diff, invoke: clean, target: " Mary", foil: " John"}}
  corrupt_ld: {{kind: logit_diff, invoke: corrupt, target: " Mary", foil: " John"}}
  patched_ld: {{kind: logit_diff, invoke: patched, target: " Mary", foil: " John"}}
  recovery: {{kind: recovery, patched: patched_ld, clean: clean_ld, corrupt: corrupt_ld}}
"""


def _examples_root() -> Path:
    """The example specs and schema shipped in the package."""
    return Path(str(resources.files("specsight") / "examples"))


def _example_files() -> list[Path]:
    root = _examples_root()
    return sorted(
        p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )


def _folder_for(folder: Path) -> None:
    """Make ``folder`` (and its parents); a path through a file, or one that cannot be
    written, is an OutputError (exit 2) saying which."""
    for part in (folder, *folder.parents):
        if part.exists() and not part.is_dir():
            raise OutputError(f"{part} is a file, not a folder", hint="name a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot make the folder {folder}: {exc.strerror or exc}") from None


@main.command()
@click.argument(
    "folder", metavar="[DIR]", default="specsight-examples", type=click.Path(path_type=Path)
)
@click.option("--force", is_flag=True, help="Overwrite files that are already there.")
@verbosity_options
@json_option
@guard
def examples(folder: Path, force: bool, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Copy the example specs, their data and the schema into DIR (default
    specsight-examples): DIR/specs/*.yaml, DIR/specs/data, DIR/schemas/spec.v1.json.
    -q: nothing on success; -v: every file written."""
    check_verbosity(quiet, verbose)
    files = _example_files()
    clashes = [f for f in files if (folder / f).exists()]
    if clashes and not force:
        raise OutputError(
            f"{folder / clashes[0]} already exists ({len(clashes)} of the {len(files)} files)",
            hint="choose another folder, or add --force to overwrite them",
        )
    root = _examples_root()
    _folder_for(folder / "specs")
    for relative in files:
        _folder_for((folder / relative).parent)
        shutil.copyfile(root / relative, folder / relative)
    specs = sorted(str(folder / f) for f in files if f.suffix == ".yaml")
    if as_json:
        click.echo(
            json.dumps({"ok": True, "folder": str(folder), "files": len(files), "specs": specs})
        )
        return
    if quiet:
        return
    for relative in files if verbose else []:
        click.echo(f"  {folder / relative}")
    click.echo(f"wrote {len(files)} files to {folder}: {len(specs)} example specs, data, schema")
    click.echo(f"next: specsight run {folder / 'specs' / 'ioi_patching.yaml'}")


@main.command()
@click.argument("name")
@click.option(
    "--model", default="smollm2-135m", show_default=True, help="The model id to start from."
)
@click.option("--force", is_flag=True, help="Overwrite NAME.yaml if it exists.")
@verbosity_options
@json_option
@guard
def init(name: str, model: str, force: bool, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Write NAME.yaml, a starter spec (IOI patching per layer), and schemas/spec.v1.json
    beside it for editors (the spec's first line points at it). -q: nothing on success."""
    from ..spec import json_schema

    check_verbosity(quiet, verbose)

    path = Path(name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    stem = path.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", stem):
        raise click.BadParameter(
            f"'{stem}' is not a usable spec name: use letters, digits, '-', '_' and '.', "
            "e.g. specsight init my-experiment",
            param_hint="NAME",
        )
    if path.exists() and not force:
        raise OutputError(f"{path} already exists", hint="choose another name, or add --force")
    _folder_for(path.parent)
    schema = path.parent / "schemas" / "spec.v1.json"
    wrote_schema = not schema.exists()
    if wrote_schema:
        _folder_for(schema.parent)
        text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
        schema.write_text(text, encoding="utf-8")
    text = _STARTER.format(
        schema="schemas/spec.v1.json",
        name=stem,
        file=path,
        model=json.dumps(model),
        quoted=json.dumps(stem),
    )
    path.write_text(text, encoding="utf-8")
    if as_json:
        click.echo(json.dumps({"ok": True, "spec": str(path), "schema": str(schema)}))
        return
    if quiet:
        return
    click.echo(f"wrote {path}" + (f" and {schema}" if wrote_schema else ""))
    click.echo(f"next: specsight validate {path}   then   specsight run {path} --out runs/{stem}")
