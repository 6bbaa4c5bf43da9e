"""CLI commands for the server side of remote execution: ``serve`` and ``hash-key``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .app import guard, json_option, main
from .serve_config import serve_config

__all__: list[str] = []


def _db_location(ctx: click.Context, param: click.Parameter, value: str) -> Path | str:
    """``--db``: a PostgreSQL URL as given (psycopg installed), else a SQLite file path."""
    if value.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise click.BadParameter(
                "a PostgreSQL job store needs psycopg 3: pip install 'specsight[postgres]'"
            ) from None
        return value
    return click.Path(dir_okay=False, path_type=Path).convert(value, param, ctx)


@main.command()
@click.option(
    "--model",
    "model_ids",
    multiple=True,
    help="A model to serve (repeat for several); loaded once at start.",
)
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Serve on a Ray cluster: each model a Ray Serve deployment of --replicas replicas "
    "sharing a postgresql:// --db (pip install 'specsight[cluster]').",
)
@click.option(
    "--address",
    default=None,
    help="With --ray: the Ray cluster to join (e.g. auto, or ray://head:10001); default: "
    "start a local one.",
)
@click.option(
    "--deploy",
    "deploy_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A serve config file (models, the store, limits; with --ray: replicas, GPUs, "
    "autoscaling, a postgresql:// store) instead of the model and store options.",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --ray: replicas of each model.",
)
@click.option(
    "--num-gpus",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="With --ray: GPUs each replica reserves.",
)
@click.option(
    "--num-cpus",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="With --ray: CPU cores each replica reserves.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--db",
    "db_path",
    default="specsight-jobs.sqlite",
    show_default=True,
    metavar="FILE|URL",
    callback=_db_location,
    help="The job store: a SQLite file (created if missing; jobs survive restarts), or a "
    "postgresql://user@host:port/dbname URL that several servers share (pip install "
    "'specsight[postgres]').",
)
@click.option(
    "--keys",
    "keys_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="API keys file of 'name:sha256hex' lines (see hash-key); else $SPECSIGHT_API_KEYS.",
)
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="Accept any request without a key (never in production).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N, mps.")
@click.option(
    "--sae",
    "saes",
    multiple=True,
    metavar="ID=PATH",
    help="An SAE folder (SAELens's format) that specs name by id (saes: {x: {id: ID, site: "
    "...}}); repeat for several. Specs never name paths on a server.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per log line, with the job ids it concerns.",
)
@click.option(
    "--device-map",
    type=click.Choice(["auto", "balanced", "balanced_low_0", "sequential"]),
    default=None,
    help="Place each model across the GPUs (and CPU) with accelerate instead of --device.",
)
@click.option(
    "--max-memory",
    "max_memory",
    multiple=True,
    metavar="DEVICE=SIZE",
    help="With --device-map: memory a device may hold, e.g. 0=70GiB, cpu=200GiB (repeat).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
)
@click.option("--max-queue", type=click.IntRange(min=1), default=None, help="Queued jobs at most.")
@click.option(
    "--max-queue-per-key",
    type=click.IntRange(min=1),
    default=None,
    help="Queued jobs of one API key at most (default: a quarter of --max-queue, at least 16).",
)
@click.option(
    "--max-job-seconds",
    type=click.FloatRange(min=0),
    default=None,
    help="A job (or batch) running longer fails, or runs again alone (default 600).",
)
@click.option(
    "--batch-jobs",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Queued jobs of one model run together in shared forwards, at most this many.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds a running batch may take to finish at shutdown before it is requeued.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send a request's headers; slower connections are closed.",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds a client has to send a request's body after its headers (and at least "
    "1 KB/s over every 5 s); slower requests get 408 and are closed.",
)
@click.option(
    "--retention-days",
    type=click.FloatRange(min=0),
    default=7.0,
    show_default=True,
    help="Days a finished job's result is kept before it is deleted.",
)
@guard
def serve(**options: Any) -> None:
    """Serve MODELs over HTTP: clients run specs here with `specsight run --remote`."""
    config = serve_config(options, click.get_current_context())
    keys = _keys(config, options)
    try:
        if options["use_ray"]:
            from ..remote.cluster.deploy import serve_cluster

            serve_cluster(config, keys=keys)
            return
        from ..remote.serve import serve as run_server
    except ImportError as exc:  # fastapi / uvicorn are the optional 'server' extra
        raise click.UsageError(
            f"specsight serve needs FastAPI and uvicorn ({exc}): pip install 'specsight[server]'"
        ) from None
    run_server(config, keys=keys)


def _keys(config: Any, options: dict[str, Any]) -> Any:
    """The API keys: the --keys file (or the config's), else $SPECSIGHT_API_KEYS; with
    --insecure-no-auth none, and a loud warning."""
    import os

    from ..remote.auth import ENV_VAR, KeyFileError, KeyRing

    keys_file = options["keys_file"] or config.keys
    try:
        if keys_file is not None:
            keys = KeyRing.from_file(keys_file)
        elif os.environ.get(ENV_VAR, "").strip():
            keys = KeyRing.from_env()
        else:
            keys = None
    except KeyFileError as exc:
        raise click.UsageError(str(exc)) from None
    insecure = options["insecure_no_auth"]
    if keys is not None and insecure:
        raise click.UsageError("--insecure-no-auth and API keys exclude each other")
    if keys is not None and not len(keys):
        raise click.UsageError("the API keys hold no key; add one with `specsight hash-key`")
    if keys is not None:
        return keys
    if not insecure:
        raise click.UsageError(
            f"no API keys: pass --keys FILE or set {ENV_VAR} (lines from `specsight "
            "hash-key`), or --insecure-no-auth to accept anyone"
        )
    exposed = (
        "" if config.host in ("127.0.0.1", "localhost", "::1") else f" ON {config.host}, REACHABLE"
    )
    click.secho(
        f"WARNING: --insecure-no-auth: ANY client{exposed} can run jobs on this server "
        "without a key. Never use this outside a trusted machine.",
        err=True,
        fg="red",
        bold=True,
    )
    return KeyRing.allow_all()


@main.command("hash-key")
@click.option("--name", default="default", show_default=True, help="The key's owner name.")
@click.option("--generate", is_flag=True, help="Make a new random key (printed once, to stderr).")
@json_option
def hash_key_command(name: str, generate: bool, as_json: bool) -> None:
    """Print the 'name:sha256' keys-file line of an API key read from stdin (or --generate)."""
    from ..remote.auth import KeyFileError, KeyRing, generate_key, hash_key

    if generate:
        raw = generate_key()
        click.echo(f"API key for {name} (shown once; give it to the client): {raw}", err=True)
    elif sys.stdin.isatty():
        raw = click.prompt("API key", hide_input=True, err=True)
    else:
        raw = sys.stdin.readline().rstrip("\r\n")
    if not raw:
        raise click.UsageError("no key read from stdin (or pass --generate)")
    line = f"{name}:{hash_key(raw)}"
    try:
        KeyRing.parse(line)
    except KeyFileError:
        raise click.UsageError(f"bad --name '{name}': use letters, digits, _ . @ -") from None
    click.echo(json.dumps({"name": name, "line": line}) if as_json else line)
