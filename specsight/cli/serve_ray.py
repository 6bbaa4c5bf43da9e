"""``specsight serve --ray``'s options: the cluster deployment they ask for, from a ``--deploy``
file (with the flags given on the command line over it) or from the command line's models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

__all__ = ["cluster_config"]


def cluster_config(given: dict[str, Any], use_ray: bool, deploy_file: Path | None, ctx: Any) -> Any:
    """The cluster deployment ``--ray`` asks for: the ``--deploy`` file, or one made of the
    command line's models and options (None: a single server)."""
    ray_only = ("address", "replicas", "num_gpus", "num_cpus")
    if not use_ray:
        flags = [n for n in ray_only + ("deploy_file",) if _given(ctx, n)]
        if flags:
            names = ", ".join(_flag(ctx, n) for n in flags)
            raise click.UsageError(f"{names}: only with --ray")
        return None
    try:
        import ray  # noqa: F401

        from ..remote.cluster import DeployConfig, load_deploy_config
    except ImportError as exc:
        raise click.UsageError(
            f"--ray needs Ray Serve ({exc}): pip install 'specsight[cluster]'"
        ) from None
    if deploy_file is not None:
        in_file = ("model_ids", "db_path", "device", "device_map", "max_memory", "dtype")
        clash = [_flag(ctx, n) for n in in_file + ray_only[1:] + ("batch_jobs",) if _given(ctx, n)]
        if clash:
            raise click.UsageError(
                f"--deploy gives the models, replicas and store; drop {', '.join(clash)}"
            )
        config = load_deploy_config(deploy_file)
        if config.keys is not None:
            config.keys = str((deploy_file.parent / config.keys).resolve())
        # what the command line gives goes over the file
        for flag, field in _OVER_FILE.items():
            if _given(ctx, flag):
                setattr(config, field, given[flag])
        config.limits = config.limits.model_copy(update=given["limit_flags"])
        return config
    if not given["model_ids"]:
        raise click.UsageError("--ray serves the --model IDs (or a --deploy file's models)")
    entries = [
        {
            "id": model_id,
            "dtype": given["dtype"],
            "device": given["device"],
            "device_map": given["device_map"],
            "max_memory": given["memory"] or None,
            "replicas": given["replicas"],
            "num_gpus": given["num_gpus"],
            "num_cpus": given["num_cpus"],
            "batch_jobs": given["batch_jobs"],
        }  # fmt: skip
        for model_id in given["model_ids"]
    ]
    from pydantic import ValidationError

    try:
        return DeployConfig(
            address=given["address"], host=given["host"], port=given["port"],
            db=str(given["db_path"]), models=entries, grace_s=given["grace"],
            retention_days=given["retention_days"], limits=given["limits"],
        )  # fmt: skip
    except ValidationError as exc:
        raise click.UsageError(
            "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        ) from None


#: flags that override a deploy file's field: {flag: field}
_OVER_FILE = {"address": "address", "host": "host", "port": "port", "grace": "grace_s",
              "retention_days": "retention_days"}  # fmt: skip


def _flag(ctx: Any, name: str) -> str:
    """The option's spelling on the command line (``model_ids`` -> ``--model``)."""
    return next(p.opts[0] for p in ctx.command.params if p.name == name)


def _given(ctx: Any, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"
