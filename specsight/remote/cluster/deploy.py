"""Running ``specsight serve --ray``: each model a Ray Serve deployment of replicas, and this
process the HTTP ingress in front of them, the same API, keys, limits and OpenAPI document as a
single server.

The ingress checks and compiles each submitted spec against the model's tokenizer and the
widths its replicas report (no weights here), records the job in the shared PostgreSQL store and
wakes one replica through the deployment's handle; replicas claim jobs from the store. At
SIGTERM/SIGINT ``/readyz`` turns 503, open requests finish, and the deployments this process
made are deleted (replicas drain within the grace period, and what they still hold goes back to
the queue for the next start).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from ...errors import ModelLoadError, RunError
from ...models.load import LoadedModel, load_model_info
from ..config import DeployConfig, ModelEntry
from ..jobs import open_job_store
from ..protocol import ErrorBody
from ..serve import configure_logging, connection_limits, draining_server, server_config
from ..server import create_app
from .autoscale import POLICY
from .replica import ModelReplica
from .status import DEPLOYMENT, ReplicaStates

if TYPE_CHECKING:
    from ..auth import KeyRing

__all__ = ["Cluster", "deploy_models", "serve_cluster"]

log = logging.getLogger("specsight.serve")


class Cluster:
    """The model deployments of one config on a Ray cluster, as the ingress sees them."""

    def __init__(self, config: DeployConfig, apps: dict[str, str]):
        from ray import serve

        self.config, self.apps = config, apps  # {model id: Ray Serve application name}
        self.handles = {m: serve.get_app_handle(app) for m, app in apps.items()}
        #: {model id: {replica state: count}} from Ray Serve
        self.replica_states = ReplicaStates(apps)

    def models(self) -> dict[str, LoadedModel]:
        """What the ingress checks specs against: each model's tokenizer and info (no weights)
        with the device, dtype, weights identity and module widths its replicas report."""
        views: dict[str, LoadedModel] = {}
        for entry in self.config.models:
            about = self.handles[entry.id].describe.remote().result(timeout_s=600)
            info, tokenizer = load_model_info(
                entry.id, dtype=entry.dtype, revision=about["revision"]
            )
            if info.inputs != "text":
                raise ModelLoadError(
                    f"'{entry.id}' reads {info.inputs} inputs; a server serves text models only",
                    hint="run specs on this model locally (specsight run SPEC)",
                )
            widths = {(m, io): int(w) for m, io, w in about["module_widths"]}
            views[about["model_id"]] = LoadedModel(
                None,  # type: ignore[arg-type]  # the weights live in the replicas
                tokenizer, info, about["model_id"], about["revision"], about["weights_sha256"],
                about["device"], about["dtype"], module_widths=widths,
            )  # fmt: skip
        return views

    def wake(self, model_id: str) -> None:
        """Tell one replica of the model that a job is queued (it would see it at its next
        poll anyway)."""
        handle = self.handles.get(model_id)
        if handle is not None:
            handle.wake.remote()

    def delete(self) -> None:
        """Delete the deployments (their replicas drain first)."""
        _delete_apps(self.apps)


def _delete_apps(apps: dict[str, str]) -> None:
    from ray import serve

    for app in apps.values():
        try:
            serve.delete(app)
        except Exception:  # pragma: no cover - shutting down anyway
            log.exception("deleting %s failed", app)


def app_name(prefix: str, model_id: str) -> str:
    """The Ray Serve application of a model: the prefix and the id, in safe characters."""
    return f"{prefix}-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", model_id).strip("-")


def deployment_options(
    entry: ModelEntry, grace_s: float, log_level: str = "info", log_format: str = "text"
) -> dict[str, Any]:
    """Ray Serve options of a model's deployment (replicas or autoscaling, resources, Ray
    Serve's own log lines without its per-call access log)."""
    encoding = "JSON" if log_format == "json" else "TEXT"
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": entry.num_cpus, "num_gpus": entry.num_gpus},
        "max_ongoing_requests": 16,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 60.0,
        "graceful_shutdown_timeout_s": grace_s + 5.0,
        "logging_config": {
            "encoding": encoding,
            "log_level": log_level.upper(),
            "enable_access_log": False,
        },  # fmt: skip
    }
    if entry.autoscaling is not None:
        scaling = dict(entry.autoscaling)
        scaling.setdefault("policy", {"policy_function": POLICY})
        options["autoscaling_config"] = scaling
    else:
        options["num_replicas"] = entry.replicas
    return options


def deploy_models(
    config: DeployConfig,
    *,
    log_level: str = "info",
    log_format: str = "text",
    deployed: dict[str, str] | None = None,
) -> Cluster:
    """Deploy every model of ``config`` on the connected Ray cluster; waits until each
    application is running. Replicas log as the ingress does (``log_format`` json: one JSON
    object per line). ``deployed`` collects {model id: application} as they are deployed, so
    that a caller can delete them when a later one fails."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    apps: dict[str, str] = {} if deployed is None else deployed
    limits = config.limits.model_dump()
    retention_s = config.retention_days * 86400
    for entry in config.models:
        name = app_name(config.app_prefix, entry.id)
        options = deployment_options(entry, config.grace_s, log_level, log_format)
        deployment = serve.deployment(ModelReplica, **options)
        replica_args = (entry.model_dump(), config.db, limits, retention_s, name)
        log.info("deploying %s as %s", entry.id, name, extra={"model": entry.id})
        bound = deployment.bind(
            *replica_args, grace_s=config.grace_s, log_level=log_level, log_format=log_format
        )
        apps[entry.id] = name
        serve.run(bound, name=name, route_prefix=None)
    return Cluster(config, apps)


def serve_cluster(config: DeployConfig, *, keys: KeyRing, log_level: str = "info") -> None:
    """Join (or start, ``address: null``) the Ray cluster, deploy the models, and serve the
    API from this process until SIGTERM/SIGINT."""
    import ray

    log_format = config.log_format
    configure_logging(log_level, log_format)
    try:
        ray.init(address=config.address, include_dashboard=False, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = config.address or "a local instance"
        raise RunError(
            f"cannot start or join the Ray cluster ({where}): {exc}",
            hint="start the head node with `ray start --head`, or leave out address to run "
            "a local Ray instance",
        ) from None
    store = open_job_store(config.db, retention_s=config.retention_days * 86400)
    apps: dict[str, str] = {}
    try:
        log.info("job store %s: recovered %s", store.location, store.recover())
        cluster = deploy_models(config, log_level=log_level, log_format=log_format, deployed=apps)
        unserved = ErrorBody(
            error="run-error",
            message="this server no longer runs the job's model",
            hint="submit it again to a server that runs it (GET /v1/models)",
        )
        if failed := store.fail_unserved(set(apps), unserved):
            log.warning("failed %d queued job(s) of models no longer deployed", failed)
        app = create_app(
            cluster.models(), store=store, keys=keys, limits=config.limits,
            start_worker=False, grace_s=config.grace_s, notify=cluster.wake,
            replica_states=cluster.replica_states,
        )  # fmt: skip
        uvicorn_config = server_config(
            app, host=config.host, port=config.port, log_level=log_level,
            connections=connection_limits(config),
        )  # fmt: skip
        draining_server(uvicorn_config, app.state.server, on_stopped=lambda: None).run()
    finally:
        _delete_apps(apps)
        store.close()
        ray.shutdown()
