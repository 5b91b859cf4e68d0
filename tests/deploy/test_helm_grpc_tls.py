"""The chart's gRPC TLS between ingest and sinks: the Secret mounted in every pod of a
pipeline, platform.yaml pointing at it (and loading as a valid PlatformConfig), HTTP probes
for sinks whose gRPC port speaks TLS; and every stage listening on all interfaces."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.config import loads_platform

from .support import (
    CI_DIR,
    Rendered,
    containers,
    env_of,
    load_values,
    pod_spec,
    render,
    stubbed_chart,
    validate_manifests,
)

SECRET = "cdc-grpc-tls"


@pytest.fixture(scope="module")
def chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stubbed_chart(tmp_path_factory.mktemp("chart"))


def with_tls(base: str, tls: dict[str, Any], per_pipeline: dict[str, Any] | None = None) -> Any:
    values = copy.deepcopy(load_values(CI_DIR / base))
    values["pipeline"]["grpcTls"] = tls
    for name, override in (per_pipeline or {}).items():
        values["pipeline"]["pipelines"][name]["grpcTls"] = override
    return values


def workloads(rendered: Rendered, pipeline: str) -> list[Any]:
    return [
        d
        for d in rendered.of_kind("Deployment")
        if d.labels.get("cdc.baselyne.io/pipeline", pipeline) == pipeline
        and ("-ingest" in d.name or "-sink-" in d.name)
        and f"-{pipeline}-" in d.name
    ]


def platform_yaml(rendered: Rendered, pipeline: str) -> dict[str, Any]:
    config = next(c for c in rendered.of_kind("ConfigMap") if c.name.endswith(f"{pipeline}-config"))
    text = config.obj["data"]["platform.yaml"]
    loads_platform(text)  # the processes will accept it
    return dict(yaml.safe_load(text))


def test_tls_secret_is_mounted_and_configured_in_every_stage(chart: Path) -> None:
    values = with_tls(
        "direct-values.yaml",
        {"enabled": True, "secretName": SECRET, "requireClientCert": True},
    )
    rendered = render(chart, values)
    assert validate_manifests(rendered.manifests) == []
    for name in values["pipeline"]["pipelines"]:
        tls = platform_yaml(rendered, name)["grpc_tls"]
        assert tls == {
            "enabled": True,
            "cert_file": "/etc/cdc/tls/tls.crt",
            "key_file": "/etc/cdc/tls/tls.key",
            "ca_file": "/etc/cdc/tls/ca.crt",
            "require_client_cert": True,
        }
        stages = workloads(rendered, name)
        assert any("-ingest" in d.name for d in stages) and any("-sink-" in d.name for d in stages)
        for deployment in stages:
            volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
            assert volumes["grpc-tls"]["secret"]["secretName"] == SECRET, deployment.name
            (container,) = containers(deployment)
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            assert mounts["grpc-tls"] == {
                "name": "grpc-tls",
                "mountPath": "/etc/cdc/tls",
                "readOnly": True,
            }
            assert env_of(container)["CDC_LISTEN_HOST"]["value"] == "0.0.0.0"
            if "-sink-" in deployment.name:
                # kubelet's gRPC probes cannot do TLS
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    assert "grpc" not in container[probe], (deployment.name, probe)
                    assert container[probe]["httpGet"]["port"] == "http"
                assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_without_tls_nothing_is_mounted_and_sinks_keep_grpc_probes(chart: Path) -> None:
    values = load_values(CI_DIR / "direct-values.yaml")
    rendered = render(chart, values)
    for name in values["pipeline"]["pipelines"]:
        assert "grpc_tls" not in platform_yaml(rendered, name)
        for deployment in workloads(rendered, name):
            assert "grpc-tls" not in {v["name"] for v in pod_spec(deployment)["volumes"]}
            (container,) = containers(deployment)
            assert env_of(container)["CDC_LISTEN_HOST"]["value"] == "0.0.0.0"
            if "-sink-" in deployment.name:
                assert "grpc" in container["readinessProbe"]


def test_a_pipeline_overrides_the_tls_defaults(chart: Path) -> None:
    base = load_values(CI_DIR / "multi-pipeline-values.yaml")
    first, second = list(base["pipeline"]["pipelines"])[:2]
    values = with_tls(
        "multi-pipeline-values.yaml",
        {"enabled": True, "secretName": SECRET},
        {second: {"secretName": "other-tls", "serverName": "sink.cdc.internal"}},
    )
    rendered = render(chart, values)
    assert validate_manifests(rendered.manifests) == []
    assert "server_name" not in platform_yaml(rendered, first)["grpc_tls"]
    assert platform_yaml(rendered, second)["grpc_tls"]["server_name"] == "sink.cdc.internal"
    assert platform_yaml(rendered, second)["grpc_tls"]["require_client_cert"] is False
    secrets = {
        deployment.name: {v["name"]: v for v in pod_spec(deployment)["volumes"]}["grpc-tls"][
            "secret"
        ]["secretName"]
        for deployment in workloads(rendered, second)
    }
    assert secrets and set(secrets.values()) == {"other-tls"}, secrets
