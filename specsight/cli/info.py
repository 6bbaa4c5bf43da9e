"""Looking without running: ``specsight plan`` (a spec's compiled plan), ``schema`` (the JSON
Schema of specs, or one completing a model's site names), ``sites`` (a model's sites and module
tree) and ``models``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .app import guard, json_option, main

__all__: list[str] = []


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per forward at most (default: sized from free memory).",
)
@json_option
@guard
def plan(spec_path: Path, max_batch: int | None, as_json: bool) -> None:
    """Compile SPEC and show the plan: forwards, rows, hooks, memory estimate."""
    from ..api import compile_plan, load_spec, model_info_for
    from ..compile import describe_blocks
    from ..models.load import resolve_device

    spec = load_spec(spec_path)
    info, tokenizer = model_info_for(spec)
    device = resolve_device(spec.model.device)
    compiled = compile_plan(spec, info, tokenizer, max_batch=max_batch, device=device)
    if as_json:
        click.echo(compiled.to_json())
    else:
        click.echo(compiled.explain())
        blocks = describe_blocks(spec, compiled)
        if blocks:
            click.echo(blocks)
        if spec.model.device_map is not None:
            click.echo(_placement_text(spec, compiled.memory_estimate))


def _placement_text(spec: Any, estimate: dict[str, int]) -> str:
    """The placement a spec's device_map gives, the weights per device (no weights read), and
    what the run holds on the device the model takes its inputs on (its first module's)."""
    from ..models.load import compute_device
    from ..models.load.placement import planned_placement
    from ..plan import human_bytes
    from ..spec import doc_of

    doc = doc_of(spec)
    placed = planned_placement(spec.model, base_dir=doc.base_dir if doc else None)
    lines = [f"placement (device_map {spec.model.device_map!r}; weights per device):"]
    for device, entry in sorted(placed.items()):
        modules = entry["modules"]
        shown = ", ".join(modules[:6]) + (
            f", ... ({len(modules)} in all)" if len(modules) > 6 else ""
        )
        lines.append(f"  {device:<8} {human_bytes(entry['bytes']):>10}  {shown}")
    first = compute_device(placed)  # the devices in module order
    weights = placed.get(first, {}).get("bytes", 0)
    run = sum(estimate.get(k, 0) for k in ("activations", "stored", "workspace"))
    lines.append(
        f"  on {first} (where inputs go): weights {human_bytes(weights)} + activations, "
        f"stored values and workspace {human_bytes(run)} = {human_bytes(weights + run)}"
    )
    return "\n".join(lines)


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
@click.option(
    "--model",
    "model_id",
    metavar="MODEL",
    default=None,
    help="Complete site fields with MODEL's site names (canonical and module paths; "
    "no weights loaded).",
)
@click.option(
    "--sae",
    "sae_names",
    multiple=True,
    metavar="NAME",
    help="With --model: complete the sites of an SAE the specs name NAME under saes: "
    "(sae.NAME.features, .recon, .error); repeat for several.",
)
@json_option
@guard
def schema(
    check_path: Path | None,
    write_path: Path | None,
    model_id: str | None,
    sae_names: tuple[str, ...],
    as_json: bool,
) -> None:
    """Print the JSON Schema of spec v1 (or check / write a copy of it); with --model, one
    whose site fields complete that model's site names in editors. With --check or --write,
    --json prints the verdict as JSON (the schema itself is JSON already)."""
    from ..spec import json_schema

    if sae_names and model_id is None:
        raise click.UsageError("--sae completes a model's schema: give --model too")
    data = json_schema() if model_id is None else _model_schema(json_schema(), model_id, sae_names)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if check_path is not None:
        fresh = check_path.exists() and check_path.read_text() == text
        if as_json:
            click.echo(json.dumps({"ok": fresh, "file": str(check_path), "model": model_id}))
        elif not fresh:
            model = "" if model_id is None else f" --model {model_id}"
            click.echo(
                f"{check_path} is stale: regenerate it with "
                f"`specsight schema{model} --write {check_path}`",
                err=True,
            )
        else:
            click.echo(f"{check_path} is up to date")
        if not fresh:
            sys.exit(1)
        return
    if write_path is not None:
        write_path.parent.mkdir(parents=True, exist_ok=True)
        write_path.write_text(text)
        written = {"ok": True, "file": str(write_path), "model": model_id}
        click.echo(json.dumps(written) if as_json else f"wrote {write_path}")
        return
    click.echo(text, nl=False)


def _model_schema(data: dict, model_id: str, saes: tuple[str, ...] = ()) -> dict:
    """The schema ``data`` completing ``model_id``'s sites (and those of SAEs named ``saes``)."""
    from ..sites import model_schema

    return model_schema(data, _model_info(model_id, "'--model'"), saes)


def _model_info(model_id: str, param_hint: str) -> Any:
    """``model_id``'s ModelInfo (no weights); a model that is not here is a usage error on
    the parameter that named it (exit code 2)."""
    from ..errors import ModelNotFoundError
    from ..models.load import load_model_info

    try:
        return load_model_info(model_id)[0]
    except ModelNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint=param_hint) from None


@main.command()
@click.argument("model_id", metavar="MODEL")
@json_option
@guard
def sites(model_id: str, as_json: bool) -> None:
    """Show MODEL's canonical sites and module tree (no weights loaded)."""
    from ..sites import describe_sites

    info = _model_info(model_id, "MODEL")
    if as_json:
        click.echo(info.to_json())
    else:
        click.echo(describe_sites(info))


@main.command()
@json_option
@guard
def models(as_json: bool) -> None:
    """List the built-in and tiny models."""
    from ..models.load import list_models

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
