"""Autoscaling on a local Ray instance (2 CPUs): a deployment of ``tiny-llama`` with
``autoscaling: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 2}`` starts with one
replica, grows to two while the store holds a queue of jobs for it (the replicas report their
model's queued and running jobs; the jobs-per-replica policy turns them into a replica count),
and every job succeeds. Replicas report every half second here (Ray's default: every 10 s)."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import ioi_spec

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="the 'cluster' extra (Ray Serve) is not installed")


def test_replicas_follow_the_queue(postgres_server, tmp_path_factory):
    from ray import serve

    from specsight.remote.cluster import DeployConfig
    from specsight.remote.cluster.deploy import deploy_models
    from specsight.remote.jobs import open_job_store

    # about half a second each on one core: 4 layers x 42 positions x 4 factors
    sweep = ioi_spec(sweep={"layer": "all", "pos": "all", "f": [0.5, 1.0, 1.5, 2.0]},
                     ops=[{"op": "scale", "site": "mlp_out.3", "factor": "{f}"}])  # fmt: skip
    for invoke in sweep["invokes"].values():
        invoke["prompt"] = " ".join([invoke["prompt"]] * 3)
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
               "upscale_delay_s": 0, "look_back_period_s": 1}  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
    with postgres_server.database() as url:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")),
                 log_to_driver=False, object_store_memory=256 << 20,
                 runtime_env={"env_vars": env})  # fmt: skip
        store = open_job_store(url)
        config = DeployConfig(
            db=url, models=[{"id": "tiny-llama", "num_cpus": 1, "batch_jobs": 1,
                             "autoscaling": scaling}], grace_s=5,
        )  # fmt: skip
        deployed = deploy_models(config)
        try:
            assert deployed.replica_states()["tiny-llama"] == {"RUNNING": 1}
            jobs = []
            # a queue one replica needs 40-80 s for: the autoscaler's reaction (15 s seen on a
            # busy 2-core CI machine) must not outlast it
            for i in range(160):
                spec = dict(sweep, name=f"job {i}")  # distinct specs: one job each
                record, _ = store.submit(owner="o", model="tiny-llama", spec_json=json.dumps(spec),
                                         spec_file=None, idempotency_key=None)  # fmt: skip
                jobs.append(record.id)
            deployed.wake("tiny-llama")
            end = time.monotonic() + 90
            while deployed.replica_states()["tiny-llama"].get("RUNNING") != 2:
                assert time.monotonic() < end, "the deployment never grew to 2 replicas"
                assert store.active_jobs("tiny-llama"), "the queue ran dry before it grew"
                time.sleep(0.25)
            while store.active_jobs("tiny-llama") and time.monotonic() < end + 60:
                time.sleep(0.25)
            assert [store.record(j).state for j in jobs] == ["succeeded"] * len(jobs)
        finally:
            deployed.delete()
            serve.shutdown()
            ray.shutdown()
            store.close()
