"""infra/cluster validates offline: the launcher config against Ray's own schema, the KubeRay manifests
against a JSON schema of the CRD fields they use, the worker image's packages against pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "infra" / "cluster"

_CONTAINER = {
    "type": "object", "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"}, "image": {"type": "string", "pattern": r"^[\w./-]+:[\w.-]+$"},
        "resources": {"type": "object", "properties": {
            "requests": {"type": "object"}, "limits": {"type": "object"}}},
        "envFrom": {"type": "array"}, "ports": {"type": "array"}, "volumeMounts": {"type": "array"},
    },
}
_POD_TEMPLATE = {
    "type": "object", "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"], "properties": {
        "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
        "volumes": {"type": "array"}, "tolerations": {"type": "array"},
        "serviceAccountName": {"type": "string"},
    }}},
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}  # rayStartParams are strings
# the fields of ray.io/v1 RayCluster / RayJob that the manifests use (from the KubeRay CRDs)
RAY_CLUSTER_SPEC = {
    "type": "object", "required": ["headGroupSpec"], "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headGroupSpec": {"type": "object", "required": ["template"], "additionalProperties": False,
                          "properties": {"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                         "rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE}},
        "workerGroupSpecs": {"type": "array", "items": {
            "type": "object", "required": ["groupName", "template"], "additionalProperties": False,
            "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
                           "minReplicas": {"type": "integer", "minimum": 0},
                           "maxReplicas": {"type": "integer", "minimum": 1},
                           "rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE}}},
    },
}
_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}}}
RAY_CLUSTER = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
               "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"},
                              "metadata": _METADATA, "spec": RAY_CLUSTER_SPEC}}
RAY_JOB = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": _METADATA,
        "spec": {"type": "object", "required": ["entrypoint", "rayClusterSpec"],
                 "additionalProperties": False,
                 "properties": {
                     "entrypoint": {"type": "string"}, "shutdownAfterJobFinishes": {"type": "boolean"},
                     "ttlSecondsAfterFinished": {"type": "integer"},
                     "activeDeadlineSeconds": {"type": "integer"},
                     "backoffLimit": {"type": "integer"}, "runtimeEnvYAML": {"type": "string"},
                     "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                     "rayClusterSpec": RAY_CLUSTER_SPEC}},
    },
}


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster.aws.yaml").read_text())
    validate_config(fillout_defaults(config))
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1 and config["head_node_type"] in config["available_node_types"]


def test_launcher_validation_rejects_a_broken_config():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster.aws.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fillout_defaults(config))


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-lodo.yaml", "rayjob-scan.yaml", "config.yaml"])
def test_kuberay_manifests_match_the_crd_fields(name):
    schemas = {"RayCluster": RAY_CLUSTER, "RayJob": RAY_JOB}
    for document in _documents(CLUSTER / "kuberay" / name):
        if document["kind"] in schemas:
            jsonschema.validate(document, schemas[document["kind"]])
        else:
            assert document["apiVersion"] == "v1" and document["metadata"]["name"]


@pytest.mark.parametrize("command", ["lodo", "scan"])
def test_rayjobs_run_the_command_on_gpu_workers_against_s3(command):
    (job,) = _documents(CLUSTER / "kuberay" / f"rayjob-{command}.yaml")
    assert job["spec"]["entrypoint"].startswith(f"residual-ad {command} ")
    assert "s3://" in job["spec"]["entrypoint"]
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["rayStartParams"]["num-gpus"] == "1"
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_schema_rejects_a_wrong_manifest():
    (job,) = _documents(CLUSTER / "kuberay" / "rayjob-lodo.yaml")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, RAY_JOB)


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_worker_image_packages_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = [d for d in project["dependencies"] if _name(d) != "faiss-cpu"]
    expected += project["optional-dependencies"]["gpu"]
    lines = (CLUSTER / "requirements-worker.txt").read_text().splitlines()
    listed = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert sorted(listed) == sorted(expected), "regenerate infra/cluster/requirements-worker.txt"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    for pin in [d for d in project["dependencies"] if _name(d) in ("torch", "torchvision")]:
        assert pin in dockerfile, f"Dockerfile must install the CUDA build of {pin}"
    assert "requirements-worker.txt" in dockerfile and "faiss-cpu" not in "\n".join(listed)
