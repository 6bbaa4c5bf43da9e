"""Running ``specsight serve``: load the models once, recover the job store, serve the API
with uvicorn until SIGTERM/SIGINT, then drain (``/readyz`` turns 503, the running batch finishes
or is requeued) and close the store.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import ModelLoadError
from ..models.load import LoadedModel, load_model
from .admission import checked_saes
from .auth import KeyRing
from .config import ServeConfig
from .connections import ConnectionGuard, GuardedH11, install_log_limits
from .jobs import open_job_store
from .protocol import ConnectionLimits
from .server import ServerState, create_app
from .telemetry import log_handler

__all__ = [
    "configure_logging",
    "connection_limits",
    "draining_server",
    "serve",
    "server_config",
]

log = logging.getLogger("specsight.serve")


def serve(config: ServeConfig, *, keys: KeyRing, log_level: str = "info") -> None:
    """Load the models of ``config`` once (each across devices with its ``device_map``:
    accelerate's 'auto', 'balanced' or 'sequential', and ``max_memory``), recover the job
    store (a SQLite file, or a ``postgresql://`` URL that servers share), serve until
    SIGTERM/SIGINT, then drain. ``keys``: see ``KeyRing.allow_all`` for none."""
    if not len(keys) and not keys.insecure:
        raise ValueError("the key ring holds no key")
    configure_logging(log_level, config.log_format)
    models: dict[str, LoadedModel] = {}
    for entry in config.models:
        loaded = load_model(
            entry.id,
            device=entry.device,
            dtype=entry.dtype,
            device_map=entry.device_map,
            max_memory=entry.max_memory,
        )
        if loaded.info.inputs != "text":
            raise ModelLoadError(
                f"'{entry.id}' reads {loaded.info.inputs} inputs; a server serves text models only",
                hint="run specs on this model locally (specsight run SPEC)",
            )
        loaded.saes = checked_saes(entry.saes)
        models[loaded.model_id] = loaded
        log.info("loaded %s on %s (%s)", loaded.model_id, loaded.device, loaded.dtype)
    store = open_job_store(config.db, retention_s=config.retention_days * 86400)
    try:
        log.info("job store %s: recovered %s; %s", store.location, store.recover(), store.counts())
        app = create_app(
            models,
            store=store,
            keys=keys,
            limits=config.limits,
            batch_jobs=max(entry.batch_jobs for entry in config.models),
            grace_s=config.grace_s,
        )
        uvicorn_config = server_config(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            connections=connection_limits(config),
        )
        draining_server(uvicorn_config, app.state.server, on_stopped=store.close).run()
    finally:
        store.close()


def connection_limits(config: ServeConfig) -> ConnectionLimits:
    """The connection deadlines and caps a serve config asks for."""
    return ConnectionLimits(
        header_timeout_s=config.header_timeout_s,
        body_timeout_s=config.body_timeout_s,
        body_min_bytes_per_s=config.body_min_bytes_per_s,
        max_connections_per_address=config.max_connections_per_address,
    )


def server_config(
    app: Any,
    *,
    host: str,
    port: int,
    log_level: str = "info",
    header_timeout_s: float | None = None,
    connections: ConnectionLimits | None = None,
) -> Any:
    """uvicorn's configuration for the API: request headers and bodies within their deadlines,
    connections capped per client address and below the open-file limit (see
    :mod:`.connections`), repeated log lines bounded. The limits in force are also the ones
    ``GET /v1/limits`` reports."""
    import uvicorn

    install_log_limits("asyncio", "uvicorn.error", "specsight.serve")
    limits = connections or ConnectionLimits()
    if header_timeout_s is not None:
        limits = limits.model_copy(update={"header_timeout_s": header_timeout_s})
    state = getattr(getattr(app, "state", None), "server", None)
    keys = getattr(state, "keys", None)
    guard = ConnectionGuard(limits, authenticate=keys.authenticate if keys is not None else None)
    limits = limits.model_copy(update={"max_connections": guard.max_connections})
    guard.limits = limits
    if state is not None:
        state.connections = limits
    http = type("GuardedH11", (GuardedH11,), {"limits": limits, "guard": guard})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        # asyncio's loop, also where uvloop is installed (Ray Serve brings it): under a low
        # open-file limit uvloop drops the connections it cannot accept without an answer
        loop="asyncio",
        http=http,
        # the guard keeps connections at most max_connections; uvicorn's own 503 is the
        # backstop for requests in flight
        limit_concurrency=guard.max_connections + 1,
        timeout_keep_alive=int(limits.keep_alive_s),
    )


def draining_server(config: Any, state: ServerState, *, on_stopped: Any) -> Any:
    """uvicorn's Server, answering 503 on /readyz from the moment a signal arrives (uvicorn
    then stops accepting connections, finishes open requests and runs the lifespan shutdown,
    which drains the worker). ``on_stopped`` runs before uvicorn re-raises the signal."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.begin_drain()
            super().handle_exit(sig, frame)

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                try:
                    yield
                finally:
                    on_stopped()

    return Server(config)


def configure_logging(level: str, log_format: str) -> None:
    """Plain lines, or (``json``) one JSON object per line with the job ids a record names."""
    handler = log_handler(log_format)
    if log_format == "json":
        logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).handlers = [handler]
            logging.getLogger(name).propagate = False
    else:
        logging.basicConfig(level=level.upper(), handlers=[handler])
