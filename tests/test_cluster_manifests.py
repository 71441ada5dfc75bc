"""The cluster manifests: the `ray up` YAML passes Ray's own schema; the RayJob names what
KubeRay needs (and this product needs: token auth, a GPU group, shared checkpoints, MLflow)."""

import copy
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_ray_up_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-up-aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert all("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"][1:])
    assert "~/.ray/auth_token" in config["file_mounts"]
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["node_confg"] = {}
    with pytest.raises(Exception, match="node_confg"):
        validate_config(prepare_config(broken))


def _env(container) -> dict:
    return {e["name"]: e for e in container["env"]}


def test_rayjob_manifest_names_the_fields_kuberay_needs():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("unlearn run configs/") and "ray.use_gpu=true" in spec["entrypoint"]
    assert "ray.storage_path=s3://" in spec["entrypoint"]
    assert (Path(__file__).resolve().parents[1] / spec["entrypoint"].split()[2]).is_file()
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "rayStartParams" in cluster["headGroupSpec"] and head["image"]
    groups = cluster["workerGroupSpecs"]
    gpu = [g for g in groups
           if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu and all({"groupName", "replicas", "rayStartParams", "template"} <= set(g) for g in groups)
    for container in (head, gpu[0]["template"]["spec"]["containers"][0],
                      spec["submitterPodTemplate"]["spec"]["containers"][0]):
        env = _env(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"]
        assert "MLFLOW_TRACKING_URI" in env


def test_submit_script_is_valid_bash_and_demands_its_environment(tmp_path):
    script = CLUSTER / "submit.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run(["bash", str(script), "configs/tofu_tiny.yaml"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0 and "RAY_ADDRESS" in result.stderr
