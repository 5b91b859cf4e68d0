"""The connector's health for /readyz and `cdc health`: Kafka Connect's connector and task
states. A FAILED connector or task is an ERROR carrying Connect's error text; a connector
that is not registered, or a Connect that does not answer, is an ERROR too (nothing
captures changes then); RESTARTING / UNASSIGNED / PAUSED are DEGRADED."""

from __future__ import annotations

from typing import Any

from adapters.config import PipelineConfig, PlatformConfig
from adapters.debezium.connect_client import ConnectClient, ConnectError
from adapters.debezium.connectors import connector_name
from domain.health import ComponentHealth, Status
from domain.ports import SourceMonitor


class ConnectorMonitor:
    """A SourceMonitor (domain/ports.py) of the pipeline's Debezium connector, optionally
    around another monitor of the transport (consumer lag, schema versions): start, stop
    and lag are the inner one's; health is the worse of the two, the connector's reading
    attached to the inner one's detail."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        platform: PlatformConfig,
        inner: SourceMonitor | None = None,
    ) -> None:
        self.inner = inner
        self.name = connector_name(pipeline)
        self.connect_url = platform.connector.connect_url
        # Health checks must answer quickly: one attempt, a short timeout.
        config = platform.connector.model_copy(
            update={
                "retry_max_attempts": 1,
                "timeout_seconds": min(5.0, platform.connector.timeout_seconds),
            }
        )
        self.client = ConnectClient(config)

    async def start(self) -> None:
        if self.inner is not None:
            await self.inner.start()

    async def stop(self) -> None:
        if self.inner is not None:
            await self.inner.stop()

    async def lag(self) -> dict[str, Any]:
        return {} if self.inner is None else await self.inner.lag()

    async def health(self) -> ComponentHealth:
        connector = await self.connector_health()
        if self.inner is None:
            return connector
        other = await self.inner.health()
        if _RANK[connector.status] > _RANK[other.status]:
            return connector
        return ComponentHealth(
            other.name, other.status, {**other.detail, "connector": connector.as_dict()}
        )

    async def connector_health(self) -> ComponentHealth:
        detail: dict[str, Any] = {"connector": self.name, "connect_url": self.connect_url}
        try:
            status = await self.client.status(self.name)
        except ConnectError as exc:
            return ComponentHealth("connector", Status.ERROR, {**detail, "error": str(exc)})
        if status is None:
            return ComponentHealth(
                "connector",
                Status.ERROR,
                {
                    **detail,
                    "error": f"connector {self.name} is not registered on Kafka Connect"
                    " (cdc run / cdc deploy registers it)",
                },
            )
        detail["state"] = status.state
        detail["tasks"] = {str(t.id): t.state for t in status.tasks}
        if status.failed:
            return ComponentHealth(
                "connector",
                Status.ERROR,
                {**detail, "error": status.summary(), "trace": status.error()},
            )
        if status.running:
            return ComponentHealth("connector", Status.OK, detail)
        return ComponentHealth(
            "connector",
            Status.DEGRADED,
            {
                **detail,
                "note": "connector or task not RUNNING yet (starting, rebalancing or paused)",
            },
        )


_RANK = {Status.OK: 0, Status.DEGRADED: 1, Status.ERROR: 2}


def build_connector_monitor(
    pipeline: PipelineConfig, platform: PlatformConfig, inner: SourceMonitor | None = None
) -> ConnectorMonitor:
    return ConnectorMonitor(pipeline, platform, inner)
