"""The connector's health for /readyz and `cdc health`: Kafka Connect's connector and task
states. A FAILED connector or task is an ERROR carrying Connect's error text; a connector
that is not registered, or a Connect that does not answer, is an ERROR too (nothing
captures changes then); RESTARTING / UNASSIGNED / PAUSED are DEGRADED.

Connect's RUNNING is not enough: Debezium 3 retries a task whose start fails on a
retriable error (a lost connection, and then also a wrong password or an unreachable
database) for ever, and Connect reports RUNNING all along (the error is only in the
worker's log). So for the sources we can test against a real server the monitor also logs
in with the pipeline's own credentials, which are the connector's, and looks for the
connector's stream:

- PostgreSQL: the connector's replication slot must have an active session;
- MySQL / MariaDB: the connector's user must have a binlog dump session
  (adapters/debezium/binlog_sessions.py, ``information_schema.PROCESSLIST``).

A login that fails is an ERROR with the server's message; no stream for longer than
``stall_seconds`` while Connect says RUNNING is an ERROR as well (DEGRADED before that). Its
default is 60 s for PostgreSQL and 120 s for MySQL: Debezium's binlog client notices a lost
connection and reconnects only at its keepalive check, once a minute
(``connect.keep.alive.interval.ms``), so a session can be missing for a minute after a
server restart that heals on its own.

MongoDB and SQL Server sources get Connect's states only: there is no server of either
here to test a login or stream check against."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
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
        stall_seconds: float | None = None,
        refresh_seconds: float = 5.0,
    ) -> None:
        # /readyz asks every second; Connect and the database are asked at most this often.
        self.refresh_seconds = refresh_seconds
        self._last: tuple[float, ComponentHealth] | None = None
        self.inner = inner
        self.pipeline = pipeline
        self.platform = platform
        self.stall_seconds = (
            _STALL_SECONDS.get(pipeline.source.source_type, 60.0)
            if stall_seconds is None
            else stall_seconds
        )
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
            source_type = self.pipeline.source.source_type
            if source_type == "postgres":
                return await self._check_slot(detail)
            if source_type == "mysql":
                return await self._check_binlog_session(detail)
            return ComponentHealth("connector", Status.OK, detail)
        return ComponentHealth(
            "connector",
            Status.DEGRADED,
            {
                **detail,
                "note": "connector or task not RUNNING yet (starting, rebalancing or paused)",
            },
        )

    async def _check_slot(self, detail: dict[str, Any]) -> ComponentHealth:
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
            return _login_failed(detail, slot.detail.get("error", ""))
        streaming = slot.detail.get("active") is True and slot.detail.get("exists") is True
        return self._judge_stream(
            detail,
            streaming,
            stalled=f"no session has streamed from replication slot {slot_name}",
            waiting="slot not in use yet",
        )

    async def _check_binlog_session(self, detail: dict[str, Any]) -> ComponentHealth:
        from adapters.debezium.binlog_sessions import LoginFailed, read_binlog_sessions

        s = self.pipeline.source
        try:
            sessions = await asyncio.to_thread(
                read_binlog_sessions, s.host, s.port, s.username, s.password, timeout=5.0
            )
        except LoginFailed as exc:
            return _login_failed(detail, str(exc))
        detail = {**detail, "binlog_sessions": [asdict(x) for x in sessions]}
        return self._judge_stream(
            detail,
            bool(sessions),
            stalled=f"user {s.username} has had no binlog dump session",
            waiting="no binlog dump session yet",
        )

    def _judge_stream(
        self, detail: dict[str, Any], streaming: bool, *, stalled: str, waiting: str
    ) -> ComponentHealth:
        """OK while the connector streams; DEGRADED while it has not for less than
        stall_seconds (starting, reconnecting); ERROR after that."""
        if streaming:
            self._inactive_since = None
            return ComponentHealth("connector", Status.OK, detail)
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
                    "error": f"Kafka Connect reports RUNNING, but {stalled} for {idle:.0f} s:"
                    " Debezium is retrying a failed start (see the Connect worker's log)",
                },
            )
        return ComponentHealth("connector", Status.DEGRADED, {**detail, "note": waiting})


def _login_failed(detail: dict[str, Any], error: str) -> ComponentHealth:
    return ComponentHealth(
        "connector",
        Status.ERROR,
        {
            **detail,
            "error": "Kafka Connect reports RUNNING, but the connector's database"
            f" login fails: {error} (Debezium keeps retrying; the worker's log has more)",
        },
    )


_RANK = {Status.OK: 0, Status.DEGRADED: 1, Status.ERROR: 2}
_STALL_SECONDS = {"postgres": 60.0, "mysql": 120.0}


def build_connector_monitor(
    pipeline: PipelineConfig, platform: PlatformConfig, inner: SourceMonitor | None = None
) -> ConnectorMonitor:
    return ConnectorMonitor(pipeline, platform, inner)
