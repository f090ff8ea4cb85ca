"""deploy/k8s/: the manifests parse, and their probes, ports, commands and Serve application match the
server's real routes, CLI and settings (no cluster needed)."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from glm4serve import cli
from glm4serve.api.settings import ServerSettings
from tests.api_fakes import make_app, shutdown_engines  # noqa: F401 - shutdown_engines is autouse

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
REPO = K8S.parents[1]


def manifest(name: str) -> dict:
    (doc,) = list(yaml.safe_load_all((K8S / name).read_text()))
    return doc


def routes() -> set[str]:
    """Every path the app serves, as its OpenAPI schema lists them (its routers' included)."""
    return set(make_app().openapi()["paths"])


def test_every_manifest_parses():
    assert {p.name for p in K8S.glob("*.yaml")} == {"deployment.yaml", "service.yaml", "rayservice.yaml",
                                                     "prometheus-scrape.yaml"}
    for p in K8S.glob("*.yaml"):
        assert list(yaml.safe_load_all(p.read_text())), p.name


def test_the_deployment_runs_the_real_cli_and_probes_real_routes():
    dep = manifest("deployment.yaml")
    assert dep["kind"] == "Deployment"
    pod = dep["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    parsed = cli.build_parser().parse_args(["serve", *args])  # the image's ENTRYPOINT is `glm4serve serve`
    settings = cli.settings_from_args(parsed)
    assert (REPO / parsed.config).is_file()
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert settings.port == port and settings.host == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/ping"
    assert {"/health", "/ping", "/metrics"} <= routes()
    for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", port)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(settings.model.startswith(m + "/") for m in mounts)  # the model lies on the volume
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and int(annotations["prometheus.io/port"]) == port
    assert pod["spec"]["terminationGracePeriodSeconds"] > settings.graceful_shutdown_seconds


def test_the_service_selects_the_deployment_on_its_port():
    dep, svc = manifest("deployment.yaml"), manifest("service.yaml")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == 8000


def test_the_rayservice_imports_the_real_application_builder_with_valid_settings():
    ray_service = manifest("rayservice.yaml")
    assert ray_service["kind"] == "RayService"
    (application,) = yaml.safe_load(ray_service["spec"]["serveConfigV2"])["applications"]
    module, _, attr = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder) and application["route_prefix"] == "/"
    settings = ServerSettings(**application["args"])  # what the builder does with them first
    assert settings.num_replicas > 1 and settings.device == "cuda"
    gpus = sum(g["replicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
               for g in ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"])
    assert gpus >= settings.num_replicas  # one GPU per engine replica
    head = ray_service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 8000 in {p["containerPort"] for p in head["ports"]}  # Serve's HTTP proxy


def test_the_scrape_job_keeps_annotated_pods_on_their_port_and_path():
    (job,) = manifest("prometheus-scrape.yaml")["scrape_configs"]
    relabel = {tuple(r["source_labels"]): r for r in job["relabel_configs"]}
    assert relabel[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["action"] == "keep"
    assert relabel[("__meta_kubernetes_pod_annotation_prometheus_io_path",)]["target_label"] == "__metrics_path__"
