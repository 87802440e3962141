"""k8s/: the KubeRay manifests are valid for KubeRay's published CRD schema, run the README's job, and
keep cluster.yaml's shape (CPU head, GPU workers from zero, token auth, MLflow on loopback, S3).

The schema check is stricter than plain JSON Schema in one way Kubernetes is too: a field the CRD
does not declare is an error (the API server prunes it, and `kubectl apply` refuses it), so a
misspelled key fails here. The CRDs' CEL rules are not evaluated; the ones in KubeRay v1.7.0 guard
fields these manifests do not set (managedBy, GCS fault tolerance, deletion strategies)."""

import copy
import hashlib
import json
import os
import re
import shlex

import pytest
import yaml
from jsonschema import Draft7Validator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "k8s")
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2.3 MB of YAML


def _docs(name: str) -> dict[str, dict]:
    with open(os.path.join(K8S, name)) as f:
        return {d["kind"]: d for d in yaml.load_all(f, Loader=Loader) if d}


@pytest.fixture(scope="module")
def cluster_docs():
    return _docs("raycluster.yaml")


@pytest.fixture(scope="module")
def raycluster(cluster_docs):
    return cluster_docs["RayCluster"]


@pytest.fixture(scope="module")
def rayjob():
    return _docs("rayjob.yaml")["RayJob"]


def _strict(schema):
    """The schema with undeclared fields refused, as the API server's strict field validation does:
    every object that lists its properties and neither allows more nor preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


def _validator(crd_file: str) -> Draft7Validator:
    with open(os.path.join(K8S, "crds", crd_file)) as f:
        crd = yaml.load(f, Loader=Loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"]
    return Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def validators():
    return {"RayCluster": _validator("ray.io_rayclusters.yaml"), "RayJob": _validator("ray.io_rayjobs.yaml")}


# --- the vendored schema --------------------------------------------------------------------------

def test_vendored_crds_are_the_published_files():
    """The sums in k8s/crds/README.md are those of KubeRay's release files; an edited copy fails."""
    notes = open(os.path.join(K8S, "crds", "README.md")).read()
    sums = dict((name, digest) for digest, name in re.findall(r"\b([0-9a-f]{64})\s+(\S+\.yaml)", notes))
    assert set(sums) == {"ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"}
    for name, digest in sums.items():
        with open(os.path.join(K8S, "crds", name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name


def test_readme_installs_the_operator_version_of_the_vendored_crds():
    version = re.search(r"KubeRay \*\*v(\d+\.\d+\.\d+)\*\*", open(os.path.join(K8S, "crds", "README.md")).read()).group(1)
    assert re.search(rf"helm install kuberay-operator kuberay/kuberay-operator --version {re.escape(version)}\b", README)


# --- schema validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_manifest_is_valid_for_the_kuberay_crd(kind, validators, raycluster, rayjob):
    manifest = {"RayCluster": raycluster, "RayJob": rayjob}[kind]
    assert manifest["apiVersion"] == "ray.io/v1"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[kind].iter_errors(manifest)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("break_it, message", [
    (lambda m: m["spec"].update(enableInTreeAutoScaling=m["spec"].pop("enableInTreeAutoscaling")), "enableInTreeAutoScaling"),
    (lambda m: m["spec"]["workerGroupSpecs"][0].update(minReplicas="0"), "'0' is not of type 'integer'"),
    (lambda m: m["spec"]["authOptions"].update(mode="tokens"), "'tokens' is not one of"),
    (lambda m: m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"), "'name' is a required property"),
    (lambda m: m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
     .update({"nvidia.com/gpu": "one"}), "does not match"),
])
def test_schema_check_can_fail(break_it, message, validators, raycluster):
    broken = copy.deepcopy(raycluster)
    break_it(broken)
    errors = [e.message for e in validators["RayCluster"].iter_errors(broken)]
    assert any(message in e for e in errors), errors


def test_rayjob_schema_check_can_fail(validators, rayjob):
    broken = copy.deepcopy(rayjob)
    broken["spec"]["entryPoint"] = broken["spec"].pop("entrypoint")
    errors = [e.message for e in validators["RayJob"].iter_errors(broken)]
    assert any("'entryPoint' was unexpected" in e for e in errors), errors


# --- the same job as the README's `ray job submit` ------------------------------------------------

def _readme_submit(job: str) -> list[str]:
    lines = [line.strip() for line in README.splitlines() if line.startswith("ray job submit") and f" {job} " in line]
    assert lines, f"no `ray job submit` line for {job} in the README"
    return shlex.split(lines[-1])


def _bucket(text: str) -> str:
    return text.replace("BUCKET", "CHANGE-your-bucket")  # the README's placeholder, the manifests' CHANGE


def test_rayjob_entrypoint_is_the_readmes_submit_line(rayjob):
    words = _readme_submit("jobs/sis_imagenet.py")
    entrypoint = words[words.index("--") + 1:]
    assert shlex.split(rayjob["spec"]["entrypoint"]) == shlex.split(_bucket(shlex.join(entrypoint)))


def test_rayjob_runtime_env_is_the_readmes(rayjob, raycluster):
    """Every README submit line's runtime environment is `--working-dir .` and nothing else; the
    RayJob's is a working_dir only, the zip of this folder the README uploads, the one pods install."""
    runtime_env_flags = {"--working-dir", "--runtime-env", "--runtime-env-json"}
    for line in README.splitlines():
        if line.startswith("ray job submit"):
            words = shlex.split(line)
            options = words[: words.index("--")]
            used = {w.split("=")[0]: options[i + 1] for i, w in enumerate(options) if w.split("=")[0] in runtime_env_flags}
            assert used == {"--working-dir": "."}, line
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) == {"working_dir"}
    upload = re.search(r"aws s3 cp overinterp\.zip (s3://\S+)", README)
    assert upload and runtime_env["working_dir"] == _bucket(upload.group(1))
    for pod_name, pod in _ray_pods(raycluster):
        (ray_container,) = pod["containers"]
        assert _env(ray_container)["OVERINTERP_CODE"]["value"] == runtime_env["working_dir"], pod_name
    assert re.search(r"git archive --format=zip --prefix=overinterp/ -o overinterp\.zip HEAD", README)


def test_rayjob_runs_on_the_raycluster(rayjob, raycluster):
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}
    assert "rayClusterSpec" not in rayjob["spec"]  # a cluster of its own would take MLflow down with it


# --- cluster.yaml's shape -------------------------------------------------------------------------

def _head(raycluster):
    return raycluster["spec"]["headGroupSpec"]


def _ray_pods(raycluster):
    yield "head", _head(raycluster)["template"]["spec"]
    for group in raycluster["spec"]["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def _pod_specs(raycluster, rayjob):
    yield from _ray_pods(raycluster)
    yield "submitter", rayjob["spec"]["submitterPodTemplate"]["spec"]


def _containers(pod):
    return pod["containers"] + pod.get("initContainers", [])


def _env(container) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_head_takes_no_tasks(raycluster):
    assert _head(raycluster)["rayStartParams"]["num-cpus"] == "0"
    for c in _head(raycluster)["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


def test_gpu_worker_groups_scale_from_zero(raycluster):
    assert raycluster["spec"]["enableInTreeAutoscaling"] is True
    groups = raycluster["spec"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1, group["groupName"]
        (ray_container,) = group["template"]["spec"]["containers"]
        gpus = ray_container["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) >= 1 and ray_container["resources"]["requests"]["nvidia.com/gpu"] == gpus


def test_worker_groups_match_cluster_yaml(raycluster):
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        types = yaml.safe_load(f)["available_node_types"]
    aws = {name: (t["resources"]["GPU"], t["max_workers"]) for name, t in types.items() if t["resources"].get("GPU")}
    k8s = {g["groupName"]: (int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]), g["maxReplicas"])
           for g in raycluster["spec"]["workerGroupSpecs"]}
    assert k8s == aws


def test_token_auth_on_every_container(raycluster, rayjob):
    auth = raycluster["spec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    for pod_name, pod in _pod_specs(raycluster, rayjob):
        for c in _containers(pod):
            env = _env(c)
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", (pod_name, c["name"])
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": auth["secretName"], "key": "auth_token"}, (pod_name, c["name"])  # the key KubeRay reads
    assert re.search(rf"kubectl create secret generic {auth['secretName']} --from-file=auth_token=", README)


def test_images_and_ray_version_are_the_tested_ones(raycluster, rayjob):
    pins = dict(line.split("==") for line in open(os.path.join(ROOT, "constraints.txt")) if "==" in line)
    ray_version = pins["ray"].strip()
    assert raycluster["spec"]["rayVersion"] == ray_version
    for pod_name, pod in _pod_specs(raycluster, rayjob):
        for c in _containers(pod):
            gpu = "gpu" if pod_name.startswith("gpu") else "cpu"
            assert c["image"] == f"rayproject/ray:{ray_version}-py311-{gpu}", (pod_name, c["name"])


def _mlflow_server(command: str) -> list[str]:
    words = shlex.split(command.replace("(", " ").replace(")", " "))
    start = words.index("mlflow")
    return words[start: words.index(">", start)]


def test_mlflow_on_the_head_as_cluster_yaml_starts_it(raycluster):
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        (aws,) = [c for c in yaml.safe_load(f)["head_start_ray_commands"] if "mlflow server" in c]
    (head,) = _head(raycluster)["template"]["spec"]["containers"]
    k8s = _mlflow_server(" ".join(head["args"]))
    assert k8s == _mlflow_server(aws)
    assert k8s[k8s.index("--host") + 1] == "127.0.0.1"  # loopback only: kubectl port-forward reaches it
    assert k8s[k8s.index("--artifacts-destination") + 1].startswith("s3://")
    db = k8s[k8s.index("--backend-store-uri") + 1].removeprefix("sqlite:///")
    mounts = [m["mountPath"] for m in head["volumeMounts"]]
    assert any(db.startswith(m + "/") for m in mounts), "the MLflow database is not on the persistent volume"


def test_nothing_exposed_outside_the_cluster(cluster_docs, raycluster):
    text = json.dumps(list(cluster_docs.values()))
    assert "LoadBalancer" not in text and "NodePort" not in text and "ingress" not in text.lower()
    assert "serviceType" not in _head(raycluster)  # the head Service stays ClusterIP
    assert text.count("0.0.0.0") == 1 and _head(raycluster)["rayStartParams"]["dashboard-host"] == "0.0.0.0"


def test_every_ray_pod_reaches_s3_through_the_service_account(cluster_docs, raycluster):
    account = cluster_docs["ServiceAccount"]
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    for pod_name, pod in _ray_pods(raycluster):
        assert pod["serviceAccountName"] == account["metadata"]["name"], pod_name


def test_project_is_installed_on_every_ray_pod(raycluster):
    """As cluster.yaml's setup_commands: the project, with its constraints, into each pod's Python."""
    for pod_name, pod in _ray_pods(raycluster):
        (c,) = pod["containers"]
        setup = " ".join(c["args"])
        assert "pip install -q -c /home/ray/overinterp/constraints.txt -e /home/ray/overinterp" in setup, pod_name
        assert "smart_open[s3]" in setup and "OVERINTERP_CODE" in setup, pod_name
        assert "ray start" not in setup  # the operator appends its own `ray start`; a second would replace it
