"""The Kafka Provisioner against real servers: PostgreSQL, the Tansu broker, our schema
registry and a Kafka Connect worker running the real Debezium PostgreSQL connector.

- topics are created once (a second run creates nothing), a topic that existed keeps its
  partitions and its data, the connector reaches RUNNING and writes Avro snapshot records;
- a wrong database password: provisioning fails with PostgreSQL's own message, deletes
  nothing; a connector that FAILED later is reported by the connector monitor and by
  `cdc health` (exit 1) with Connect's error text;
- `cdc undeploy` removes the connector, its slot and its publication, keeps the topics
  unless --delete-topics.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import SchemaRegistryClient
from prometheus_client import CollectorRegistry

from adapters.config import PipelineConfig, PlatformConfig, loads_pipeline, loads_platform
from adapters.debezium.connect_client import ConnectClient
from adapters.debezium.monitor import ConnectorMonitor
from adapters.kafka.provisioner import KafkaProvisioner, ProvisionError
from domain.health import Status
from domain.routing import Router
from services.cli.main import main as cdc_main
from services.health_http import HealthState, serve_health
from services.ingest.service import IngestService
from services.net import find_free_port
from services.ops import undeploy
from services.stack.postgres import PostgresServer
from tests.support.avro_topic import read_avro_values
from tests.support.fakes import FakeEventSource
from tests.support.postgres import PgTestContext

pytestmark = pytest.mark.integration


def configs(
    tmp_path: Path,
    *,
    host: str,
    port: int,
    database: str,
    tables: list[str],
    bootstrap: str,
    registry: str,
    connect: str,
    username: str = "postgres",
    password: str = "",
) -> tuple[PipelineConfig, PlatformConfig, list[str]]:
    tag = uuid.uuid4().hex[:8]
    platform_doc = {
        "transport_mode": "kafka",
        "kafka": {"bootstrap_servers": bootstrap, "schema_registry_url": registry},
        "connector": {
            "connect_url": connect,
            "retry_max_attempts": 2,
            "retry_wait_seconds": 1,
            "errors_max_retries": 2,
            "errors_retry_wait_seconds": 1,
        },
    }
    pipeline_doc = {
        "pipeline_id": f"prov-{tag}",
        "topic_prefix": f"t{tag}",
        "source": {
            "source_type": "postgres",
            "host": host,
            "port": port,
            "database": database,
            "username": username,
            "password": password,
            "tables": tables,
            "heartbeat_interval_seconds": 1,
        },
    }
    (tmp_path / "platform.yaml").write_text(yaml.safe_dump(platform_doc))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline_doc))
    platform = loads_platform(yaml.safe_dump(platform_doc))
    pipeline = loads_pipeline(yaml.safe_dump(pipeline_doc), platform=platform)
    argv = [str(tmp_path / "pipeline.yaml"), "--platform-config", str(tmp_path / "platform.yaml")]
    return pipeline, platform, argv


def wait_for(check: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def topic_partitions(bootstrap: str, topic: str) -> int:
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    return len(metadata.topics[topic].partitions) if topic in metadata.topics else 0


def pre_existing_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """A topic that was there before the provisioner, with one message in it."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[
        topic
    ].result(15)
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"k", value=b"kept", partition=0)
    assert producer.flush(15) == 0


def message_count(bootstrap: str, topic: str, partition: int = 0) -> int:
    """Messages readable in one partition, by reading them (Tansu's ListOffsets 'latest'
    is not reliable, docs/kafka.md)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"count-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, partition, 0)])
    seen = 0
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None:
                if seen:
                    break
                continue
            if not message.error():
                seen += 1
    finally:
        consumer.close()
    return seen


def slot_and_publication(dsn: str, slot: str, publication: str) -> tuple[bool, bool]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        has_slot = conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        has_pub = conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)
        ).fetchone()
    return has_slot is not None, has_pub is not None


def test_provision_is_idempotent_keeps_existing_topics_and_produces_avro_snapshot(
    pg: PgTestContext,
    tansu_broker: Any,
    schema_registry: Any,
    kafka_connect: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    database = pg.new_database("prov")
    dsn = pg.dsn(database)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, item text, qty int)")
        conn.execute(
            "INSERT INTO orders SELECT g, 'item ' || g, g * 10 FROM generate_series(1, 5) g"
        )
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    bootstrap = tansu_broker.bootstrap_servers
    pipeline, platform, argv = configs(
        tmp_path,
        host=pg.host,
        port=pg.port,
        database=database,
        tables=["public.orders", "public.notes"],
        bootstrap=bootstrap,
        registry=schema_registry.url,
        connect=kafka_connect.url,
    )
    prefix = pipeline.topic_prefix
    # An operator made the notes topic earlier, with 2 partitions and a message in it.
    pre_existing_topic(bootstrap, f"{prefix}.public.notes", partitions=2)

    provisioner = KafkaProvisioner(pipeline, platform)
    asyncio.run(provisioner.provision())
    assert sorted(provisioner.created_topics) == sorted(
        [f"{prefix}.public.orders", f"{prefix}.public.orders.dlq", f"{prefix}.public.notes.dlq"]
    )
    assert topic_partitions(bootstrap, f"{prefix}.public.orders") == 1
    assert topic_partitions(bootstrap, f"{prefix}.public.notes") == 2  # left as it was

    status = asyncio.run(ConnectClient(platform.connector).status(provisioner.name))
    assert status is not None and status.running, status
    records = read_avro_values(bootstrap, schema_registry.url, f"{prefix}.public.orders", 5)
    assert sorted((r["after"]["id"], r["after"]["item"], r["after"]["qty"]) for r in records) == [
        (i, f"item {i}", i * 10) for i in range(1, 6)
    ]
    assert {r["op"] for r in records} == {"r"}  # snapshot reads
    subjects = SchemaRegistryClient({"url": schema_registry.url}).get_subjects()
    assert f"{prefix}.public.orders-value" in subjects

    # Again (a restart of `cdc run`): nothing created, the connector updated in place.
    again = KafkaProvisioner(pipeline, platform)
    asyncio.run(again.provision())
    assert again.created_topics == []
    assert message_count(bootstrap, f"{prefix}.public.notes") == 1  # the old message is there
    health = asyncio.run(ConnectorMonitor(pipeline, platform).health())
    assert health.status is Status.OK, health

    # `cdc deploy` is the same provisioner from the command line.
    capsys.readouterr()
    assert cdc_main(["deploy", *argv]) == 0
    assert "topics created: none" in capsys.readouterr().out

    # `cdc health --json`: broker, registry, Connect, connector, source all answer.
    capsys.readouterr()  # earlier log lines
    assert cdc_main(["health", *argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {n: c["status"] for n, c in report["components"].items()} == {
        "broker": "ok",
        "schema_registry": "ok",
        "kafka_connect": "ok",
        "connector": "ok",
        "source": "ok",
    }

    # `cdc undeploy`: the connector, its slot and publication go; the topics stay.
    slot = pipeline.effective_slot_name(platform)
    publication = pipeline.effective_publication_name(platform)
    assert slot_and_publication(dsn, slot, publication) == (True, True)
    assert cdc_main(["undeploy", *argv, "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"deleted connector {provisioner.name}" in out
    assert f"dropped replication slot {slot}" in out
    assert asyncio.run(ConnectClient(platform.connector).status(provisioner.name)) is None
    assert slot_and_publication(dsn, slot, publication) == (False, False)
    assert topic_partitions(bootstrap, f"{prefix}.public.orders") == 1
    assert message_count(bootstrap, f"{prefix}.public.notes") == 1

    # With --delete-topics the pipeline's topics go too (the connector is gone already).
    lines = asyncio.run(undeploy(pipeline, platform, delete_topics=True))
    assert f"connector {provisioner.name} did not exist" in lines
    assert f"deleted topic {prefix}.public.orders" in lines
    wait_for(
        lambda: topic_partitions(bootstrap, f"{prefix}.public.orders") == 0,
        30,
        "the topic to be deleted",
    )


@pytest.mark.slow
def test_wrong_password_fails_clearly_and_deletes_nothing(
    fresh_pg_server: PostgresServer,
    tansu_broker: Any,
    schema_registry: Any,
    kafka_connect: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = fresh_pg_server
    role = "cdc_pw"
    with server.connect("postgres", autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN SUPERUSER REPLICATION PASSWORD 'right-pw'")
        conn.execute("CREATE DATABASE shop")
        # Password authentication for this role over TCP (the test server trusts everyone
        # else): written through the server itself, into its own pg_hba.conf.
        hba = conn.execute("SHOW hba_file").fetchone()[0]
        old = conn.execute("SELECT pg_read_file(%s)", (hba,)).fetchone()[0]
        lines = [f"host all {role} 127.0.0.1/32 scram-sha-256", *old.splitlines()]
        conn.execute("CREATE TEMP TABLE hba_lines (n serial, line text)")
        for line in lines:
            # COPY's text format would escape a tab; spaces separate hba fields as well.
            conn.execute("INSERT INTO hba_lines (line) VALUES (%s)", (line.replace("\t", " "),))
        conn.execute(f"COPY (SELECT line FROM hba_lines ORDER BY n) TO '{hba}'")
        conn.execute("SELECT pg_reload_conf()")
    with server.connect("shop", autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, item text)")
        conn.execute("INSERT INTO orders VALUES (1, 'one')")
    bootstrap = tansu_broker.bootstrap_servers

    def with_password(password: str) -> tuple[PipelineConfig, PlatformConfig, list[str]]:
        return configs(
            tmp_path,
            host=server.host,
            port=server.port,
            database="shop",
            tables=["public.orders"],
            bootstrap=bootstrap,
            registry=schema_registry.url,
            connect=kafka_connect.url,
            username=role,
            password=password,
        )

    # 1. Registering with a wrong password: refused with PostgreSQL's own words.
    pipeline, platform, argv = with_password("wrong-pw")
    prefix = pipeline.topic_prefix
    pre_existing_topic(bootstrap, f"{prefix}.public.orders", partitions=1)
    with pytest.raises(ProvisionError) as failure:
        asyncio.run(KafkaProvisioner(pipeline, platform, running_timeout_seconds=60).provision())
    assert "password authentication failed" in str(failure.value), failure.value
    # Nothing deleted: the topic that existed and the one just created are both there.
    assert message_count(bootstrap, f"{prefix}.public.orders") == 1
    assert topic_partitions(bootstrap, f"{prefix}.public.orders.dlq") == 1
    assert cdc_main(["deploy", *argv]) == 1
    assert "password authentication failed" in capsys.readouterr().err

    # 2. A connector that ran, then lost its login. Debezium 3 retries a task whose start
    # fails for ever and Connect keeps saying RUNNING; the monitor logs in with the same
    # credentials and reports PostgreSQL's message (what /readyz shows), as does
    # `cdc health`.
    pipeline, platform, argv = with_password("right-pw")
    provisioner = KafkaProvisioner(pipeline, platform)
    asyncio.run(provisioner.provision())
    with server.connect("postgres", autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {role} PASSWORD 'changed-pw'")
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
    health = asyncio.run(ConnectorMonitor(pipeline, platform).health())
    assert health.status is Status.ERROR, health
    assert "password authentication failed" in health.detail["error"], health.detail
    capsys.readouterr()  # earlier log lines
    assert cdc_main(["health", *argv, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "error"
    assert "password authentication failed" in report["components"]["connector"]["error"]
    assert "password authentication failed" in report["components"]["source"]["error"]
    assert cdc_main(["health", *argv]) == 1
    table = capsys.readouterr().out
    assert "connector" in table and "ERROR" in table and "password authentication failed" in table
    assert message_count(bootstrap, f"{prefix}.public.orders") >= 1  # nothing deleted
    with server.connect("postgres", autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {role} PASSWORD 'right-pw'")
    asyncio.run(undeploy(pipeline, platform, force=True))


def test_failed_connector_is_reported_with_connects_error_text(
    pg: PgTestContext,
    tansu_broker: Any,
    schema_registry: Any,
    kafka_connect: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A task Debezium cannot start (the captured table does not exist, so the filtered
    publication cannot be made): FAILED on Connect; the provisioner, the monitor and
    `cdc health` all give Connect's error text; nothing is deleted."""
    database = pg.new_database("failed")
    pipeline, platform, argv = configs(
        tmp_path,
        host=pg.host,
        port=pg.port,
        database=database,
        tables=["public.no_such_table"],
        bootstrap=tansu_broker.bootstrap_servers,
        registry=schema_registry.url,
        connect=kafka_connect.url,
    )
    topic = f"{pipeline.topic_prefix}.public.no_such_table"
    with pytest.raises(ProvisionError) as failure:
        asyncio.run(KafkaProvisioner(pipeline, platform, running_timeout_seconds=90).provision())
    status = asyncio.run(ConnectClient(platform.connector).status(f"cdc-{pipeline.pipeline_id}"))
    assert status is not None and status.failed, status
    text = status.error()
    first = text.splitlines()[0].strip()
    assert first in str(failure.value), (first, str(failure.value))
    health = asyncio.run(ConnectorMonitor(pipeline, platform).health())
    assert health.status is Status.ERROR
    assert health.detail["trace"] == text
    capsys.readouterr()  # earlier log lines
    assert cdc_main(["health", *argv, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["components"]["connector"]["trace"] == text
    assert topic_partitions(tansu_broker.bootstrap_servers, topic) == 1  # still there

    # /readyz of an ingest whose monitor is the connector's: 503 with Connect's text. The
    # event source here is the in-memory stand-in (tests/support/fakes.py): this checks the
    # monitor -> IngestService.health -> /readyz path, whatever consumer reads the topics.
    service = IngestService(
        pipeline.pipeline_id,
        FakeEventSource(),
        Router([]),
        {},
        100,
        monitor=ConnectorMonitor(pipeline, platform),
    )
    state = HealthState()
    state.update(asyncio.run(service.health()))
    port = find_free_port()
    server = serve_health(state, port, "127.0.0.1", registry=CollectorRegistry())
    try:
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert answer.value.code == 503
        body = json.loads(answer.value.read())
    finally:
        server.shutdown()
        server.server_close()
    assert body["ready"] is False
    assert body["components"]["connector"]["trace"] == text
    assert first in body["components"]["connector"]["error"]
    asyncio.run(undeploy(pipeline, platform))


def test_heartbeat_table_mode_creates_the_table_and_the_connector_writes_it(
    pg: PgTestContext,
    tansu_broker: Any,
    schema_registry: Any,
    kafka_connect: Any,
    tmp_path: Path,
) -> None:
    database = pg.new_database("beat")
    dsn = pg.dsn(database)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pipeline, platform, _ = configs(
        tmp_path,
        host=pg.host,
        port=pg.port,
        database=database,
        tables=["public.t"],
        bootstrap=tansu_broker.bootstrap_servers,
        registry=schema_registry.url,
        connect=kafka_connect.url,
    )
    pipeline = pipeline.model_copy(
        update={"source": pipeline.source.model_copy(update={"heartbeat_mode": "table"})}
    )
    pipeline.source._pipeline_id = pipeline.pipeline_id
    asyncio.run(KafkaProvisioner(pipeline, platform).provision())
    slot = pipeline.effective_slot_name(platform)

    def beat() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT 1 FROM cdc_platform.heartbeat WHERE slot_name = %s", (slot,)
            ).fetchone()
        return row is not None

    wait_for(beat, 60, "the connector's heartbeat.action.query to write its row")
    asyncio.run(undeploy(pipeline, platform))
