"""The connector monitor (adapters/debezium/monitor.py) of a MySQL-family source, against
the throwaway MariaDB server that reports MySQL 5.7 (tests/support/mariadb.py) and the real
Kafka Connect + Debezium MySQL connector: OK while the connector's user has a binlog dump
session; Connect keeps saying RUNNING while Debezium retries, so a missing session (the
REPLICATION SLAVE grant revoked) becomes an ERROR after ``stall_seconds``, and a login
the server refuses (the password changed) is an ERROR with the server's message, in the
ingest's /readyz."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from adapters.debezium.monitor import ConnectorMonitor
from adapters.kafka.provisioner import KafkaProvisioner
from domain.health import ComponentHealth, Status
from domain.routing import Router
from services.health_http import HealthState, serve_health
from services.ingest.service import IngestService
from services.net import find_free_port
from services.ops import undeploy
from tests.support.fakes import FakeEventSource
from tests.support.mariadb import (  # noqa: F401 (fixture)
    MariaDb,
    kafka_pipeline_configs,
    mariadb_server,
)

pytestmark = pytest.mark.integration

STALL_SECONDS = 5.0


def readyz(monitor: ConnectorMonitor) -> tuple[int, dict[str, Any]]:
    """The ingest's /readyz with this monitor (the event source is the in-memory stand-in:
    this is the monitor -> IngestService.health -> /readyz path)."""
    service = IngestService("p", FakeEventSource(), Router([]), {}, 100, monitor=monitor)
    state = HealthState()
    state.update(asyncio.run(service.health()))
    port = find_free_port()
    server = serve_health(state, port, "127.0.0.1", registry=CollectorRegistry())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as answer:
        return answer.code, json.loads(answer.read())
    finally:
        server.shutdown()
        server.server_close()


def wait_for_status(
    monitor: ConnectorMonitor, wanted: Status, seconds: float
) -> tuple[ComponentHealth, list[Status]]:
    """Polls until the connector's health is `wanted`; that reading and every status seen."""
    seen: list[Status] = []
    deadline = time.monotonic() + seconds
    while True:
        health = asyncio.run(monitor.connector_health())
        seen.append(health.status)
        if health.status is wanted:
            return health, seen
        assert time.monotonic() < deadline, (wanted, health)
        time.sleep(0.5)


def kill_sessions_of(db: MariaDb, user: str) -> None:
    ids = db.sql(f"SELECT ID FROM information_schema.PROCESSLIST WHERE USER = '{user}'").split()
    if ids:
        db.sql(" ".join(f"KILL {i};" for i in ids))


@pytest.mark.slow
def test_mysql_connector_health_follows_the_binlog_session_and_the_login(
    mariadb_server: MariaDb,  # noqa: F811
    tansu_broker: Any,
    schema_registry: Any,
    kafka_connect: Any,
) -> None:
    db = mariadb_server
    db.sql("CREATE DATABASE shop; CREATE TABLE shop.orders (id int PRIMARY KEY, qty int);")
    pipeline, platform = kafka_pipeline_configs(
        db, tansu_broker, schema_registry, kafka_connect, name="mmon", prefix="mm", server_id=184055
    )
    provisioner = KafkaProvisioner(pipeline, platform, running_timeout_seconds=90)
    asyncio.run(provisioner.provision())
    monitor = ConnectorMonitor(pipeline, platform, stall_seconds=STALL_SECONDS, refresh_seconds=0)
    try:
        # Healthy: the connector streams the binlog on a session of its user.
        health, _ = wait_for_status(monitor, Status.OK, 60)
        (session,) = health.detail["binlog_sessions"]
        assert session["command"] == "Binlog Dump", session
        code, body = readyz(monitor)
        assert code == 200 and body["components"]["connector"]["status"] == "ok", body

        # No binlog session (the grant revoked, the session gone): Debezium retries, Connect
        # says RUNNING; DEGRADED at first, an ERROR after stall_seconds.
        db.sql(f"REVOKE REPLICATION SLAVE ON *.* FROM '{db.user}'@'%'")
        kill_sessions_of(db, db.user)
        started = time.monotonic()
        health, seen = wait_for_status(monitor, Status.ERROR, 60)
        assert time.monotonic() - started >= STALL_SECONDS
        assert Status.DEGRADED in seen, seen
        assert health.detail["state"] == "RUNNING", health.detail
        assert health.detail["binlog_sessions"] == []
        assert f"user {db.user} has had no binlog dump session" in health.detail["error"]

        # The password changed: the login fails, and /readyz says so in the server's words.
        db.sql(f"ALTER USER '{db.user}'@'%' IDENTIFIED BY 'changed-pw'")
        health = asyncio.run(monitor.connector_health())
        assert health.status is Status.ERROR and health.detail["state"] == "RUNNING", health
        code, body = readyz(monitor)
        assert code == 503 and body["ready"] is False, body
        error = body["components"]["connector"]["error"]
        assert f"Access denied for user '{db.user}'" in error, error
        assert "(MySQL error 1045)" in error and "Kafka Connect reports RUNNING" in error, error
    finally:
        db.sql(
            f"ALTER USER '{db.user}'@'%' IDENTIFIED BY '{db.password}';"
            f" GRANT REPLICATION SLAVE ON *.* TO '{db.user}'@'%';"
        )
        asyncio.run(undeploy(pipeline, platform))
