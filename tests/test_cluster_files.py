"""cluster.yaml, jobs/rayjob.yaml and every pipeline file in jobs/ are checked, so they stay runnable."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's launcher schema; raises on any unknown or missing field
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert {"cpu_pool", "gpu_pool"} <= set(nodes) and all(
        nodes[n]["min_workers"] == 0 for n in ("cpu_pool", "gpu_pool")
    )
    assert nodes["gpu_pool"]["node_config"]["InstanceType"] in {
        "p4d.24xlarge",
        "p4de.24xlarge",
        "p5.48xlarge",
        "g5.48xlarge",
    }
    assert any("install.sh --gpu --cluster" in c for c in nodes["gpu_pool"]["worker_setup_commands"])
    assert config["file_mounts"] == {"~/uniner": ".", "~/.ray/auth_token": "~/.ray/auth_token"}


def test_every_node_can_serve_jobs_with_token_authentication():
    """`ray job submit` needs the dashboard's job server, which `ray[data,train]` alone lacks (it is `ray[default]`),
    and the same token mode on every node."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("ray[default,") or r.startswith("ray[default]") for r in extras["cluster"])
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        assert any("./install.sh --cluster" in c for c in commands)
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in commands)
    assert 'pip install --no-cache-dir ".[gpu,cluster]"' in (ROOT / "jobs" / "Dockerfile").read_text()
    job = yaml.safe_load((ROOT / "jobs" / "rayjob.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}


def test_rayjob_matches_the_cluster_shape():
    job = yaml.safe_load((ROOT / "jobs" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["uniner", "pipeline"] and (ROOT / "jobs" / Path(entry[2]).name).is_file()
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu-pool", "gpu-pool"}
    for group in groups.values():
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        assert (
            group["template"]["spec"]["containers"][0]["image"]
            == cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        )
    assert groups["gpu-pool"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


PIPELINE_FILES = sorted(p for p in (ROOT / "jobs").glob("*.yaml") if "stages" in yaml.safe_load(p.read_text()))


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.name)
def test_pipeline_files_resolve(path):
    from uniner.config import read_yaml
    from uniner.pipeline import resolve

    _, configs = resolve(read_yaml(str(path)), f"in {path.name}")
    assert configs
