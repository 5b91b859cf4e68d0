"""adapters/debezium/connectors.py: the connector config of each source type, built from
pipeline.yaml and platform.yaml as `cdc run` loads them."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

from adapters.config import ConfigError, loads_pipeline, loads_platform
from adapters.debezium import connectors
from adapters.kafka import topics

PLATFORM = """
transport_mode: kafka
kafka:
  bootstrap_servers: k1:9092
  schema_registry_url: http://registry:8081
  topic_num_partitions: 3
  topic_replication_factor: 2
  security_protocol: SASL_SSL
  auth_mechanism: sasl_scram_512
  sasl_username: cdc
  sasl_password: s3cret
  schema_registry_username: sr
  schema_registry_password: srpw
connector:
  connect_url: http://connect:8083
"""


def load(source: dict[str, Any], platform: str = PLATFORM, **top: Any) -> tuple[Any, Any]:
    plat = loads_platform(platform)
    doc = {"pipeline_id": "orders-cdc", "source": source, **top}
    return loads_pipeline(yaml.safe_dump(doc), platform=plat), plat


def postgres_source(**extra: Any) -> dict[str, Any]:
    return {
        "source_type": "postgres",
        "host": "db.internal",
        "database": "shop",
        "username": "cdc",
        "password": "pw",
        "tables": ["public.orders", "sales.order_items"],
        **extra,
    }


def assert_common(conf: dict[str, str], prefix: str = "cdc") -> None:
    assert conf["topic.prefix"] == prefix
    assert conf["tasks.max"] == "1"
    for side in ("key", "value"):
        assert conf[f"{side}.converter"] == "io.confluent.connect.avro.AvroConverter"
        assert conf[f"{side}.converter.schema.registry.url"] == "http://registry:8081"
        assert conf[f"{side}.converter.basic.auth.user.info"] == "sr:srpw"
    assert conf["errors.max.retries"] == "30"  # bounded: a lasting failure becomes FAILED
    assert conf["retriable.restart.connector.wait.ms"] == "10000"
    assert conf["poll.interval.ms"] == "100"  # not Debezium's 500 (latency, benchmarks.md)
    assert conf["topic.creation.default.partitions"] == "3"
    assert conf["topic.creation.default.replication.factor"] == "2"
    assert all(isinstance(v, str) for v in conf.values())  # Connect wants strings


def test_postgres_connector() -> None:
    pipeline, platform = load(postgres_source(slot_name="orders_slot"))
    conf = connectors.connector_config(pipeline, platform)
    assert_common(conf)
    assert conf["connector.class"] == "io.debezium.connector.postgresql.PostgresConnector"
    assert conf["database.hostname"] == "db.internal"
    assert conf["database.port"] == "5432"
    assert conf["database.dbname"] == "shop"
    assert (conf["database.user"], conf["database.password"]) == ("cdc", "pw")
    assert conf["plugin.name"] == "pgoutput"
    assert conf["slot.name"] == "orders_slot"
    assert conf["publication.name"] == "cdc_orders_cdc_pub"
    assert conf["publication.autocreate.mode"] == "filtered"
    assert conf["table.include.list"] == r"public\.orders,sales\.order_items"
    assert conf["snapshot.mode"] == "initial"
    assert conf["heartbeat.interval.ms"] == "10000"
    assert "heartbeat.action.query" not in conf
    assert "schema.history.internal.kafka.topic" not in conf  # postgres keeps no history
    assert conf["skipped.operations"] == "none"  # truncates reach the sinks, as on direct
    assert "message.key.columns" not in conf  # set by the provisioner from the catalog
    assert connectors.connector_name(pipeline) == "cdc-orders-cdc"


def test_message_keys_of_replica_identity_index_tables() -> None:
    assert connectors.message_key_settings({}) == {}
    keys = {"sales.lines": ["order_id", "line"], "public.coded": ["code"]}
    assert connectors.message_key_settings(keys) == {
        "message.key.columns": "public.coded:code;sales.lines:order_id,line"
    }


def test_poll_interval_is_a_connector_setting() -> None:
    platform = PLATFORM.replace("connector:", "connector:\n  poll_interval_seconds: 0.05", 1)
    assert platform != PLATFORM
    pipeline, plat = load(postgres_source(), platform)
    assert connectors.connector_config(pipeline, plat)["poll.interval.ms"] == "50"


def test_include_list_matches_only_the_exact_tables() -> None:
    pattern = connectors.include_list(["public.orders", "a_b.c-d"])
    regexes = [re.compile(p) for p in pattern.split(",")]
    assert any(r.fullmatch("public.orders") for r in regexes)
    assert not any(r.fullmatch("publicXorders") for r in regexes)
    assert any(r.fullmatch("a_b.c-d") for r in regexes)


@pytest.mark.parametrize(
    ("ours", "debezium"),
    [
        ("initial", "initial"),
        ("when_needed", "when_needed"),
        ("no_data", "no_data"),
        ("never", "no_data"),
    ],
)
@pytest.mark.parametrize("source_type", ["postgres", "mysql", "mongodb", "sqlserver"])
def test_snapshot_mode_mapping(ours: str, debezium: str, source_type: str) -> None:
    source = postgres_source(snapshot_mode=ours, source_type=source_type)
    if source_type == "mysql":
        source |= {"mysql_server_id": 5, "tables": ["shop.orders"]}
    if source_type == "mongodb":
        source["tables"] = ["shop.orders"]
    pipeline, platform = load(source)
    assert connectors.connector_config(pipeline, platform)["snapshot.mode"] == debezium


def test_heartbeats() -> None:
    pipeline, platform = load(
        postgres_source(heartbeat_mode="table", heartbeat_interval_seconds=2.5)
    )
    conf = connectors.connector_config(pipeline, platform)
    assert conf["heartbeat.interval.ms"] == "2500"
    assert conf["heartbeat.action.query"].startswith(
        "INSERT INTO cdc_platform.heartbeat (slot_name) VALUES ('cdc_orders_cdc')"
    )
    pipeline, platform = load(postgres_source(heartbeat_mode="none"))
    assert connectors.connector_config(pipeline, platform)["heartbeat.interval.ms"] == "0"


def test_heartbeat_table_is_postgres_only() -> None:
    with pytest.raises(ConfigError, match=r"source\.heartbeat_mode.*heartbeat_mode table"):
        load(postgres_source(source_type="mongodb", tables=["shop.o"], heartbeat_mode="table"))


def test_mysql_connector() -> None:
    pipeline, platform = load(
        {
            "source_type": "mysql",
            "host": "mysql.internal",
            "database": "shop",
            "username": "cdc",
            "password": "pw",
            "tables": ["shop.customers", "crm.accounts"],
            "mysql_server_id": 184054,
            "snapshot_mode": "when_needed",
        }
    )
    conf = connectors.connector_config(pipeline, platform)
    assert_common(conf)
    assert conf["connector.class"] == "io.debezium.connector.mysql.MySqlConnector"
    assert conf["database.port"] == "3306"
    assert conf["database.server.id"] == "184054"
    assert conf["database.include.list"] == r"crm,shop"
    assert conf["table.include.list"] == r"shop\.customers,crm\.accounts"
    assert conf["snapshot.mode"] == "when_needed"
    history = topics.schema_history_topic(pipeline)
    assert history == "_cdc-schema-history.orders-cdc"
    assert conf["schema.history.internal.kafka.topic"] == history
    assert conf["schema.history.internal.kafka.bootstrap.servers"] == "k1:9092"
    # The schema history's own clients get the brokers' security settings.
    for client in ("producer", "consumer"):
        prefix = f"schema.history.internal.{client}."
        assert conf[prefix + "security.protocol"] == "SASL_SSL"
        assert conf[prefix + "sasl.mechanism"] == "SCRAM-SHA-512"
        assert 'username="cdc" password="s3cret"' in conf[prefix + "sasl.jaas.config"]


def test_mongodb_connector_encodes_credentials() -> None:
    pipeline, platform = load(
        {
            "source_type": "mongodb",
            "host": "mongo.internal",
            "database": "shop",
            "username": "cdc@corp",
            "password": "p@ss:w/rd?&=",
            "tables": ["shop.orders", "shop.order.items"],
            "replica_set_name": "rs0",
            "auth_source": "admin",
        }
    )
    conf = connectors.connector_config(pipeline, platform)
    assert_common(conf)
    assert conf["connector.class"] == "io.debezium.connector.mongodb.MongoDbConnector"
    uri = conf["mongodb.connection.string"]
    parts = urlsplit(uri)
    assert (parts.scheme, parts.hostname, parts.port) == ("mongodb", "mongo.internal", 27017)
    assert unquote(parts.username or "") == "cdc@corp"
    assert unquote(parts.password or "") == "p@ss:w/rd?&="
    assert "p@ss" not in uri  # encoded, not raw
    assert parse_qs(parts.query) == {"replicaSet": ["rs0"], "authSource": ["admin"]}
    assert conf["database.include.list"] == "shop"
    assert conf["collection.include.list"] == r"shop\.orders,shop\.order\.items"
    assert "database.hostname" not in conf
    assert "schema.history.internal.kafka.topic" not in conf


def test_mongodb_without_replica_set_or_password() -> None:
    pipeline, _ = load(
        {
            "source_type": "mongodb",
            "host": "m",
            "database": "d",
            "username": "reader",
            "tables": ["d.c"],
        }
    )
    assert connectors.mongodb_connection_string(pipeline) == "mongodb://reader@m:27017/"


def test_mongodb_without_username_logs_in_as_nobody() -> None:
    """The username default (postgres) is not sent: the MongoDB server would refuse it."""
    source = {"source_type": "mongodb", "host": "m", "database": "d", "tables": ["d.c"]}
    pipeline, _ = load({**source, "replica_set_name": "rs0"})
    assert connectors.mongodb_connection_string(pipeline) == "mongodb://m:27017/?replicaSet=rs0"
    pipeline, _ = load({**source, "username": "postgres"})  # given: a real user of that name
    assert connectors.mongodb_connection_string(pipeline) == "mongodb://postgres@m:27017/"


def test_sqlserver_connector_routes_topics_to_the_common_shape() -> None:
    pipeline, platform = load(
        {
            "source_type": "sqlserver",
            "host": "mssql.internal",
            "database": "cdc_demo",
            "username": "sa",
            "password": "pw",
            "tables": ["dbo.orders"],
        },
        topic_prefix="app.cdc",
    )
    conf = connectors.connector_config(pipeline, platform)
    assert_common(conf, prefix="app.cdc")
    assert conf["connector.class"] == "io.debezium.connector.sqlserver.SqlServerConnector"
    assert conf["database.port"] == "1433"
    assert conf["database.names"] == "cdc_demo"
    assert conf["table.include.list"] == r"dbo\.orders"
    assert conf["schema.history.internal.kafka.topic"] == "_cdc-schema-history.orders-cdc"
    assert conf["schema.history.internal.producer.security.protocol"] == "SASL_SSL"
    # The RegexRouter, applied the way Connect applies it (Java replacement $1 -> \1).
    regex = re.compile(conf["transforms.route.regex"])
    replacement = conf["transforms.route.replacement"].replace("$", "\\")
    assert regex.fullmatch("app.cdc.cdc_demo.dbo.orders")
    assert regex.sub(replacement, "app.cdc.cdc_demo.dbo.orders") == "app.cdc.dbo.orders"
    assert topics.data_topics(pipeline) == ["app.cdc.dbo.orders"]
    # The heartbeat and other databases' topics are left alone.
    assert not regex.fullmatch("__debezium-heartbeat.app.cdc")
    assert not regex.fullmatch("app.cdc.other_db.dbo.orders")
    # The driver's default stays: encrypted, the certificate checked.
    assert "database.trustServerCertificate" not in conf


def test_sqlserver_trust_server_certificate_reaches_the_jdbc_driver() -> None:
    """A server with its self-signed certificate (SQL Server's own when given none, e.g. the
    mcr.microsoft.com/mssql/server image) is refused by the JDBC driver unless told to trust it."""
    source = {"source_type": "sqlserver", "database": "d", "tables": ["dbo.t"], "password": "p"}
    pipeline, platform = load({**source, "trust_server_certificate": True})
    conf = connectors.connector_config(pipeline, platform)
    assert conf["database.trustServerCertificate"] == "true"
    pipeline, platform = load({**source, "trust_server_certificate": False})
    assert "database.trustServerCertificate" not in connectors.connector_config(pipeline, platform)
    with pytest.raises(ConfigError, match="trust_server_certificate applies only to source_type"):
        load({**postgres_source(), "trust_server_certificate": True})


def test_topics_of_a_pipeline() -> None:
    pipeline, platform = load(postgres_source())
    assert topics.data_topics(pipeline) == ["cdc.public.orders", "cdc.sales.order_items"]
    assert topics.dlq_topics(pipeline, platform) == [
        "cdc.public.orders.dlq",
        "cdc.sales.order_items.dlq",
    ]
    no_dlq = loads_platform(PLATFORM + "dlq:\n  enabled: false\n")
    assert topics.dlq_topics(pipeline, no_dlq) == []
