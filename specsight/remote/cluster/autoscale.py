"""The autoscaling policy of a model's deployment: replicas follow the model's jobs.

Jobs do not reach replicas as Ray Serve requests (replicas claim them from the job store), so
Ray's default policy, which counts requests, would see no load. Each replica reports its model's
queued and running jobs (``record_autoscaling_stats``); every replica reads the same store, so
the policy takes the largest report, not the sum, and asks for one replica per
``target_ongoing_requests`` jobs (none without jobs). Ray Serve then applies the deployment's
``min_replicas``, ``max_replicas``, delays and scaling factors as for its own policies. With
``min_replicas: 0``, the wake-up the ingress sends through the deployment's handle after a submit
is what starts a replica again (Ray Serve's cold start).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["POLICY", "jobs_per_replica_policy"]

#: the import path Ray Serve loads the policy from
POLICY = "specsight.remote.cluster.autoscale:jobs_per_replica_policy"


def jobs_per_replica_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Ray Serve's custom-policy signature: (AutoscalingContext) -> (replicas, state)."""
    reports = (ctx.aggregated_metrics or {}).get("jobs") or {}
    if not reports:  # no replica has reported yet
        return ctx.current_num_replicas, {}
    jobs = max(reports.values())
    target = float(ctx.config.get_target_ongoing_requests() or 1.0)
    return math.ceil(jobs / target), {"jobs": jobs}
