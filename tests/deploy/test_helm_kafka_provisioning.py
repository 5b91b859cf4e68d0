"""The chart provisions a kafka pipeline before its ingest starts: an init container runs
`cdc deploy` (topics + Debezium connector, docs/kafka.md) with the ingest's image, config,
secrets and environment; other transports get no init container."""

from __future__ import annotations

from pathlib import Path

import pytest

from .support import CI_DIR, containers, load_values, pod_spec, render, stubbed_chart


@pytest.fixture(scope="module")
def chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stubbed_chart(tmp_path_factory.mktemp("chart"))


@pytest.mark.parametrize(
    "values_file", ["kafka-bundled-values.yaml", "kafka-external-sasl-values.yaml"]
)
def test_kafka_ingest_runs_cdc_deploy_first(chart: Path, values_file: str) -> None:
    out = render(chart, load_values(CI_DIR / values_file))
    ingests = [m for m in out.of_kind("Deployment") if m.name.endswith("-ingest")]
    assert ingests
    for deployment in ingests:
        spec = pod_spec(deployment)
        (init,) = spec["initContainers"]
        (ingest,) = containers(deployment)
        assert init["name"] == "provision"
        assert init["args"] == [
            "deploy",
            "/config/pipeline.yaml",
            "--platform-config",
            "/config/platform.yaml",
        ]
        assert init["image"] == ingest["image"]
        assert init["volumeMounts"] == ingest["volumeMounts"]
        assert init.get("envFrom") == ingest.get("envFrom")
        # The SASL credentials the platform.yaml refers to reach the provisioner too.
        ingest_env = {e["name"] for e in ingest["env"]}
        init_env = {e["name"] for e in init["env"]}
        assert {n for n in ingest_env if n.startswith("CDC_KAFKA_")} <= init_env


@pytest.mark.parametrize("values_file", ["direct-values.yaml", "pubsub-values.yaml"])
def test_other_transports_have_no_provision_step(chart: Path, values_file: str) -> None:
    out = render(chart, load_values(CI_DIR / values_file))
    for deployment in out.of_kind("Deployment"):
        assert "initContainers" not in pod_spec(deployment), deployment.name


def test_registry_basic_auth_reaches_the_pipelines(chart: Path) -> None:
    import yaml

    values = load_values(CI_DIR / "kafka-external-sasl-values.yaml")
    secret = values["global"]["schemaRegistry"]["basicAuthSecret"]
    out = render(chart, values)
    configs = [m for m in out.of_kind("ConfigMap") if "platform.yaml" in m.obj.get("data", {})]
    assert configs
    for config in configs:
        kafka = yaml.safe_load(config.obj["data"]["platform.yaml"])["kafka"]
        assert kafka["schema_registry_username"] == "${CDC_SCHEMA_REGISTRY_USERNAME}"
        assert kafka["schema_registry_password"] == "${CDC_SCHEMA_REGISTRY_PASSWORD}"
    for deployment in [m for m in out.of_kind("Deployment") if m.name.endswith("-ingest")]:
        (ingest,) = containers(deployment)
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in ingest["env"]
            if e["name"].startswith("CDC_SCHEMA_REGISTRY_")
        }
        assert refs == {
            key: {"name": secret, "key": key}
            for key in ("CDC_SCHEMA_REGISTRY_USERNAME", "CDC_SCHEMA_REGISTRY_PASSWORD")
        }
