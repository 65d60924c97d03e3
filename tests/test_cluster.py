"""cluster/: the `ray up` configs against Ray's own launcher schema and checks, the KubeRay manifests against the
vendored CRD schemas (keys Kubernetes would prune included), the RayJobs' entrypoints through the project's own
command line, the Makefile's pins in every install, and the security rules (token auth, dashboard, secrets)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = {"raycluster.yaml": ("RayCluster", "rayclusters"), "rayjob-run.yaml": ("RayJob", "rayjobs"),
           "rayjob-tune.yaml": ("RayJob", "rayjobs")}
RAY_SCHEMA = Path(importlib.util.find_spec("ray").origin).parent / "autoscaler" / "ray-schema.json"
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.I)
# a literal credential: an AWS key id, a private key, or a secret-named variable given a value that is not $VAR
LITERAL_SECRET = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|"
                            r"(?i:(?:aws_secret_access_key|aws_session_token|ray_auth_token|password)\s*[=:]\s*"
                            r"['\"]?(?!\$)[\w/+=-]{8,})")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / ("kuberay/" + name if name in KUBERAY else name)).read_text())


def makefile_pins() -> dict[str, str]:
    """name → version of every `name==version` the Makefile's set-up installs (ray with its extras as `ray[…]`)."""
    return dict(re.findall(r"([\w-]+(?:\[[\w,]+\])?)==([\w.]+)", (ROOT / "Makefile").read_text()))


def installs(name: str) -> list[str]:
    """The shell commands that install the stack: setup_commands, or the Dockerfile's RUN lines."""
    if name == "Dockerfile":
        text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
        return [c for line in text.splitlines() if line.startswith("RUN ") for c in line[4:].split("&&")]
    return load(name)["setup_commands"]


def unknown_keys(node, schema: dict, path: str = "") -> list[str]:
    """Keys a structural schema would prune: undeclared where it declares `properties` and keeps no unknown fields."""
    if isinstance(node, list):
        return [k for i, item in enumerate(node) for k in unknown_keys(item, schema.get("items", {}), f"{path}[{i}]")]
    if not isinstance(node, dict):
        return []
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    open_ = isinstance(extra, dict) or extra is True or schema.get("x-kubernetes-preserve-unknown-fields")
    found = []
    for key, value in node.items():
        sub = (props or {}).get(key, extra if isinstance(extra, dict) else None)
        if sub is not None:
            found += unknown_keys(value, sub, f"{path}.{key}")
        elif props is not None and not open_:
            found.append(f"{path}.{key}")
    return found


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_specs(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    return [g["template"]["spec"] for g in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]]


def ray_starts(commands: list[str]) -> list[list[str]]:
    """Each `ray start` of the commands, as argv, checked to run after `export RAY_AUTH_MODE=token` in its shell."""
    starts = []
    for command in commands:
        exported = False
        for part in command.split(";"):
            argv = shlex.split(part)
            exported |= argv == ["export", "RAY_AUTH_MODE=token"]
            if argv[:2] == ["ray", "start"]:
                assert exported, f"`{part.strip()}` runs without RAY_AUTH_MODE=token"
                starts.append(argv[2:])
    return starts


# ---------------------------------------------------------------------------------------------- `ray up` configs


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_schema_and_checks(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(name)
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    validate_config(prepare_config(config))  # what `ray up` runs before it calls the cloud: defaults filled in
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head is a CPU node"
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    assert workers and all(0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers)
    gpu = [t["node_config"] for t in workers]
    if config["provider"]["type"] == "gcp":
        assert all(t["resources"].get("GPU", 0) >= 1 for t in workers)
        assert all(c["guestAccelerators"][0]["acceleratorCount"] >= 1 for c in gpu)
        assert all(c["scheduling"][0]["onHostMaintenance"] == "TERMINATE" for c in gpu)
    else:
        assert all(re.match(r"(g5|g6e?|p4de?|p5e?n?)\.", c["InstanceType"]) for c in gpu), "GPU instance types"


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_keeps_token_auth_and_a_local_dashboard(name):
    from ray.scripts.scripts import start

    config = load(name)
    heads, workers = ray_starts(config["head_start_ray_commands"]), ray_starts(config["worker_start_ray_commands"])
    assert len(heads) == 1 and len(workers) == 1
    for argv in heads + workers:
        start.make_context("ray start", list(argv))  # every flag is one `ray start` has
    params = start.make_context("ray start", list(heads[0])).params
    assert params["head"] and params["dashboard_host"] == "127.0.0.1"
    # the token reaches every node from the user's machine, and no credential is written down
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "ssh_private_key" not in config["auth"] and "gcp_credentials" not in config["provider"]
    assert not LITERAL_SECRET.search((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", [*LAUNCHER, "Dockerfile"])
def test_installs_pin_the_makefiles_stack_with_gpu_wheels(name):
    pins, commands = makefile_pins(), installs(name)
    text = " ".join(commands)
    ray_pin = next(k for k in pins if k.startswith("ray["))
    assert f'"{ray_pin}=={pins[ray_pin]}"' in text
    assert set(re.findall(r"\bray(?:\[[\w,]+\])?==([\w.]+)", text)) == {pins[ray_pin]}, "one Ray version"
    assert set(re.findall(r"\btorch==([\w.]+)", text)) == {pins["torch"]}
    # the CUDA fbgemm-gpu of the release the Makefile's CPU build is, never the CPU build itself
    assert f"fbgemm-gpu=={pins['fbgemm-gpu-cpu']}" in text and "fbgemm-gpu-cpu" not in text
    for dep in ("tensordict", "torchmetrics"):
        assert f"{dep}=={pins[dep]}" in text
    (torchrec,) = [c for c in commands if "torchrec==" in c]
    assert f"torchrec=={pins['torchrec']}" in torchrec and "--no-deps" in torchrec
    assert re.search(r"pip install .*-e \S*\[s3\]", commands[-1]), "this package (s3 extra) is installed last"
    if name == "Dockerfile":
        base = re.search(r"ARG BASE_IMAGE=rayproject/ray:(\S+)", (CLUSTER / name).read_text()).group(1)
        assert base.startswith(pins[ray_pin] + "-py") and re.search(r"-(gpu|cu\d+)$", base), base
    else:  # the package installed is the copy file_mounts put on the node
        (repo,) = [remote for remote, local in load(name)["file_mounts"].items() if local == "."]
        assert repo.replace("~", "$HOME") in commands[-1]


# ---------------------------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_matches_the_crd_schema(name):
    doc = load(name)
    kind, crd = KUBERAY[name]
    schema = json.loads((CLUSTER / "schemas" / f"ray.io_{crd}.v1.json").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", kind)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert errors == []
    assert unknown_keys(doc, schema) == []
    if kind == "RayJob":  # an enum of KubeRay's Go types that the CRD leaves out
        assert doc["spec"].get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_keeps_token_auth_secrets_and_the_dashboard_inside(name):
    doc = load(name)
    spec = cluster_spec(doc)
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    assert spec["rayVersion"] == next(v for k, v in makefile_pins().items() if k.startswith("ray["))
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress")
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    if doc["kind"] == "RayCluster":
        assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    else:  # the operator follows a RayJob through the dashboard's ClusterIP Service: KubeRay's in-pod default stays
        assert head["rayStartParams"].get("dashboard-host") in (None, "0.0.0.0")
    containers = [c for pod in pod_specs(doc) for c in pod["containers"]]
    assert len({c["image"] for c in containers}) == 1, "one image for the head and the workers"
    for c in containers:
        for env in c.get("env", []):
            assert not (env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token")
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"], env
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu", 0) for pod in pod_specs(doc)[1:] for c in pod["containers"]]
    assert gpus and min(gpus) >= 1, "a GPU worker group"
    assert not LITERAL_SECRET.search((CLUSTER / "kuberay" / name).read_text())


@pytest.mark.parametrize("name", [n for n in KUBERAY if n.startswith("rayjob")])
def test_rayjob_entrypoint_is_a_valid_project_command(name, monkeypatch):
    from raytrain_ctr.cli import build_parser, experiment
    from raytrain_ctr.methods import get_method
    from raytrain_ctr.tune import _sample_value, load_space

    monkeypatch.chdir(ROOT)
    doc = load(name)
    python, script, *args = shlex.split(doc["spec"]["entrypoint"])
    assert python == "python" and script in ("jobs/run.py", "jobs/tune.py") and (ROOT / script).is_file()
    (command,) = re.findall(r'main\(\["(\w+)", \*sys\.argv\[1:\]\]\)', (ROOT / script).read_text())
    a = build_parser().parse_args([command, *args])  # argparse exits (SystemExit) on a flag the command lacks
    assert (ROOT / a.config).is_file() and a.config.startswith("jobs/configs/")
    cfg = experiment(a)  # the config, its variant and the --set overrides, checked as the job will
    assert cfg.data.startswith("s3://") and cfg.storage.startswith("s3://"), "a cluster reads and writes URIs"
    if command == "run":
        assert a.stage is None and len(get_method(cfg.method, cfg.method_args).stages) >= 2, "a staged method"
    else:
        assert (ROOT / a.space).is_file()
        for key, value in load_space(a.space, cfg.method).items():
            cfg.with_overrides({key: _sample_value(value)})
    # the job's working directory is the image's copy of the repository, and it holds the entrypoint's files
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"] == re.search(r"WORKDIR (\S+)", dockerfile)[1]
    assert re.search(r"COPY .*\bjobs\b", dockerfile)
