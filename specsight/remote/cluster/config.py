"""The deploy config of ``specsight serve --ray --deploy FILE``: the Ray cluster to join, the
shared PostgreSQL job store, the HTTP ingress, and one entry per served model with its replicas
(``num_gpus``/``num_cpus`` each), placement and Ray Serve autoscaling settings.

A mistake in the file is a :class:`~specsight.errors.SpecError` located at ``file:line:col``
with the path inside the file and a did-you-mean, like a spec's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ...errors import Issue, SpecError, did_you_mean
from ...spec.issues import data_path
from ...spec.load_yaml import parse_yaml
from ...spec.source import SourceMap
from ..protocol import Limits

__all__ = ["DeployConfig", "ModelDeployment", "load_deploy_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelDeployment(_Strict):
    """One served model: a Ray Serve deployment of ``replicas`` copies."""

    id: str = Field(description="a model id, as for `specsight serve --model`")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N (inside the replica)")
    device_map: str | dict[str, Any] | None = Field(
        None, description="accelerate's placement across the replica's GPUs (and CPU)"
    )
    max_memory: dict[str, str] | None = None
    replicas: int = Field(1, ge=1, description="replicas when autoscaling is not set")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves")
    num_cpus: float = Field(1.0, gt=0, description="CPU cores each replica reserves")
    batch_jobs: int = Field(16, ge=1, description="queued jobs one replica runs together")
    shard_rows: int = Field(
        4096, ge=1, description="a job of at least this many rows is split across the replicas"
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


class DeployConfig(_Strict):
    """A cluster deployment of specsight's server."""

    address: str | None = Field(
        None, description="the Ray cluster (e.g. auto or ray://head:10001); null: a local one"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    db: str = Field(description="the job store every ingress and replica reaches: a "
                    "postgresql:// URL")  # fmt: skip
    keys: str | None = Field(None, description="the API keys file (see `specsight hash-key`)")
    limits: Limits = Field(default_factory=Limits)
    grace_s: float = Field(30.0, ge=0)
    retention_days: float = Field(7.0, ge=0)
    models: list[ModelDeployment] = Field(min_length=1)
    #: the Ray Serve application name prefix of the model deployments
    app_prefix: str = Field("specsight", pattern=r"^[A-Za-z0-9_-]{1,40}$")

    @field_validator("models")
    @classmethod
    def _one_entry_per_model(cls, value: list[ModelDeployment]) -> list[ModelDeployment]:
        seen: set[str] = set()
        for entry in value:
            if entry.id in seen:
                raise ValueError(f"model '{entry.id}' is listed twice; give it one entry")
            seen.add(entry.id)
        return value

    @field_validator("db")
    @classmethod
    def _shared_store(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "replicas on several processes need a job store they all reach: a "
                "postgresql://user@host:port/dbname URL (SQLite serves one process)"
            )
        return value


def load_deploy_config(path: str | os.PathLike[str]) -> DeployConfig:
    """Read and check a deploy config file (YAML or JSON)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(
            Issue("not-found", f"cannot read {file}: {exc.strerror}", file=file)
        ) from None
    data, source = parse_yaml(text, file)
    try:
        return DeployConfig.model_validate(data)
    except ValidationError as exc:
        raise SpecError([_issue(err, source, data) for err in exc.errors()]) from None


def _issue(err: Any, source: SourceMap, data: Any) -> Issue:
    """A pydantic error as an Issue at its place in the file (did-you-mean on unknown keys)."""
    loc = tuple(err["loc"])
    path = data_path(loc, data)
    hint = None
    if err["type"] == "extra_forbidden":
        parent = _at(data, path[:-1])
        cls = ModelDeployment if "models" in path else DeployConfig
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
