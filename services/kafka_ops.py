"""The kafka transport's part of `cdc health`, `cdc run` / `cdc deploy` and `cdc undeploy`.

`cdc health` asks the broker, the Schema Registry, Kafka Connect, the pipeline's connector
and its source database; services/ops.py adds the sinks. `cdc undeploy` deletes the
connector here, waits until its replication slot is no longer in use, and services/ops.py
then drops the slot and the publication as for the direct transport.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import urllib.error
import urllib.request
from typing import Any

from adapters.config import PipelineConfig, PlatformConfig
from domain.health import ComponentHealth, Status
from services import registry


class ProvisioningFailed(Exception):
    """The transport's provisioner stopped; the message is its reason."""


async def provision(pipeline: PipelineConfig, platform: PlatformConfig) -> list[str]:
    """Run the kafka transport's Provisioner (topics, connector); what it did."""
    # Only kafka provisions ahead: the WAL transports' readers create their slot themselves,
    # with the exported snapshot their initial copy needs.
    factory = registry.TRANSPORTS[platform.transport_mode].provisioner
    if factory is None or platform.transport_mode != "kafka":
        return []
    from adapters.debezium.connect_client import ConnectError
    from adapters.kafka.provisioner import KafkaProvisioner, ProvisionError
    from adapters.kafka.security import KafkaSecurityError

    provisioner = factory(pipeline, platform)
    try:
        await provisioner.provision()
    except (ProvisionError, ConnectError, KafkaSecurityError) as exc:
        raise ProvisioningFailed(str(exc)) from exc
    if isinstance(provisioner, KafkaProvisioner):
        created = ", ".join(provisioner.created_topics) or "none"
        return [
            f"topics created: {created} (existing ones left as they were)",
            f"connector {provisioner.name} RUNNING",
        ]
    return ["provisioned"]


# ------------------------------------------------------------------------------- health


async def platform_health(platform: PlatformConfig) -> list[ComponentHealth]:
    """Broker, Schema Registry and Kafka Connect, each asked once."""
    if platform.transport_mode != "kafka":
        return []
    return list(
        await asyncio.gather(
            asyncio.to_thread(_broker_health, platform),
            asyncio.to_thread(_registry_health, platform),
            _connect_health(platform),
        )
    )


async def pipeline_components(
    pipeline: PipelineConfig, platform: PlatformConfig
) -> list[ComponentHealth]:
    """The connector (Connect's states and error text) and the source database."""
    from adapters.debezium.monitor import ConnectorMonitor

    connector = await ConnectorMonitor(pipeline, platform).health()
    return [connector, await _source_health(pipeline, platform)]


def _broker_health(platform: PlatformConfig) -> ComponentHealth:
    from adapters.kafka.admin import TopicAdmin, TopicAdminError
    from adapters.kafka.security import KafkaSecurityError

    detail: dict[str, Any] = {"bootstrap_servers": platform.kafka.bootstrap_servers}
    try:
        brokers = TopicAdmin(platform.kafka, timeout=5.0).broker_count()
    except (TopicAdminError, KafkaSecurityError) as exc:
        return ComponentHealth("broker", Status.ERROR, {**detail, "error": str(exc)})
    return ComponentHealth("broker", Status.OK, {**detail, "brokers": brokers})


def _registry_health(platform: PlatformConfig) -> ComponentHealth:
    from adapters.kafka.security import registry_auth

    url = platform.kafka.schema_registry_url.rstrip("/")
    request = urllib.request.Request(url + "/subjects", headers={"Accept": "application/json"})
    auth = registry_auth(platform.kafka)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    detail: dict[str, Any] = {"url": url}
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        error = f"HTTP {exc.code} from {url}/subjects"
        return ComponentHealth("schema_registry", Status.ERROR, {**detail, "error": error})
    except (OSError, urllib.error.URLError) as exc:
        error = f"not reachable: {getattr(exc, 'reason', exc)}"
        return ComponentHealth("schema_registry", Status.ERROR, {**detail, "error": error})
    return ComponentHealth("schema_registry", Status.OK, detail)


async def _connect_health(platform: PlatformConfig) -> ComponentHealth:
    from adapters.debezium.connect_client import ConnectClient, ConnectError

    config = platform.connector.model_copy(update={"retry_max_attempts": 1})
    detail: dict[str, Any] = {"url": platform.connector.connect_url}
    try:
        info = await ConnectClient(config).server_info()
    except ConnectError as exc:
        return ComponentHealth("kafka_connect", Status.ERROR, {**detail, "error": str(exc)})
    return ComponentHealth("kafka_connect", Status.OK, {**detail, "version": info.get("version")})


async def _source_health(pipeline: PipelineConfig, platform: PlatformConfig) -> ComponentHealth:
    s = pipeline.source
    detail: dict[str, Any] = {"source_type": s.source_type, "host": s.host, "port": s.port}
    if s.source_type == "postgres":
        from services.ops import slot_health

        # The Debezium connector's slot: same query and threshold as the direct transport.
        slot = await slot_health(pipeline, platform)
        return ComponentHealth("source", slot.status, {**detail, **slot.detail})
    # No client library for the other databases here: whether they accept connections.
    try:
        await asyncio.to_thread(socket.create_connection, (s.host, s.port), 5)
    except OSError as exc:
        error = f"database unreachable: {exc.strerror or exc}"
        return ComponentHealth("source", Status.ERROR, {**detail, "error": error})
    return ComponentHealth("source", Status.OK, {**detail, "checked": "TCP connect"})


# ------------------------------------------------------------------------------ output


def health_table(report: dict[str, Any]) -> str:
    """`cdc health` for people: one line per component, its status and what it says."""
    rows = [("COMPONENT", "STATUS", "DETAIL")]
    for name, body in report["components"].items():
        detail = {k: v for k, v in body.items() if k not in ("status", "trace")}
        error = detail.pop("error", None)
        text = f"error: {error}" if error else ", ".join(f"{k}={v}" for k, v in detail.items())
        rows.append((name, str(body["status"]).upper(), text))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]}" for r in rows]
    overall = str(report["status"]).upper()
    lines.append(f"overall: {overall} (transport_mode {report['transport_mode']})")
    return "\n".join(lines)
