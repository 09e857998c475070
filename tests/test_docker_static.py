"""The Dockerfile, compose file and Kubernetes manifests pass the static checks, and each check fails on a
planted violation (so a check that cannot fail would show here)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from service.metrics import Metrics
from service.runtime import MIN_DRIVER
from tests.docker_checks import (
    compose_problems,
    dockerfile_problems,
    hadolint_problems,
    k8s_problems,
    schema_problems,
)

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
K8S = [d for f in sorted((ROOT / "docker" / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
METRICS = {m.name for m in Metrics(8).registry.collect()}
ENTRYPOINT = 'ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/usr/local/bin/maskformer-entrypoint"]'


def test_dockerfile_passes():
    assert dockerfile_problems(DOCKERFILE, ROOT) == []


def test_dockerfile_bundles_the_registrys_default_model():
    registry = json.loads((ROOT / "weights" / "registry.json").read_text())
    default = registry["models"][registry["default"]]["file"]
    assert re.search(rf"^COPY weights/registry.json .*weights/{re.escape(default)} ", DOCKERFILE, re.M)


def test_dockerfile_passes_hadolint():
    assert hadolint_problems(DOCKERFILE) == []


def test_manifests_pass():
    assert {d["kind"] for d in K8S} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    assert k8s_problems(K8S, METRICS) == []
    assert schema_problems(K8S) == []


def test_compose_passes():
    assert compose_problems(COMPOSE) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("FROM nvcr.io/nvidia/tensorrt:25.01-py3 AS runtime", "FROM nvcr.io/nvidia/tensorrt:latest", "pin a tag"),
        ("FROM nvcr.io/nvidia/tensorrt:25.01-py3 AS build", "FROM nvcr.io/nvidia/tensorrt AS build", "pin a tag"),
        ("USER 10001", "USER root", "non-root USER"),
        ("USER 10001", "", "non-root USER"),
        (ENTRYPOINT, "ENTRYPOINT /opt/nvidia/nvidia_entrypoint.sh /usr/local/bin/maskformer-entrypoint",
         "exec form"),
        (ENTRYPOINT, 'ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh"]', "must end with docker/entrypoint's copy"),
        (ENTRYPOINT, 'ENTRYPOINT ["/usr/local/bin/maskformer-entrypoint", "--port", "9000"]', "must end with"),
        (ENTRYPOINT, 'ENTRYPOINT ["/bin/sh", "/usr/local/bin/maskformer-entrypoint"]', "only /opt/nvidia/"),
        ("HEALTHCHECK --interval", "# HEALTHCHECK --interval", "no HEALTHCHECK"),
        ("EXPOSE 8000", "EXPOSE 9000", "EXPOSE 8000"),
        ("ENV PIP_NO_CACHE_DIR=1", "ARG HF_TOKEN\nENV PIP_NO_CACHE_DIR=1", "ARG HF_TOKEN: secrets"),
        ("    MASKFORMER_PORT=8000", "    MASKFORMER_PORT=8000 MASKFORMER_API_KEY=hunter2", "ENV MASKFORMER_API_KEY"),
        ("COPY model model", "COPY modell model", "COPY modell: no such path"),
        ("COPY model model", "COPY tests tests", "COPY tests: excluded by .dockerignore"),
    ],
)  # fmt: skip
def test_dockerfile_check_fails_on_a_planted_violation(old, new, problem):
    assert old in DOCKERFILE
    problems = dockerfile_problems(DOCKERFILE.replace(old, new), ROOT)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("old", "new", "rule"),
    [
        ("FROM nvcr.io/nvidia/tensorrt:25.01-py3 AS runtime", "FROM nvcr.io/nvidia/tensorrt:latest", "DL3007"),
        (ENTRYPOINT, "ENTRYPOINT /opt/nvidia/nvidia_entrypoint.sh /usr/local/bin/maskformer-entrypoint", "DL3025"),
        ("USER 10001", "USER root", "DL3002"),
    ],
)  # fmt: skip
def test_hadolint_fails_on_a_planted_violation(old, new, rule):
    assert any(rule in p for p in hadolint_problems(DOCKERFILE.replace(old, new)))


def test_dockerignore_keeps_model_volumes_pictures_and_docs_out_of_the_context():
    # compose's ./models bind mount is docker/models, inside the build context; checkpoints are gigabytes
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {"docker/models", "models", "overlays", "docs"} <= set(ignored)


def test_dockerfile_check_needs_a_dockerignore(tmp_path):
    for name in ("model", "export", "service", "weights", "docker"):
        (tmp_path / name).symlink_to(ROOT / name)
    for name in ("pyproject.toml", "constraints.txt", "README.md"):
        (tmp_path / name).symlink_to(ROOT / name)
    assert any("no .dockerignore" in p for p in dockerfile_problems(DOCKERFILE, tmp_path))


def _serving(docs):
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "maskformer")
    return dep, dep["spec"]["template"]["spec"]["containers"][0]


def _hpa(docs):
    return next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")


def _service(docs):
    return next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "maskformer")


K8S_VIOLATIONS = {
    "no nvidia.com/gpu limit": lambda docs: _serving(docs)[1]["resources"]["limits"].pop("nvidia.com/gpu"),
    "readinessProbe must GET /readyz": lambda docs: _serving(docs)[1]["readinessProbe"]["httpGet"].update(
        path="/healthz"
    ),
    "livenessProbe must GET /healthz": lambda docs: _serving(docs)[1]["livenessProbe"]["httpGet"].update(
        path="/readyz"
    ),
    "no startupProbe": lambda docs: _serving(docs)[1].pop("startupProbe"),
    "startupProbe allows under 600 s": lambda docs: _serving(docs)[1]["startupProbe"].update(failureThreshold=30),
    "no preStop hook": lambda docs: _serving(docs)[1].pop("lifecycle"),
    "allowPrivilegeEscalation is not false": lambda docs: _serving(docs)[1]["securityContext"].pop(
        "allowPrivilegeEscalation"
    ),
    "capabilities do not drop ALL": lambda docs: _serving(docs)[1]["securityContext"].pop("capabilities"),
    "no RuntimeDefault seccompProfile": lambda docs: _serving(docs)[0]["spec"]["template"]["spec"][
        "securityContext"
    ].pop("seccompProfile"),
    "terminationGracePeriodSeconds 30 <= preStop + drain": lambda docs: _serving(docs)[0]["spec"]["template"][
        "spec"
    ].update(terminationGracePeriodSeconds=30),
    "terminationGracePeriodSeconds 60 <= preStop + drain": lambda docs: _serving(docs)[1]["env"].append(
        {"name": "MASKFORMER_DRAIN_GRACE_S", "value": "30"}  # the grace counts: 5 + 30 + 1 + 30 + 5 > 60
    ),
    "set enableServiceLinks: false": lambda docs: _serving(docs)[0]["spec"]["template"]["spec"].pop(
        "enableServiceLinks"
    ),
    "pin the image tag": lambda docs: _serving(docs)[1].update(image="registry.example.com/maskformer-serving:latest"),
    "the selector does not match": lambda docs: _serving(docs)[0]["spec"]["selector"]["matchLabels"].update(app="x"),
    "its selector matches no Deployment": lambda docs: _service(docs)["spec"].update(selector={"app": "other"}),
    "targetPort metrics is no container port": lambda docs: _service(docs)["spec"]["ports"][0].update(
        targetPort="metrics"
    ),
    "metric maskformer_queue_length is not one": lambda docs: _hpa(docs)["spec"]["metrics"][0]["pods"]["metric"].update(
        name="maskformer_queue_length"
    ),
    "scaleTargetRef maskformer-api is no Deployment": lambda docs: _hpa(docs)["spec"]["scaleTargetRef"].update(
        name="maskformer-api"
    ),
    "custom metrics need autoscaling/v2": lambda docs: _hpa(docs).update(apiVersion="autoscaling/v1"),
    "no metadata.name": lambda docs: _hpa(docs)["metadata"].pop("name"),
    "Deployment maskformer sets spec.replicas, which the HPA owns": lambda docs: _serving(docs)[0]["spec"].update(
        replicas=2
    ),
    "PersistentVolumeClaim maskformer-cache is not defined": lambda docs: _serving(docs)[0]["spec"]["template"]["spec"][
        "volumes"
    ][0]["persistentVolumeClaim"].update(claimName="maskformer-cache"),
}

SCHEMA_VIOLATIONS = {
    "spec.ports.0.port: 'eighty' is not of type 'integer'": lambda docs: _service(docs)["spec"]["ports"][0].update(
        port="eighty"
    ),
    "spec: Additional properties are not allowed ('replica' was unexpected)": lambda docs: _serving(docs)[0][
        "spec"
    ].update(replica=3),
    "spec.template.spec.containers.0.livenessProbe.httpGet: 'port' is a required property": lambda docs: _serving(docs)[
        1
    ]["livenessProbe"]["httpGet"].pop("port"),
}


@pytest.mark.parametrize("problem", SCHEMA_VIOLATIONS)
def test_schema_check_fails_on_a_planted_violation(problem):
    docs = copy.deepcopy(K8S)
    SCHEMA_VIOLATIONS[problem](docs)
    problems = schema_problems(docs)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("problem", K8S_VIOLATIONS)
def test_manifest_check_fails_on_a_planted_violation(problem):
    docs = copy.deepcopy(K8S)
    K8S_VIOLATIONS[problem](docs)
    problems = k8s_problems(docs, METRICS)
    assert any(problem in p for p in problems), problems


COMPOSE_VIOLATIONS = {
    "no GPU reservation": lambda svc: svc.pop("deploy"),
    "no healthcheck": lambda svc: svc.pop("healthcheck"),
    "no volume at /cache": lambda svc: svc.update(volumes=["./models:/models:ro"]),
    "stop_grace_period 10s <= drain": lambda svc: svc.update(stop_grace_period="10s"),
    "stop_grace_period 45s <= drain": lambda svc: svc["environment"].update(MASKFORMER_DRAIN_GRACE_S="30"),
}


@pytest.mark.parametrize("problem", COMPOSE_VIOLATIONS)
def test_compose_check_fails_on_a_planted_violation(problem):
    doc = copy.deepcopy(COMPOSE)
    COMPOSE_VIOLATIONS[problem](doc["services"]["maskformer"])
    problems = compose_problems(doc)
    assert any(problem in p for p in problems), problems


OPS = (ROOT / "README.md").read_text().split("## Operations", 1)[1].split("\n## ", 1)[0]


def test_readme_lists_every_variable_with_the_images_default():
    from service.container import CONTAINER_VARS
    from service.settings import ServeSettings

    rows = dict(re.findall(r"^\| `(MASKFORMER_\w+)` \| (.+?) \|$", OPS, re.M))
    image_env = dict(re.findall(r"(MASKFORMER_\w+)=(\S+)", DOCKERFILE))
    assert set(rows) == {f"MASKFORMER_{n.upper()}" for n in ServeSettings.model_fields} | set(CONTAINER_VARS)
    for name, field in ServeSettings.model_fields.items():
        var, cell = f"MASKFORMER_{name.upper()}", rows[f"MASKFORMER_{name.upper()}"]
        default = image_env.get(var, field.default)
        if default is None:
            assert cell.startswith("unset"), (var, cell)
        else:
            shown = re.match(r"`([^`]+)`", cell)
            assert shown, (var, cell)
            expected = str(default).lower() if isinstance(default, bool) else str(default)
            assert shown[1] == expected or float(shown[1]) == float(expected), (var, cell, default)
    for var in CONTAINER_VARS:
        assert var in image_env and f"`{image_env[var]}`" in rows[var]


def test_readme_explains_every_metric():
    for name in METRICS:
        assert f"`{name}" in OPS, f"README's operations section does not explain {name}"


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch: the image's torch would be a CUDA build")
def test_the_documented_driver_is_what_the_pinned_torchs_cuda_needs():
    """The image installs this venv's torch (constraints.txt), so its CUDA decides the host's driver."""
    need = MIN_DRIVER[int(torch.version.cuda.split(".")[0])]
    assert f"driver >= {need}" in DOCKERFILE
    readme = (ROOT / "README.md").read_text()
    assert f"**NVIDIA driver ≥ {need}**" in readme and f"CUDA {torch.version.cuda} runtime" in readme
    other = rf"driver (≥|>=) (?!{need})\d{{3}}\b"  # no other driver figure left in the image's docs
    assert not re.search(other, DOCKERFILE + readme.split("## Operations")[1])
