"""Serving on a Ray cluster (``specsight serve --ray``): each model a Ray Serve deployment of
replicas (:mod:`.replica`) sharing a PostgreSQL job store, the HTTP ingress in front
(:mod:`.deploy`), the deploy config file (:mod:`.config`) and the autoscaling policy that
follows the job queue (:mod:`.autoscale`). Ray is the optional ``cluster`` extra."""

from .config import DeployConfig, ModelDeployment, load_deploy_config

__all__ = ["DeployConfig", "ModelDeployment", "load_deploy_config"]
