"""cluster.yaml is a valid Ray cluster-launcher config (checked against Ray's own JSON schema)."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    assert SCHEMA_PATH.is_file(), f"Ray's cluster-config schema is missing at {SCHEMA_PATH}"
    return json.loads(SCHEMA_PATH.read_text())


def test_cluster_yaml_validates_against_rays_schema(cluster, schema):
    jsonschema.validate(cluster, schema)


def test_cluster_yaml_passes_rays_launcher_checks(cluster):
    """The same checks `ray up` runs: defaults filled in, then schema and cross-field rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(cluster)
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_schema_check_is_not_vacuous(cluster, schema):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["teacher"]["resources"]["GPU"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["teacher"]["unknown_key"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_cluster_shape(cluster):
    assert cluster["provider"]["type"] == "aws"
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head is a CPU node"
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "the head is a CPU instance"
    gpu_workers = {name: spec for name, spec in types.items() if spec["resources"].get("GPU")}
    assert {"teacher", "trainer"} <= set(gpu_workers)
    for name, spec in gpu_workers.items():
        assert spec["min_workers"] == 0, f"{name} scales from zero"
        assert spec["max_workers"] >= 1
    # the teacher type advertises the accelerator type that teacher.vllm.accelerator_type asks for
    assert any(key.startswith("accelerator_type:") for key in types["teacher"]["resources"])


def test_package_installed_on_every_node(cluster):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert "vllm" in extras and "embed" in extras
    commands = " ".join(cluster["setup_commands"])
    mount = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    assert "pip install" in commands and mount in commands and "vllm" in commands
    # per-node-type setup commands would replace the common ones; none are set
    assert not any("worker_setup_commands" in spec for spec in cluster["available_node_types"].values())


def test_image_matches_installed_ray(cluster):
    image = cluster["docker"]["image"]
    assert f":{ray.__version__}-" in image, f"{image} should run Ray {ray.__version__}, the version jobs are built for"


def test_token_auth_on_every_node(cluster):
    """Every node starts Ray with token auth and gets the user's token; the dashboard stays private."""
    assert cluster["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head
    assert "RAY_AUTH_MODE=token ray start --address" in worker
    assert "--dashboard-host=127.0.0.1" in head


def test_kuberay_rayjob_manifest_shape():
    job = yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    script = spec["entrypoint"].split()[1]
    assert (ROOT / script).is_file(), f"the entrypoint runs {script}"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    assert {"teacher", "trainer"} <= set(groups)
    for group in groups.values():
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in dockerfile and "[vllm,embed]" in dockerfile
