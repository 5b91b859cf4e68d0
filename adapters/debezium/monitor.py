"""The connector's health for /readyz and `cdc health`: Kafka Connect's connector and task
states. A FAILED connector or task is an ERROR carrying Connect's error text; a connector
that is not registered, or a Connect that does not answer, is an ERROR too (nothing
captures changes then); RESTARTING / UNASSIGNED / PAUSED are DEGRADED.

Connect's RUNNING is not enough for PostgreSQL sources: Debezium 3 retries a task whose
start fails on a retriable error (a lost connection, and then also a wrong password or an
unreachable database) for ever, and Connect reports RUNNING all along (the error is only in
the worker's log). So the monitor also looks at the connector's replication slot with the
pipeline's own credentials, which are the connector's: a login that fails is an ERROR with
PostgreSQL's message, and a slot no session streams from for longer than
``stall_seconds`` while Connect says RUNNING is an ERROR as well."""

from __future__ import annotations

import time
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
        *,
        stall_seconds: float = 60.0,
        refresh_seconds: float = 5.0,
    ) -> None:
        # /readyz asks every second; Connect and the database are asked at most this often.
        self.refresh_seconds = refresh_seconds
        self._last: tuple[float, ComponentHealth] | None = None
        self.inner = inner
        self.pipeline = pipeline
        self.platform = platform
        self.stall_seconds = stall_seconds
        self._inactive_since: float | None = None
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
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.refresh_seconds:
            return self._last[1]
        reading = await self._read()
        self._last = (time.monotonic(), reading)
        return reading

    async def _read(self) -> ComponentHealth:
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
            if self.pipeline.source.source_type == "postgres":
                return await self._check_streaming(detail)
            return ComponentHealth("connector", Status.OK, detail)
        return ComponentHealth(
            "connector",
            Status.DEGRADED,
            {
                **detail,
                "note": "connector or task not RUNNING yet (starting, rebalancing or paused)",
            },
        )

    async def _check_streaming(self, detail: dict[str, Any]) -> ComponentHealth:
        from psycopg.conninfo import make_conninfo

        from adapters.postgres.source.slot_monitor import check_slot

        s = self.pipeline.source
        conninfo = make_conninfo(
            host=s.host,
            port=s.port,
            dbname=s.database,
            user=s.username,
            password=s.password or None,
        )
        slot_name = self.pipeline.effective_slot_name(self.platform)
        slot = await check_slot(
            conninfo, slot_name, lag_degraded_bytes=2**62, missing=Status.DEGRADED, name="slot"
        )
        detail = {**detail, "slot": slot_name}
        if slot.status is Status.ERROR:
            error = slot.detail.get("error", "")
            return ComponentHealth(
                "connector",
                Status.ERROR,
                {
                    **detail,
                    "error": "Kafka Connect reports RUNNING, but the connector's database"
                    f" login fails: {error} (Debezium keeps retrying; the worker's log has more)",
                },
            )
        if slot.detail.get("active") is False or slot.detail.get("exists") is False:
            now = time.monotonic()
            if self._inactive_since is None:
                self._inactive_since = now
            idle = now - self._inactive_since
            if idle >= self.stall_seconds:
                return ComponentHealth(
                    "connector",
                    Status.ERROR,
                    {
                        **detail,
                        "error": f"Kafka Connect reports RUNNING, but no session has"
                        f" streamed from replication slot {slot_name} for {idle:.0f} s: Debezium"
                        " is retrying a failed start (see the Connect worker's log)",
                    },
                )
            return ComponentHealth(
                "connector", Status.DEGRADED, {**detail, "note": "slot not in use yet"}
            )
        self._inactive_since = None
        return ComponentHealth("connector", Status.OK, detail)


_RANK = {Status.OK: 0, Status.DEGRADED: 1, Status.ERROR: 2}


def build_connector_monitor(
    pipeline: PipelineConfig, platform: PlatformConfig, inner: SourceMonitor | None = None
) -> ConnectorMonitor:
    return ConnectorMonitor(pipeline, platform, inner)
