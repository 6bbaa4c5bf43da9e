"""How specsight serves (:class:`ServeConfig`), one object for the single server and the Ray
cluster: the HTTP side (host, port, keys, limits, header and body deadlines, connections per
client address, log format), the job store,
draining and retention, and one entry per served model (:class:`ModelEntry`: placement, dtype,
jobs run together; on a cluster its replicas, their GPUs and CPUs, autoscaling and sharding).
``specsight serve`` builds it from its flags or reads it from a ``--deploy`` file; a cluster's
(:class:`DeployConfig`) adds the Ray address and a job store every replica reaches.

A mistake in the file is a :class:`~specsight.errors.SpecError` located at ``file:line:col``
with the path inside the file and a did-you-mean, like a spec's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import Issue, SpecError, did_you_mean
from ..spec.issues import data_path
from ..spec.load_yaml import parse_yaml
from ..spec.source import SourceMap
from .protocol import Limits

#: how an SAE id is spelled (a name, as in specs)
SAE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"

__all__ = ["ServeConfig", "DeployConfig", "ModelEntry", "load_serve_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    """One served model (on a cluster: a Ray Serve deployment of ``replicas`` copies)."""

    id: str = Field(description="a model id, as for `specsight serve --model`")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N (inside a replica)")
    device_map: str | dict[str, Any] | None = Field(
        None, description="accelerate's placement across the replica's GPUs (and CPU)"
    )
    max_memory: dict[str, str] | None = None
    replicas: int = Field(1, ge=1, description="replicas when autoscaling is not set")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves")
    num_cpus: float = Field(1.0, gt=0, description="CPU cores each replica reserves")
    batch_jobs: int = Field(16, ge=1, description="queued jobs run together (per replica)")
    shard_rows: int = Field(
        4096, ge=1, description="a job of at least this many rows is split across the replicas"
    )
    saes: dict[Annotated[str, Field(pattern=SAE_ID)], str] = Field(
        default_factory=dict,
        description="SAEs specs may name by id (saes: {x: {id: ID, site: ...}}): id -> a "
        "folder on this machine in SAELens's format",
    )
    autoscaling: dict[str, Any] | None = Field(
        None,
        description="Ray Serve's autoscaling_config (min_replicas, max_replicas, "
        "target_ongoing_requests: jobs per replica, upscale_delay_s, ...)",
    )

    @field_validator("max_memory")
    @classmethod
    def _memory_needs_map(cls, value: Any, info: Any) -> Any:
        if value and info.data.get("device_map") is None:
            raise ValueError("max_memory goes with device_map")
        return value


class ServeConfig(_Strict):
    """How specsight serves: the single server's and (:class:`DeployConfig`) a cluster's."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    db: str = Field(
        description="the job store: a SQLite file (one server), or a postgresql:// URL that "
        "several servers or a cluster's replicas share"
    )
    keys: str | None = Field(None, description="the API keys file (see `specsight hash-key`)")
    limits: Limits = Field(default_factory=Limits)
    grace_s: float = Field(30.0, ge=0)
    retention_days: float = Field(7.0, ge=0)
    header_timeout_s: float = Field(10.0, gt=0, description="seconds to send a request's headers")
    body_timeout_s: float = Field(
        30.0, gt=0, description="seconds to send a request's body, from the end of its headers"
    )
    body_min_bytes_per_s: int = Field(
        1024, ge=0, description="bytes a second a request's body must average over each 5 s"
    )
    max_connections_per_address: int = Field(
        64, ge=1, description="connections one client address holds without a valid API key"
    )
    log_format: Literal["text", "json"] = "text"
    models: list[ModelEntry] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _one_entry_per_model(cls, value: list[ModelEntry]) -> list[ModelEntry]:
        seen: set[str] = set()
        for entry in value:
            if entry.id in seen:
                raise ValueError(f"model '{entry.id}' is listed twice; give it one entry")
            seen.add(entry.id)
        return value


class DeployConfig(ServeConfig):
    """A cluster deployment of specsight's server (``specsight serve --ray``)."""

    address: str | None = Field(
        None, description="the Ray cluster (e.g. auto or ray://head:10001); null: a local one"
    )
    #: the Ray Serve application name prefix of the model deployments
    app_prefix: str = Field("specsight", pattern=r"^[A-Za-z0-9_-]{1,40}$")

    @field_validator("db")
    @classmethod
    def _shared_store(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "replicas on several processes need a job store they all reach: a "
                "postgresql://user@host:port/dbname URL (SQLite serves one process)"
            )
        return value


def load_serve_config(
    path: str | os.PathLike[str], kind: type[ServeConfig] = DeployConfig
) -> ServeConfig:
    """Read and check a serve config file (YAML or JSON), for a cluster (:class:`DeployConfig`)
    or a single server (:class:`ServeConfig`)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(
            Issue("not-found", f"cannot read {file}: {exc.strerror}", file=file)
        ) from None
    data, source = parse_yaml(text, file)
    try:
        config = kind.model_validate(data)
    except ValidationError as exc:
        raise SpecError([_issue(err, source, data, kind) for err in exc.errors()]) from None
    if config.keys is not None:  # beside the file
        config.keys = str((Path(path).parent / config.keys).resolve())
    return config


def _issue(err: Any, source: SourceMap, data: Any, kind: type[ServeConfig]) -> Issue:
    """A pydantic error as an Issue at its place in the file (did-you-mean on unknown keys)."""
    loc = tuple(err["loc"])
    path = data_path(loc, data)
    hint = None
    if err["type"] == "extra_forbidden":
        parent = _at(data, path[:-1])
        cls = ModelEntry if "models" in path else kind
        if path[:1] == ("limits",):
            cls = Limits  # type: ignore[assignment]
        known = [k for k in cls.model_fields if k not in (parent or {})]
        hint = did_you_mean(str(path[-1]), known) or f"known keys: {', '.join(sorted(known))}"
        message = f"unknown key '{path[-1]}'"
    elif err["type"] == "missing":
        message = f"missing '{loc[-1]}'"
    else:
        message = str(err["msg"]).removeprefix("Value error, ")
    line, col = source.locate(path, key=err["type"] == "extra_forbidden")
    return Issue("bad-deploy-config", message, path, source.file, line, col, hint)


def _at(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        data = data[part]
    return data
