"""cluster.yaml: valid for Ray's own launcher schema, and nothing exposed beyond SSH."""

import copy
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster():
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def _validate(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_valid_for_ray_schema(cluster):
    _validate(cluster)


def test_schema_check_can_fail(cluster):
    from jsonschema.exceptions import ValidationError

    broken = copy.deepcopy(cluster)
    del broken["available_node_types"]["gpu-1x"]["resources"]
    with pytest.raises(ValidationError, match="resources"):
        _validate(broken)


def _commands(cluster):
    return "\n".join(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] + cluster["setup_commands"])


def test_nothing_listens_publicly(cluster):
    cmds = _commands(cluster)
    assert "--dashboard-host=127.0.0.1" in cmds
    assert re.search(r"mlflow server --host 127\.0\.0\.1", cmds)
    assert "0.0.0.0" not in cmds
    assert "security_group" not in cluster["provider"]  # no extra inbound rules beyond SSH


def test_token_auth_everywhere(cluster):
    for cmd in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert "~/.ray/auth_token" in cluster["file_mounts"]


def test_versions_match_what_is_tested(cluster):
    pins = dict(line.split("==") for line in open(os.path.join(ROOT, "constraints.txt")) if "==" in line)
    ray_version = pins["ray"].strip()
    for image in (cluster["docker"]["head_image"], cluster["docker"]["worker_image"]):
        assert image.startswith(f"rayproject/ray:{ray_version}-py311")


def test_gpu_workers_autoscale_and_nodes_reach_s3(cluster):
    types = cluster["available_node_types"]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    assert types[cluster["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
