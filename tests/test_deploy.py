"""The deploy files: the Render blueprint and the Kubernetes manifests agree with the image and the
service config (port, health paths, the memory budget as the hard limit), and the manifests pass the
Kubernetes schemas (strict: no unknown field)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from serve.config import load_service_config
from tests.helpers import REPO

K8S = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
BUDGET_MB = load_service_config(REPO / "configs" / "service.yaml")[0].budget_mb


def image_port() -> str:
    """The port the image's runtime stage listens on (its PORT default, which it EXPOSEs)."""
    dockerfile = (REPO / "Dockerfile").read_text()
    port = re.search(r"\bPORT=(\d+)", dockerfile)
    assert port and f"EXPOSE {port.group(1)}" in dockerfile
    return port.group(1)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resource(kind: str) -> dict[str, Any]:
    return next(doc for path in K8S for doc in documents(path) if doc["kind"] == kind)


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_manifests_pass_the_kubernetes_schemas(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_deployment_enforces_the_budget_and_probes_the_service() -> None:
    deployment = resource("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["memory"] == f"{BUDGET_MB:.0f}Mi"
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["MEMORY_BUDGET_MB"] == f"{BUDGET_MB:.0f}" and env["PORT"] == image_port()
    assert container["ports"][0]["containerPort"] == int(image_port())
    assert container["readinessProbe"]["httpGet"]["path"] == "/api/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/api/health"
    hpa = resource("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    selector = resource("Service")["spec"]["selector"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_the_render_blueprint_runs_the_image_within_the_budget() -> None:
    (service,) = yaml.safe_load((REPO / "render.yaml").read_text())["services"]
    assert service["type"] == "web" and service["runtime"] == "docker"
    assert (REPO / service["dockerfilePath"]).is_file()
    assert service["healthCheckPath"] == "/api/ready"
    env = {item["key"]: item.get("value") for item in service["envVars"]}
    assert env["PORT"] == image_port() and env["MEMORY_BUDGET_MB"] == f"{BUDGET_MB:.0f}"
    assert env["WORKERS"] == "auto"  # the most the measured fit holds (tests/test_serve.py::test_workers_auto_*)


def test_the_image_builds_torch_from_the_cpu_wheel_index() -> None:
    build_stage = (REPO / "Dockerfile").read_text().split("FROM python:3.11-slim AS runtime")[0]
    assert 'ARG PIP_EXTRA_INDEX_URL="https://download.pytorch.org/whl/cpu"' in build_stage
