"""The cluster's parts that need no Ray instance: the deploy config (located mistakes), the Ray
Serve options a model entry becomes (replicas or autoscaling passed through, resources), the
jobs-per-replica autoscaling policy, and the ``serve --ray`` flags."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from specsight.cli import main
from specsight.errors import SpecError
from specsight.remote.cluster import DeployConfig, ModelEntry, load_serve_config
from specsight.remote.cluster.autoscale import POLICY, jobs_per_replica_policy
from specsight.remote.cluster.deploy import app_name, deployment_options

GOOD = """\
address: auto
host: 0.0.0.0
db: postgresql://specsight@db.internal:5432/specsight
keys: keys.txt
limits: {max_queue: 256}
models:
  - id: smollm2-135m
    dtype: bfloat16
    num_gpus: 1
    autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}
  - id: tiny-llama
    replicas: 2
    num_cpus: 2
"""


def test_a_deploy_file_reads_into_its_models(tmp_path: Path):
    path = tmp_path / "deploy.yaml"
    path.write_text(GOOD)
    config = load_serve_config(path)
    assert config.address == "auto" and config.limits.max_queue == 256
    smol, tiny = config.models
    assert (smol.dtype, smol.num_gpus, smol.replicas) == ("bfloat16", 1.0, 1)
    assert (tiny.replicas, tiny.num_cpus, tiny.shard_rows) == (2, 2.0, 4096)


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        ("db: postgresql://u@h/d\nmodels:\n  - id: m\n    replica: 2\n", ":4:5",
         ["models[0].replica", "did you mean 'replicas'"]),
        ("db: jobs.sqlite\nmodels:\n  - id: m\n", ":1:5", ["db", "postgresql://"]),
        ("db: postgresql://u@h/d\nmodels: []\n", ":2:9", ["models", "at least 1"]),
        ("db: postgresql://u@h/d\nmodels:\n  - id: m\n    replicas: 0\n", ":4:15",
         ["models[0].replicas", "greater than or equal to 1"]),
        ("db: postgresql://u@h/d\nmodels:\n  - id: m\n    max_memory: {0: 1GiB}\n", ":4:17",
         ["max_memory goes with device_map"]),
        ("db: postgresql://u@h/d\nlimits: {max_qeue: 3}\nmodels:\n  - id: m\n", ":2:10",
         ["limits.max_qeue", "did you mean 'max_queue'"]),
        ("models:\n  - id: m\n", ":1:1", ["missing 'db'"]),
    ],
)  # fmt: skip
def test_mistakes_in_a_deploy_file_are_located(tmp_path: Path, text, where, words):
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        load_serve_config(path)
    message = str(err.value)
    assert f"deploy.yaml{where}" in message, message
    for word in words:
        assert word in message, message


def test_a_model_entry_becomes_ray_serve_options():
    fixed = deployment_options(ModelEntry(id="m", replicas=3, num_gpus=1), grace_s=10)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert fixed["graceful_shutdown_timeout_s"] == 15.0
    scaling = {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 5}
    scaled = deployment_options(ModelEntry(id="m", autoscaling=scaling), grace_s=10)
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {**scaling, "policy": {"policy_function": POLICY}}
    own = {**scaling, "policy": {"policy_function": "mine:policy"}}
    assert deployment_options(ModelEntry(id="m", autoscaling=own), 1)["autoscaling_config"][
        "policy"
    ] == {"policy_function": "mine:policy"}
    assert app_name("specsight", "org/Model v2") == "specsight-org-Model-v2"


def test_ray_serve_accepts_the_options_and_loads_the_policy():
    serve_config = pytest.importorskip("ray.serve.config")
    scaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4}
    options = deployment_options(ModelEntry(id="m", autoscaling=scaling), grace_s=10)
    config = serve_config.AutoscalingConfig(**options["autoscaling_config"])
    config.policy.serialize_policy()
    assert config.policy.get_policy() is not None


def _context(reports: dict[str, float], current: int = 2, target: float = 4.0):
    config = SimpleNamespace(get_target_ongoing_requests=lambda: target)
    return SimpleNamespace(
        aggregated_metrics={"jobs": reports} if reports else {},
        current_num_replicas=current,
        config=config,
    )


def test_the_policy_asks_one_replica_per_target_jobs():
    # every replica reads the same store: the largest report counts, not the sum
    assert jobs_per_replica_policy(_context({"r1": 9.0, "r2": 9.0}))[0] == 3
    assert jobs_per_replica_policy(_context({"r1": 0.0}))[0] == 0  # Ray applies min_replicas
    assert jobs_per_replica_policy(_context({"r1": 8.0}, target=8))[0] == 1
    assert jobs_per_replica_policy(_context({}, current=3))[0] == 3  # nothing reported yet


def test_serve_flags_for_a_cluster(tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(main, ["serve", "--model", "tiny-llama", "--replicas", "2"])
    assert result.exit_code == 2 and "--replicas: only with --ray" in result.output
    pytest.importorskip("ray")
    result = runner.invoke(main, ["serve", "--ray", "--model", "m", "--insecure-no-auth"])
    assert result.exit_code == 2 and "postgresql://" in result.output
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(GOOD)
    result = runner.invoke(main, ["serve", "--ray", "--deploy", str(deploy), "--model", "x"])
    assert result.exit_code == 2 and "drop --model" in result.output
    deploy.write_text("db: postgresql://u@h/d\nmodels:\n  - id: m\n    replica: 2\n")
    result = runner.invoke(main, ["serve", "--ray", "--deploy", str(deploy), "--insecure-no-auth"])
    assert result.exit_code == 2 and "did you mean 'replicas'" in result.output
    result = runner.invoke(main, ["serve", "--insecure-no-auth"])
    assert result.exit_code == 2 and "--model" in result.output
    assert isinstance(DeployConfig.model_json_schema(), dict)


def test_command_line_flags_go_over_the_deploy_file(tmp_path: Path, monkeypatch):
    pytest.importorskip("ray")
    import specsight.remote.cluster.deploy as deploy

    seen = {}
    monkeypatch.setattr(deploy, "serve_cluster", lambda config, **kw: seen.update(config=config))
    (tmp_path / "keys.txt").write_text("alice:" + "a" * 64 + "\n")
    path = tmp_path / "deploy.yaml"
    path.write_text(GOOD)
    args = ["serve", "--ray", "--deploy", str(path), "--port", "9001", "--max-job-seconds", "60"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.port == 9001 and config.host == "0.0.0.0"
    # one limit given: the file's other limits stay
    assert config.limits.max_job_seconds == 60 and config.limits.max_queue == 256
    assert config.keys == str(tmp_path / "keys.txt")
    (tmp_path / "keys.txt").unlink()
    result = CliRunner().invoke(main, ["serve", "--ray", "--deploy", str(path)])
    assert result.exit_code == 2 and "keys: there is no file" in result.output


def test_a_model_listed_twice_is_refused(tmp_path: Path):
    path = tmp_path / "deploy.yaml"
    path.write_text("db: postgresql://u@h/d\nmodels:\n  - id: m\n  - id: m\n")
    with pytest.raises(SpecError, match="model 'm' is listed twice"):
        load_serve_config(path)


def test_queued_jobs_of_models_not_served_fail(tmp_path: Path):
    from specsight.remote.jobs import open_job_store
    from specsight.remote.protocol import ErrorBody

    with open_job_store(tmp_path / "jobs.sqlite") as store:
        kept, _ = store.submit(
            owner="o", model="a", spec_json="{}", spec_file=None, idempotency_key=None
        )
        gone, _ = store.submit(
            owner="o", model="b", spec_json="{}", spec_file=None, idempotency_key=None
        )
        assert store.active_jobs("b") == 1 and store.record(gone.id).model == "b"
        error = ErrorBody(error="run-error", message="not served")
        assert store.fail_unserved({"a"}, error) == 1
        assert store.record(gone.id).state == "failed"
        assert store.record(kept.id).state == "queued"
        assert store.active_jobs("b") == 0
