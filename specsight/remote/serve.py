"""Running ``specsight serve``: load the models once, recover the job store, serve the API
with uvicorn until SIGTERM/SIGINT, then drain (``/readyz`` turns 503, the running batch finishes
or is requeued) and close the store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import ModelLoadError
from ..models.load import LoadedModel, load_model
from .auth import KeyRing
from .connections import HEADER_TIMEOUT_S, GuardedH11, connection_limit, install_log_limits
from .jobs import open_job_store
from .protocol import Limits
from .server import ServerState, create_app
from .telemetry import log_handler

__all__ = ["configure_logging", "draining_server", "serve", "server_config"]

log = logging.getLogger("specsight.serve")


def serve(
    model_ids: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    db_path: str | os.PathLike[str] = "specsight-jobs.sqlite",
    keys_file: str | os.PathLike[str] | None = None,
    *,
    keys: KeyRing | None = None,
    device: str = "auto",
    dtype: str = "float32",
    limits: Limits | None = None,
    batch_jobs: int = 16,
    grace_s: float = 30.0,
    log_level: str = "info",
    header_timeout_s: float = HEADER_TIMEOUT_S,
    retention_days: float = 7.0,
    device_map: str | None = None,
    max_memory: dict[str, str] | None = None,
    log_format: str = "text",
) -> None:
    """Load the models once (across devices with ``device_map``: accelerate's 'auto',
    'balanced' or 'sequential', and ``max_memory``), recover the job store (``db_path``: a
    SQLite file, or a ``postgresql://`` URL that replicas share), serve until SIGTERM/SIGINT,
    then drain. ``log_format`` "json" writes one JSON object per log line.

    Keys come from ``keys`` or ``keys_file``; there is no default (see ``KeyRing.allow_all``)."""

    if keys is None:
        if keys_file is None:
            raise ValueError("serve needs keys or a keys_file")
        keys = KeyRing.from_file(keys_file)
    if not len(keys) and not keys.insecure:
        raise ValueError("the key ring holds no key")

    configure_logging(log_level, log_format)
    models: dict[str, LoadedModel] = {}
    for model_id in model_ids:
        loaded = load_model(
            model_id, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory
        )
        if loaded.info.inputs != "text":
            raise ModelLoadError(
                f"'{model_id}' reads {loaded.info.inputs} inputs; a server serves text models only",
                hint="run specs on this model locally (specsight run SPEC)",
            )
        models[loaded.model_id] = loaded
        log.info("loaded %s on %s (%s)", loaded.model_id, loaded.device, loaded.dtype)
    store = open_job_store(db_path, retention_s=retention_days * 86400)
    try:
        log.info("job store %s: recovered %s; %s", store.location, store.recover(), store.counts())
        app = create_app(
            models, store=store, keys=keys, limits=limits, batch_jobs=batch_jobs, grace_s=grace_s
        )
        config = server_config(
            app, host=host, port=port, log_level=log_level, header_timeout_s=header_timeout_s
        )
        draining_server(config, app.state.server, on_stopped=store.close).run()
    finally:
        store.close()


def server_config(
    app: Any,
    *,
    host: str,
    port: int,
    log_level: str = "info",
    header_timeout_s: float | None = None,
) -> Any:
    """uvicorn's configuration for the API: request headers within a time limit, connections
    below the open-file limit, repeated log lines bounded."""
    import uvicorn

    install_log_limits("asyncio", "uvicorn.error", "specsight.serve")
    http = GuardedH11
    if header_timeout_s is not None:
        http = type("GuardedH11", (GuardedH11,), {"header_timeout_s": header_timeout_s})
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
        limit_concurrency=connection_limit(),
        timeout_keep_alive=5,
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
