"""Serving on a Ray cluster (``specsight serve --ray``): each model a Ray Serve deployment of
replicas (:mod:`.replica`) sharing a PostgreSQL job store, the HTTP ingress in front
(:mod:`.deploy`, configured by :class:`~specsight.remote.config.DeployConfig`) and the
autoscaling policy that follows the job queue (:mod:`.autoscale`). Ray is the optional
``cluster`` extra."""

from ..config import DeployConfig, ModelEntry, load_serve_config

__all__ = ["DeployConfig", "ModelEntry", "load_serve_config"]
