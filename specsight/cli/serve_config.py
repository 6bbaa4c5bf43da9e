"""``specsight serve``'s options as one :class:`~specsight.remote.config.ServeConfig`: read from a
``--deploy`` file (the flags given on the command line over it) or made of the command line's
models and options; a cluster's (``--ray``) is a :class:`~specsight.remote.config.DeployConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

__all__ = ["limit_flags", "serve_config"]

#: options that mean something on a cluster only
_RAY_ONLY = ("address", "replicas", "num_gpus", "num_cpus")
#: options a --deploy file gives (the command line may not)
_IN_FILE = ("model_ids", "db_path", "device", "device_map", "max_memory", "dtype", "replicas",
            "num_gpus", "num_cpus", "batch_jobs", "saes")  # fmt: skip
#: options that go over a --deploy file's field: {option: field}
_OVER_FILE = {"address": "address", "host": "host", "port": "port", "grace": "grace_s",
              "retention_days": "retention_days", "header_timeout": "header_timeout_s",
              "body_timeout": "body_timeout_s", "log_format": "log_format"}  # fmt: skip


def serve_config(options: dict[str, Any], ctx: click.Context) -> Any:
    """The configuration the command line asks for (UsageErrors for what it cannot be)."""
    from pydantic import ValidationError

    from ..remote.config import DeployConfig, ServeConfig, load_serve_config

    use_ray = options["use_ray"]
    if not use_ray and (flags := [_flag(ctx, n) for n in _RAY_ONLY if _given(ctx, n)]):
        raise click.UsageError(f"{', '.join(flags)}: only with --ray")
    if use_ray:
        _need_ray()
    kind = DeployConfig if use_ray else ServeConfig
    if options["deploy_file"] is not None:
        return _from_file(load_serve_config(options["deploy_file"], kind), options, ctx)
    if not options["model_ids"]:
        raise click.UsageError(
            "name a model to serve: --model ID (repeat for several), or a --deploy file"
        )
    ray = {"address": options["address"]} if use_ray else {}
    try:
        return kind(
            **ray,
            host=options["host"],
            port=options["port"],
            db=str(options["db_path"]),
            models=[_entry(model_id, options) for model_id in options["model_ids"]],
            grace_s=options["grace"],
            retention_days=options["retention_days"],
            header_timeout_s=options["header_timeout"],
            body_timeout_s=options["body_timeout"],
            log_format=options["log_format"],
            limits=_limits(options),
        )
    except ValidationError as exc:
        raise click.UsageError(
            "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        ) from None


def _need_ray() -> None:
    try:
        import ray  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise click.UsageError(
            f"--ray needs Ray Serve ({exc}): pip install 'specsight[cluster]'"
        ) from None


def _from_file(config: Any, options: dict[str, Any], ctx: click.Context) -> Any:
    """A --deploy file's configuration, the flags given on the command line over it."""
    clash = [_flag(ctx, n) for n in _IN_FILE if _given(ctx, n)]
    if clash:
        raise click.UsageError(f"--deploy gives the models and the store; drop {', '.join(clash)}")
    for flag, field in _OVER_FILE.items():
        if _given(ctx, flag) and hasattr(config, field):
            setattr(config, field, options[flag])
    config.limits = config.limits.model_copy(update=limit_flags(options))
    if config.keys is not None and not Path(config.keys).is_file():
        raise click.UsageError(f"{options['deploy_file']}: keys: there is no file {config.keys}")
    return config


def _entry(model_id: str, options: dict[str, Any]) -> dict[str, Any]:
    """A served model's entry, from the command line's placement options."""
    if options["device_map"] is not None and options["device"] != "auto":
        raise click.UsageError("--device and --device-map both place the models; keep one")
    if options["max_memory"] and options["device_map"] is None:
        raise click.UsageError("--max-memory goes with --device-map")
    memory = {}
    for item in options["max_memory"]:
        where, sep, size = item.partition("=")
        if not sep or not where or not size:
            raise click.UsageError(f"--max-memory {item!r}: write DEVICE=SIZE, e.g. 0=70GiB")
        memory[where] = size
    return {
        "id": model_id,
        "dtype": options["dtype"],
        "device": options["device"],
        "device_map": options["device_map"],
        "max_memory": memory or None,
        "replicas": options["replicas"],
        "num_gpus": options["num_gpus"],
        "num_cpus": options["num_cpus"],
        "batch_jobs": options["batch_jobs"],
        "saes": sae_options(options["saes"]),
    }


def sae_options(values: tuple[str, ...]) -> dict[str, str]:
    """``--sae ID=PATH`` options as {id: path}."""
    saes: dict[str, str] = {}
    for value in values:
        sae_id, sep, folder = value.partition("=")
        if not sep or not sae_id or not folder:
            raise click.UsageError(f"--sae {value!r}: write ID=PATH, e.g. res6=saes/res6")
        if sae_id in saes:
            raise click.UsageError(f"--sae {sae_id}: given twice")
        saes[sae_id] = folder
    return saes


def _limits(options: dict[str, Any]) -> Any:
    from ..remote.protocol import Limits

    return Limits(**limit_flags(options))


def limit_flags(options: dict[str, Any]) -> dict[str, Any]:
    """The limits the command line sets (a --max-queue also sets the per-key share)."""
    given: dict[str, Any] = {}
    if options["max_queue"] is not None:
        given["max_queue"] = options["max_queue"]
        given["max_queue_per_key"] = max(16, options["max_queue"] // 4)
    if options["max_queue_per_key"] is not None:
        given["max_queue_per_key"] = options["max_queue_per_key"]
    if options["max_job_seconds"] is not None:
        given["max_job_seconds"] = options["max_job_seconds"]
    return given


def _flag(ctx: click.Context, name: str) -> str:
    """The option's spelling on the command line (``model_ids`` -> ``--model``)."""
    return next(p.opts[0] for p in ctx.command.params if p.name == name)


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"
