"""The files in cluster/ parse and name real fields, checked against the tools that will read them.

- cluster-launcher.aws.yaml: Ray's own JSON schema (ray/autoscaler/ray-schema.json, as `ray up`
  applies it) before and after Ray fills in its AWS defaults; node_config against botocore's
  EC2 RunInstances model (the schema leaves node_config free-form).
- ray-cluster.gpu.yaml / ray-job.drope.yaml: KubeRay ray.io/v1 field lists written from KubeRay's
  Go types (ray-operator/apis/ray/v1/raycluster_types.go, rayjob_types.go) and the core/v1 pod
  fields used; the RayJob's ConfigMap spec loads with drope's own spec loader.
- runtime-env.yaml: ray.runtime_env.RuntimeEnv accepts it.
Nowhere a secret: credentials come from Secrets, instance profiles or the nodes' environment.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml"))


def _load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


# ---- KubeRay ray.io/v1 and the core/v1 pod fields: a field -> sub-schema map; None = free-form ----
def obj(**fields):
    return ("obj", fields)


def arr(item):
    return ("arr", item)


SECRET_REF = obj(name=None, key=None, optional=None)
ENV_VAR = obj(name=None, value=None, valueFrom=obj(secretKeyRef=SECRET_REF, configMapKeyRef=SECRET_REF,
                                                  fieldRef=None, resourceFieldRef=None))
CONTAINER = obj(
    name=None, image=None, imagePullPolicy=None, command=None, args=None, workingDir=None,
    env=arr(ENV_VAR), envFrom=arr(obj(secretRef=SECRET_REF, configMapRef=SECRET_REF, prefix=None)),
    ports=arr(obj(containerPort=None, name=None, protocol=None, hostPort=None, hostIP=None)),
    resources=obj(requests=None, limits=None, claims=None),
    volumeMounts=arr(obj(name=None, mountPath=None, readOnly=None, subPath=None, subPathExpr=None,
                         mountPropagation=None)),
    securityContext=None, lifecycle=None, livenessProbe=None, readinessProbe=None,
)
VOLUME = obj(name=None, emptyDir=obj(medium=None, sizeLimit=None),
             configMap=obj(name=None, items=None, defaultMode=None, optional=None),
             secret=obj(secretName=None, items=None, defaultMode=None, optional=None),
             persistentVolumeClaim=obj(claimName=None, readOnly=None), hostPath=None)
POD_TEMPLATE = obj(
    metadata=obj(labels=None, annotations=None, name=None),
    spec=obj(containers=arr(CONTAINER), initContainers=arr(CONTAINER), volumes=arr(VOLUME),
             serviceAccountName=None, nodeSelector=None, affinity=None, imagePullSecrets=None,
             tolerations=arr(obj(key=None, operator=None, value=None, effect=None,
                                 tolerationSeconds=None)),
             restartPolicy=None, securityContext=None, priorityClassName=None,
             terminationGracePeriodSeconds=None, runtimeClassName=None, schedulerName=None),
)
HEAD_GROUP = obj(serviceType=None, headService=None, enableIngress=None, rayStartParams=None,
                 template=POD_TEMPLATE)
WORKER_GROUP = obj(groupName=None, replicas=None, minReplicas=None, maxReplicas=None, numOfHosts=None,
                   rayStartParams=None, template=POD_TEMPLATE, scaleStrategy=None, suspend=None,
                   idleTimeoutSeconds=None)
RAY_CLUSTER_SPEC = obj(
    headGroupSpec=HEAD_GROUP, workerGroupSpecs=arr(WORKER_GROUP), rayVersion=None,
    enableInTreeAutoscaling=None, headServiceAnnotations=None, suspend=None,
    autoscalerOptions=obj(resources=None, image=None, imagePullPolicy=None, env=arr(ENV_VAR),
                          envFrom=None, volumeMounts=None, securityContext=None,
                          idleTimeoutSeconds=None, upscalingMode=None),
)
RAY_JOB_SPEC = obj(
    activeDeadlineSeconds=None, backoffLimit=None, rayClusterSpec=RAY_CLUSTER_SPEC,
    submitterPodTemplate=POD_TEMPLATE, metadata=None, clusterSelector=None, submitterConfig=None,
    managedBy=None, deletionStrategy=None, entrypoint=None, runtimeEnvYAML=None, jobId=None,
    submissionMode=None, entrypointResources=None, entrypointNumCpus=None, entrypointNumGpus=None,
    ttlSecondsAfterFinished=None, shutdownAfterJobFinishes=None, suspend=None, schedule=None,
)
META = obj(name=None, namespace=None, labels=None, annotations=None)
KINDS = {
    ("ray.io/v1", "RayCluster"): obj(apiVersion=None, kind=None, metadata=META, spec=RAY_CLUSTER_SPEC),
    ("ray.io/v1", "RayJob"): obj(apiVersion=None, kind=None, metadata=META, spec=RAY_JOB_SPEC),
    ("v1", "ConfigMap"): obj(apiVersion=None, kind=None, metadata=META, data=None),
}


def unknown_fields(node, schema, path="") -> list[str]:
    """Paths in `node` that `schema` does not name (a typo KubeRay would drop or reject)."""
    if schema is None:
        return []
    tag, inner = schema
    if tag == "arr":
        assert isinstance(node, list), f"{path}: expected a list"
        return [p for i, item in enumerate(node) for p in unknown_fields(item, inner, f"{path}[{i}]")]
    assert isinstance(node, dict), f"{path}: expected a mapping"
    bad = [f"{path}.{k}" for k in node if k not in inner]
    return bad + [p for k, v in node.items() if k in inner for p in unknown_fields(v, inner[k], f"{path}.{k}")]


def _cluster_specs() -> list[tuple[str, dict]]:
    out = [("ray-cluster.gpu.yaml", d["spec"]) for d in _load_all("ray-cluster.gpu.yaml")]
    out += [("ray-job.drope.yaml", d["spec"]["rayClusterSpec"]) for d in _load_all("ray-job.drope.yaml")
            if d["kind"] == "RayJob"]
    return out


# ---- secrets: names that carry credentials and shapes of real keys / tokens ----
SECRET_NAME = re.compile(r"(^|_)(SECRET|TOKEN|PASSWORD|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)", re.I)
SECRET_SHAPES = [re.compile(p) for p in (r"AKIA[0-9A-Z]{16}", r"ASIA[0-9A-Z]{16}", r"\bhf_[A-Za-z0-9]{30,}",
                                         r"(?i)aws_secret_access_key\s*[:=]\s*\S+", r"-----BEGIN [A-Z ]*PRIVATE KEY")]


def _env_lists(node):
    """Every container / autoscaler `env:` list in a manifest tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "env" and isinstance(v, list):
                yield v
            yield from _env_lists(v)
    elif isinstance(node, list):
        for v in node:
            yield from _env_lists(v)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_cluster_yaml_parses_and_holds_no_secret(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path.name}: no YAML mapping"
    text = path.read_text()
    for shape in SECRET_SHAPES:
        assert not shape.search(text), f"{path.name}: looks like a credential ({shape.pattern})"
    for doc in docs:
        for env in _env_lists(doc):
            literal = [e["name"] for e in env if SECRET_NAME.search(e["name"]) and "value" in e]
            assert not literal, f"{path.name}: {literal} given as literal values; use a Secret"


@pytest.mark.parametrize("name", ["ray-cluster.gpu.yaml", "ray-job.drope.yaml"])
def test_kuberay_manifests_name_real_fields(name):
    docs = _load_all(name)
    kinds = {d["kind"] for d in docs}
    assert kinds & {"RayCluster", "RayJob"}, f"{name}: no RayCluster or RayJob"
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        assert key in KINDS, f"{name}: unexpected {key}; KubeRay serves ray.io/v1"
        bad = unknown_fields(doc, KINDS[key], doc["kind"])
        assert not bad, f"{name}: fields KubeRay / Kubernetes do not define: {bad}"


@pytest.mark.parametrize("name,spec", _cluster_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_kuberay_cluster_requests_gpus_and_matches_installed_ray(name, spec):
    import ray

    assert spec["rayVersion"] == ray.__version__, f"{name}: rayVersion differs from the pinned Ray"
    head = spec["headGroupSpec"]
    groups = [head] + spec["workerGroupSpecs"]
    for g in groups:  # KubeRay's rayStartParams is map[string]string: a bare 0 fails validation
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), f"{name}: quote rayStartParams"
        assert g["template"]["spec"]["containers"], f"{name}: a group without containers"
    assert head["rayStartParams"].get("num-gpus") == "0", f"{name}: the CPU head must advertise no GPU"
    images = {g["template"]["spec"]["containers"][0]["image"] for g in groups}
    assert len(images) == 1, f"{name}: head and workers must run the same drope image: {images}"
    for w in spec["workerGroupSpecs"]:
        assert w["minReplicas"] <= w.get("replicas", w["minReplicas"]) <= w["maxReplicas"], w["groupName"]
        ray_container = w["template"]["spec"]["containers"][0]  # KubeRay: the first is Ray's
        res = ray_container["resources"]
        gpus = res["limits"].get("nvidia.com/gpu")
        assert gpus and int(gpus) > 0, f"{name}/{w['groupName']}: request GPUs as limits nvidia.com/gpu"
        assert res.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus, "GPU requests must equal limits"
        tolerated = {t.get("key") for t in w["template"]["spec"].get("tolerations", [])}
        assert "nvidia.com/gpu" in tolerated, f"{name}/{w['groupName']}: GPU nodes are usually tainted"
        mounts = {m["mountPath"] for m in ray_container.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"{name}/{w['groupName']}: NCCL needs a large /dev/shm"


def test_ray_job_runs_drope_on_its_configmap_spec(tmp_path):
    from ray.runtime_env import RuntimeEnv

    from workflows.cli import COMMANDS
    from workflows.spec import load_spec

    docs = {d["kind"]: d for d in _load_all("ray-job.drope.yaml")}
    job = docs["RayJob"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "drope" and argv[1] in COMMANDS, f"entrypoint {job['entrypoint']!r}"
    assert "--run-id" in argv, "a fixed run id is what lets a retry on a new cluster resume the run"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    # The spec path in the entrypoint is a key of the ConfigMap mounted on the head.
    spec_path = Path(argv[2])
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    assert str(spec_path.parent) in mounts, f"the entrypoint reads {spec_path}; nothing is mounted there"
    volume = {v["name"]: v for v in head["volumes"]}[mounts[str(spec_path.parent)]]
    cm = docs["ConfigMap"]
    assert volume.get("configMap", {}).get("name") == cm["metadata"]["name"], "mount the spec ConfigMap"
    (tmp_path / spec_path.name).write_text(cm["data"][spec_path.name])
    spec = load_spec(str(tmp_path / spec_path.name))
    assert spec.storage.root.startswith("s3://"), "a cluster run needs storage every node can reach"
    assert spec.tracking.uri.startswith("http"), "a cluster run logs to the team's MLflow server"
    assert spec.recalibrate.use_gpu
    gpus = sum(int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               * w["maxReplicas"] for w in job["rayClusterSpec"]["workerGroupSpecs"])
    assert spec.recalibrate.num_workers <= gpus, "more Ray Train GPU workers than the cluster has GPUs"
    # The job's runtime env is a valid one, with the same non-secret variables drope submit sends.
    env = yaml.safe_load(job["runtimeEnvYAML"])
    RuntimeEnv(**env)
    shared = yaml.safe_load((CLUSTER / "runtime-env.yaml").read_text())["env_vars"]
    assert env["env_vars"] == shared, "keep runtimeEnvYAML's env_vars equal to cluster/runtime-env.yaml's"


def test_runtime_env_is_a_valid_ray_runtime_env_without_secrets():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime-env.yaml").read_text())
    assert set(env) <= RuntimeEnv.known_fields, f"unknown runtime_env fields {set(env) - RuntimeEnv.known_fields}"
    parsed = RuntimeEnv(**env)
    assert parsed["env_vars"] == env["env_vars"] and all(isinstance(v, str) for v in env["env_vars"].values())
    leaked = [k for k in env["env_vars"] if SECRET_NAME.search(k) or k.startswith(("AWS_", "HF_TOKEN"))]
    assert not leaked, f"runtime-env.yaml carries credentials {leaked}: the Ray dashboard shows them"
    assert {".venv/", ".git/", "*.safetensors"} <= set(env["excludes"]), "a working_dir upload would carry weights"


def test_cluster_launcher_passes_rays_schema_and_names_real_ec2_fields():
    import botocore.session
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "cluster-launcher.aws.yaml").read_text())
    validate_config(raw)  # the schema in the installed ray package: ray/autoscaler/ray-schema.json
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` validates after merging defaults
    validate_config(prepared)
    assert prepared["available_node_types"][raw["head_node_type"]]["max_workers"] == 0

    schema = Path(__import__("ray.autoscaler", fromlist=["_"]).__file__).with_name("ray-schema.json")
    provider_fields = set(json.loads(schema.read_text())["properties"]["provider"]["properties"])
    assert set(raw["provider"]) <= provider_fields, f"unknown provider fields {set(raw['provider']) - provider_fields}"
    assert raw["provider"]["type"] == "aws"

    ec2 = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    for name, node_type in raw["available_node_types"].items():
        bad = set(node_type["node_config"]) - set(ec2.input_shape.members)
        assert not bad, f"{name}.node_config: not EC2 RunInstances parameters: {bad}"
    workers = [t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("p", "g")) for t in workers)
    assert sum(t["max_workers"] for t in workers) <= raw["max_workers"]
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "job submission is code execution: keep it on loopback"


@pytest.mark.parametrize("script", ["local-up.sh", "local-down.sh"])
def test_local_scripts_are_valid_bash_and_default_to_loopback(script):
    path = CLUSTER / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, f"{script}: syntax"
    text = path.read_text()
    assert "ray stop" not in text and "pkill" not in text and "killall" not in text, (
        f"{script}: stop by recorded process group, never by name (other Ray heads share the box)")
    if script == "local-up.sh":
        assert 'DROPE_BIND_HOST:-127.0.0.1' in text and "--dashboard-host=\"$host\"" in text
