"""adapters.config models: defaults, validation rules, naming of slots and publications."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.config import (
    ConfigError,
    KafkaConfig,
    PipelineConfig,
    PlatformConfig,
    PostgresSinkConfig,
    SinkConfig,
    SourceConfig,
    loads_pipeline,
    loads_platform,
)

SOURCE: dict[str, Any] = {"database": "shop", "tables": ["public.orders"]}


def pipeline(**overrides: Any) -> PipelineConfig:
    data: dict[str, Any] = {"pipeline_id": "orders-cdc", "source": dict(SOURCE)}
    data.update(overrides)
    return PipelineConfig.model_validate(data)


def source(**overrides: Any) -> SourceConfig:
    return SourceConfig.model_validate({**SOURCE, **overrides})


def sink(sink_type: str, section: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"sink_id": f"{sink_type}-1", "sink_type": sink_type, **extra}
    if section is not None:
        out[sink_type] = section
    return out


def problems_of(text: str, kind: str = "pipeline") -> dict[str, str]:
    """path -> message of every problem in a pipeline/platform YAML text."""
    text = textwrap.dedent(text)
    with pytest.raises(ConfigError) as info:
        if kind == "pipeline":
            loads_pipeline(text, env={})
        else:
            loads_platform(text, env={})
    return {p.path: p.message for p in info.value.problems}


# --------------------------------------------------------------------------- defaults


def test_platform_defaults_match_the_guide() -> None:
    p = PlatformConfig()
    assert p.transport_mode == "direct"
    k = p.kafka
    assert (k.bootstrap_servers, k.schema_registry_url, k.group_id) == (
        "localhost:9092",
        "http://localhost:8081",
        "cdc-platform",
    )
    assert (k.auto_offset_reset, k.enable_idempotence, k.acks) == ("earliest", True, "all")
    assert (k.topic_num_partitions, k.topic_replication_factor) == (1, 1)
    assert (k.poll_batch_size, k.deser_pool_size, k.commit_interval_seconds) == (1, 1, 0.0)
    assert (k.security_protocol, k.auth_mechanism) == ("PLAINTEXT", "none")
    assert (k.sasl_username, k.sasl_password, k.aws_region, k.gcp_project_id) == (None,) * 4
    c = p.connector
    assert (c.connect_url, c.timeout_seconds, c.retry_max_attempts, c.retry_wait_seconds) == (
        "http://localhost:8083",
        30,
        5,
        2,
    )
    d = p.dlq
    assert (d.enabled, d.topic_suffix, d.max_retries, d.include_headers) == (True, "dlq", 3, True)
    assert d.flush_interval_seconds == 0.0
    r = p.retry
    assert (r.max_attempts, r.initial_wait_seconds, r.max_wait_seconds) == (5, 1, 60)
    assert (r.multiplier, r.jitter) == (2, True)
    assert p.pubsub.project_id is None and p.pubsub.ordering_enabled is True
    assert p.kinesis.region is None and p.kinesis.checkpoint_table_name == "cdc-kinesis-checkpoints"
    w = p.wal_reader
    assert (w.publication_name, w.slot_name, w.batch_size) == (None, None, 100)
    assert (w.batch_timeout_seconds, w.status_interval_seconds) == (1.0, 10.0)
    assert p.max_buffered_messages == 1000
    assert p.schema_monitor_interval_seconds == 30.0
    assert p.lag_monitor_interval_seconds == 15.0
    assert p.stop_on_incompatible_schema is False
    assert (p.health_port, p.health_enabled) == (8080, True)
    i = p.ingest
    assert (i.batch_max_events, i.batch_max_delay_ms, i.max_in_flight_batches, i.grpc_port) == (
        2000,
        20,
        8,
        50050,
    )
    assert (p.tracing.otlp_endpoint, p.tracing.service_name_prefix) == (None, "cdc")


def test_pipeline_and_source_defaults() -> None:
    p = pipeline()
    assert (p.topic_prefix, p.sinks) == ("cdc", [])
    s = p.source
    assert (s.source_type, s.host, s.port, s.username, s.password) == (
        "postgres",
        "localhost",
        5432,
        "postgres",
        "",
    )
    assert (s.snapshot_mode, s.slot_name, s.publication_name) == ("initial", None, None)
    assert (s.mysql_server_id, s.replica_set_name, s.auth_source) == (None, None, None)
    assert s.heartbeat_interval_seconds == 10.0


@pytest.mark.parametrize(
    ("source_type", "port", "tables", "extra"),
    [
        ("postgres", 5432, ["public.orders"], {}),
        ("mysql", 3306, ["shop.orders"], {"mysql_server_id": 1}),
        ("mongodb", 27017, ["shop.orders"], {}),
        ("sqlserver", 1433, ["dbo.orders"], {}),
    ],
)
def test_source_port_defaults_per_type(
    source_type: str, port: int, tables: list[str], extra: dict[str, Any]
) -> None:
    s = source(source_type=source_type, tables=tables, **extra)
    assert s.port == port
    assert source(source_type=source_type, tables=tables, port=9999, **extra).port == 9999


def test_sink_defaults() -> None:
    p = pipeline(
        sinks=[
            sink("postgres", {"database": "replica"}),
            sink("webhook", {"url": "https://h.example/cdc"}),
            sink(
                "iceberg",
                {"catalog_uri": "sqlite:///c.db", "warehouse": "file:///w", "table_name": "t"},
            ),
        ]
    )
    pg, hook, ice = (s.settings for s in p.sinks)
    assert all(s.enabled and s.tables is None and s.operations is None for s in p.sinks)
    assert isinstance(pg, PostgresSinkConfig)
    assert (pg.host, pg.port, pg.database, pg.username, pg.password) == (
        "127.0.0.1",
        5432,
        "replica",
        "postgres",
        "",
    )
    assert (pg.target_schema, pg.write_mode, pg.batch_size) == ("public", "upsert", 2000)
    assert (pg.pool_max_size, pg.connect_timeout_seconds, pg.dsn) == (4, 10, None)
    assert hook is p.sinks[1].webhook and hook is not None
    assert (hook.method, hook.headers, hook.timeout_seconds, hook.batch_size) == (
        "POST",
        {},
        10,
        500,
    )
    assert (hook.max_retries, hook.hmac_secret) == (5, None)
    assert hook.retry_on_status == [429, 500, 502, 503, 504]
    assert ice is p.sinks[2].iceberg and ice is not None
    assert (ice.catalog_name, ice.table_namespace, ice.write_mode, ice.batch_size) == (
        "default",
        "cdc",
        "append",
        1000,
    )
    assert (ice.flush_interval_seconds, ice.write_executor_threads) == (5.0, 1)
    assert (ice.s3_endpoint, ice.s3_access_key_id, ice.s3_secret_access_key, ice.s3_region) == (
        None,
    ) * 4
    m = ice.maintenance
    assert (m.enabled, m.compaction_interval_seconds) == (False, 3600)
    assert (m.expire_snapshots_older_than_seconds, m.retain_last_snapshots) == (86400, 10)


# --------------------------------------------------------------------------- immutability


def test_models_are_frozen_and_forbid_extra() -> None:
    p = pipeline()
    with pytest.raises(ValidationError):
        p.__setattr__("pipeline_id", "other")
    with pytest.raises(ValidationError):
        p.source.__setattr__("port", 1)
    with pytest.raises(ValidationError, match="Extra inputs"):
        KafkaConfig.model_validate({"bootstrap_servers": "k:1", "linger_ms": 5})
    for model in (PipelineConfig, PlatformConfig, SourceConfig, SinkConfig, KafkaConfig):
        assert model.model_config.get("extra") == "forbid"
        assert model.model_config.get("frozen") is True


def test_repr_hides_secrets() -> None:
    p = pipeline(
        source={**SOURCE, "password": "src-pw"},
        sinks=[
            sink("postgres", {"database": "r", "password": "sink-pw"}),
            sink("webhook", {"url": "http://h", "hmac_secret": "mac", "headers": {"A": "tok"}}),
        ],
    )
    text = repr(p)
    for secret in ("src-pw", "sink-pw", "mac", "tok"):
        assert secret not in text
    assert p.source.password == "src-pw"
    kafka = KafkaConfig(
        security_protocol="SASL_SSL",
        auth_mechanism="sasl_plain",
        sasl_username="u",
        sasl_password="kpw",
    )
    assert "kpw" not in repr(kafka)


# --------------------------------------------------------------------------- pipeline rules


@pytest.mark.parametrize("pid", ["orders-cdc", "a", "0rders_v2", "a" * 63])
def test_valid_pipeline_ids(pid: str) -> None:
    assert pipeline(pipeline_id=pid).pipeline_id == pid


@pytest.mark.parametrize("pid", ["", "Orders", "-orders", "_x", "orders.cdc", "a b", "a" * 64])
def test_invalid_pipeline_ids(pid: str) -> None:
    with pytest.raises(ValidationError):
        pipeline(pipeline_id=pid)


def test_tables_must_be_qualified() -> None:
    found = problems_of(
        """\
        pipeline_id: p
        source:
          tables: [public.orders, orders, public.orders, "public.*", a.b.c]
          database: shop
        """
    )
    assert found == {
        "source.tables[1]": (
            "'orders' is not qualified; write it as schema.table (e.g. 'public.orders')"
        ),
        "source.tables[2]": "'public.orders' is listed twice (also tables[0])",
        "source.tables[3]": "'public.*': source tables are exact names, not patterns",
        "source.tables[4]": (
            "'a.b.c' is not qualified; write it as schema.table (e.g. 'public.orders')"
        ),
    }


def test_mongodb_tables_are_db_qualified_collections_may_hold_dots() -> None:
    s = source(source_type="mongodb", tables=["shop.orders", "shop.system.profile"])
    assert s.tables == ["shop.orders", "shop.system.profile"]
    with pytest.raises(ValidationError, match=r"db\.collection"):
        source(source_type="mongodb", tables=["orders"])


def test_at_least_one_table() -> None:
    with pytest.raises(ValidationError, match="at least 1 item"):
        source(tables=[])


def test_mysql_requires_server_id() -> None:
    found = problems_of(
        """\
        pipeline_id: p
        source:
          source_type: mysql
          database: shop
          tables: [shop.orders]
        """
    )
    assert "source.mysql_server_id" in found
    assert source(source_type="mysql", tables=["shop.o"], mysql_server_id=184054).mysql_server_id
    with pytest.raises(ValidationError):
        source(source_type="mysql", tables=["shop.o"], mysql_server_id=0)


def test_source_specific_fields_are_rejected_for_other_source_types() -> None:
    found = problems_of(
        """\
        pipeline_id: p
        source:
          source_type: sqlserver
          database: shop
          tables: [dbo.orders]
          slot_name: s
          replica_set_name: rs0
        """
    )
    assert found == {
        "source.slot_name": (
            "slot_name applies only to source_type postgres, not sqlserver; remove it"
        ),
        "source.replica_set_name": (
            "replica_set_name applies only to source_type mongodb, not sqlserver; remove it"
        ),
    }
    mongo = source(
        source_type="mongodb", tables=["shop.o"], replica_set_name="rs0", auth_source="admin"
    )
    assert (mongo.replica_set_name, mongo.auth_source) == ("rs0", "admin")


@pytest.mark.parametrize("name", ["Slot", "my-slot", "a" * 64, "sl ot"])
def test_invalid_slot_names(name: str) -> None:
    with pytest.raises(ValidationError, match="slot"):
        source(slot_name=name)


def test_invalid_publication_name() -> None:
    with pytest.raises(ValidationError, match="identifier"):
        source(publication_name="1pub")


def test_sink_section_must_match_type() -> None:
    found = problems_of(
        """\
        pipeline_id: p
        source: {database: shop, tables: [public.orders]}
        sinks:
          - sink_id: a
            sink_type: postgres
            webhook: {url: "http://h"}
          - sink_id: b
            sink_type: iceberg
        """
    )
    assert found == {
        "sinks[0].postgres": "sink_type postgres requires a 'postgres:' section",
        "sinks[0].webhook": (
            "section 'webhook' does not match sink_type postgres; settings of this sink go under "
            "'postgres:'"
        ),
        "sinks[1].iceberg": "sink_type iceberg requires a 'iceberg:' section",
    }


def test_sink_type_is_required_and_checked() -> None:
    found = problems_of(
        """\
        pipeline_id: p
        source: {database: shop, tables: [public.orders]}
        sinks:
          - sink_id: a
            postgres: {database: r}
          - sink_id: b
            sink_type: kafka
        """
    )
    assert found["sinks[0].sink_type"] == "required field is missing"
    assert found["sinks[1].sink_type"] == (
        "Input should be 'webhook', 'postgres' or 'iceberg', got 'kafka'"
    )


def test_sink_tables_and_operations() -> None:
    p = pipeline(
        source={**SOURCE, "tables": ["public.orders", "public.order_items", "sales.x"]},
        sinks=[
            sink("webhook", {"url": "http://h"}, tables=["public.order*"], operations=["c", "d"])
        ],
    )
    s = p.sinks[0]
    assert s.accepts_table("public.orders") and s.accepts_table("public.order_items")
    assert not s.accepts_table("sales.x")
    assert s.accepts_operation("c") and not s.accepts_operation("u")
    everything = pipeline(sinks=[sink("webhook", {"url": "http://h"})]).sinks[0]
    assert everything.accepts_table("any.table") and everything.accepts_operation("t")


def test_sink_table_pattern_must_match_a_source_table() -> None:
    found = problems_of(
        """\
        pipeline_id: p
        source: {database: shop, tables: [public.orders]}
        sinks:
          - sink_id: a
            sink_type: webhook
            tables: [public.orders, public.ordrs]
            operations: [c, x, c]
            webhook: {url: "http://h"}
        """
    )
    assert found == {
        "sinks[0].operations[1]": "Input should be 'c', 'u', 'd', 'r' or 't', got 'x'",
    }
    found = problems_of(
        """\
        pipeline_id: p
        source: {database: shop, tables: [public.orders]}
        sinks:
          - sink_id: a
            sink_type: webhook
            tables: [public.orders, public.ordrs]
            operations: [c, c]
            webhook: {url: "http://h"}
        """
    )
    assert found == {
        "sinks[0].operations[1]": "'c' is listed twice",
    }
    found = problems_of(
        """\
        pipeline_id: p
        source: {database: shop, tables: [public.orders]}
        sinks:
          - sink_id: a
            sink_type: webhook
            tables: [public.orders, public.ordrs]
            webhook: {url: "http://h"}
        """
    )
    assert found == {
        "sinks[0].tables[1]": (
            "pattern 'public.ordrs' matches none of the source tables (public.orders)"
        )
    }


def test_empty_sink_filters_are_rejected() -> None:
    with pytest.raises(ValidationError, match="omit 'tables'"):
        pipeline(sinks=[sink("webhook", {"url": "http://h"}, tables=[])])
    with pytest.raises(ValidationError, match="omit 'operations'"):
        pipeline(sinks=[sink("webhook", {"url": "http://h"}, operations=[])])


@pytest.mark.parametrize("url", ["ftp://h/x", "h.example/x", "http://", "mailto:a@b"])
def test_webhook_url_must_be_http(url: str) -> None:
    with pytest.raises(ValidationError, match="http"):
        pipeline(sinks=[sink("webhook", {"url": url})])


def test_webhook_retry_statuses_and_method() -> None:
    with pytest.raises(ValidationError, match="HTTP status"):
        pipeline(sinks=[sink("webhook", {"url": "http://h", "retry_on_status": [500, 42]})])
    with pytest.raises(ValidationError, match="'POST' or 'PUT'"):
        pipeline(sinks=[sink("webhook", {"url": "http://h", "method": "GET"})])


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("postgres", "batch_size", 0),
        ("postgres", "pool_max_size", 0),
        ("postgres", "connect_timeout_seconds", 0),
        ("postgres", "port", 70000),
        ("postgres", "write_mode", "merge"),
        ("webhook", "timeout_seconds", -1),
        ("webhook", "batch_size", 0),
        ("webhook", "max_retries", -1),
        ("iceberg", "batch_size", 0),
        ("iceberg", "flush_interval_seconds", 0),
        ("iceberg", "write_executor_threads", 0),
        ("iceberg", "write_mode", "merge"),
    ],
)
def test_sink_numbers_and_enums(section: str, field: str, value: Any) -> None:
    base = {
        "postgres": {"database": "r"},
        "webhook": {"url": "http://h"},
        "iceberg": {"catalog_uri": "c", "warehouse": "w", "table_name": "t"},
    }[section]
    with pytest.raises(ValidationError) as info:
        pipeline(sinks=[sink(section, {**base, field: value})])
    assert info.value.errors()[0]["loc"] == ("sinks", 0, section, field)


def test_iceberg_maintenance_numbers() -> None:
    base = {"catalog_uri": "c", "warehouse": "w", "table_name": "t"}
    for field in (
        "compaction_interval_seconds",
        "expire_snapshots_older_than_seconds",
        "retain_last_snapshots",
    ):
        with pytest.raises(ValidationError):
            pipeline(sinks=[sink("iceberg", {**base, "maintenance": {field: 0}})])


def test_postgres_sink_dsn_alternative() -> None:
    pg = (
        pipeline(sinks=[sink("postgres", {"dsn": "postgresql://u:p@db/replica"})]).sinks[0].postgres
    )
    assert pg is not None and pg.conninfo() == "postgresql://u:p@db/replica"
    assert "u:p" not in repr(pg)
    with pytest.raises(ValidationError, match="cannot be combined with dsn"):
        pipeline(sinks=[sink("postgres", {"dsn": "postgresql://db/r", "host": "other"})])
    with pytest.raises(ValidationError, match="or give a dsn"):
        pipeline(sinks=[sink("postgres", {"target_schema": "public"})])


def test_postgres_sink_conninfo_quotes_values() -> None:
    pg = PostgresSinkConfig(database="my db", password="it's", connect_timeout_seconds=0.5)
    assert pg.conninfo() == (
        "host=127.0.0.1 port=5432 dbname='my db' user=postgres connect_timeout=2 password='it\\'s'"
    )
    assert "password" not in PostgresSinkConfig(database="d").conninfo()


def test_settings_and_sink_lookup() -> None:
    p = pipeline(
        sinks=[
            sink("postgres", {"database": "r"}),
            {**sink("webhook", {"url": "http://h"}), "enabled": False},
        ]
    )
    assert p.sink("postgres-1").settings is p.sinks[0].postgres
    assert [s.sink_id for s in p.enabled_sinks] == ["postgres-1"]
    with pytest.raises(KeyError, match="postgres-1, webhook-1"):
        p.sink("nope")


@pytest.mark.parametrize("sink_id", ["Replica", "-r", "a/b", ""])
def test_invalid_sink_ids(sink_id: str) -> None:
    with pytest.raises(ValidationError):
        pipeline(sinks=[{**sink("postgres", {"database": "r"}), "sink_id": sink_id}])


def test_topic_prefix_characters() -> None:
    assert pipeline(topic_prefix="cdc.prod_1-x").topic_prefix == "cdc.prod_1-x"
    with pytest.raises(ValidationError):
        pipeline(topic_prefix="cdc/prod")


# --------------------------------------------------------------------------- platform rules


def test_kafka_managed_auth_examples_from_the_guide() -> None:
    msk = KafkaConfig(
        bootstrap_servers="b-1.mycluster.kafka.us-east-1.amazonaws.com:9098",
        security_protocol="SASL_SSL",
        auth_mechanism="sasl_iam",
        aws_region="us-east-1",
    )
    assert msk.auth_mechanism == "sasl_iam"
    gcp = KafkaConfig(
        bootstrap_servers="bootstrap.c.us-central1.managedkafka.p.cloud.goog:9092",
        security_protocol="SASL_SSL",
        auth_mechanism="sasl_oauthbearer",
        gcp_project_id="my-project",
    )
    assert gcp.gcp_project_id == "my-project"


def test_kafka_auth_requirements() -> None:
    found = problems_of(
        """\
        transport_mode: kafka
        kafka:
          security_protocol: SASL_SSL
          auth_mechanism: sasl_iam
        """,
        "platform",
    )
    assert found == {"kafka.aws_region": "auth_mechanism sasl_iam requires aws_region"}
    found = problems_of(
        """\
        transport_mode: kafka
        kafka:
          security_protocol: SASL_SSL
          auth_mechanism: sasl_oauthbearer
        """,
        "platform",
    )
    assert found == {
        "kafka.gcp_project_id": "auth_mechanism sasl_oauthbearer requires gcp_project_id"
    }
    found = problems_of(
        """\
        transport_mode: kafka
        kafka:
          security_protocol: SASL_SSL
          auth_mechanism: sasl_scram_512
          sasl_username: u
        """,
        "platform",
    )
    assert found == {"kafka.sasl_password": "auth_mechanism sasl_scram_512 requires sasl_password"}


@pytest.mark.parametrize(
    ("settings", "path", "fragment"),
    [
        (
            {"auth_mechanism": "sasl_plain", "sasl_username": "u", "sasl_password": "p"},
            "security_protocol",
            "needs security_protocol SASL_SSL",
        ),
        ({"security_protocol": "SASL_SSL"}, "auth_mechanism", "needs an auth_mechanism"),
        (
            {
                "security_protocol": "SASL_PLAINTEXT",
                "auth_mechanism": "sasl_iam",
                "aws_region": "r",
            },
            "security_protocol",
            "SASL_SSL",
        ),
        ({"aws_region": "us-east-1"}, "aws_region", "only with auth_mechanism sasl_iam"),
        ({"gcp_project_id": "p"}, "gcp_project_id", "only with auth_mechanism sasl_oauthbearer"),
        ({"sasl_username": "u"}, "sasl_username", "only with auth_mechanism sasl_plain"),
        ({"auth_mechanism": "kerberos"}, "auth_mechanism", "'sasl_iam'"),
        ({"security_protocol": "TLS"}, "security_protocol", "'SASL_SSL'"),
        ({"bootstrap_servers": "kafka"}, "bootstrap_servers", "host:port"),
        ({"bootstrap_servers": "k1:9092,k2"}, "bootstrap_servers", "'k2' is not host:port"),
        ({"acks": "2"}, "acks", "'all'"),
        ({"auto_offset_reset": "none"}, "auto_offset_reset", "'earliest' or 'latest'"),
        ({"topic_num_partitions": 0}, "topic_num_partitions", "greater than 0"),
        ({"commit_interval_seconds": -1}, "commit_interval_seconds", "greater than or equal to 0"),
        ({"schema_registry_url": "localhost:8081"}, "schema_registry_url", "http"),
    ],
)
def test_kafka_rules(settings: dict[str, Any], path: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        KafkaConfig.model_validate(settings)
    assert fragment in str(info.value)
    text = "transport_mode: kafka\nkafka:\n" + "".join(
        f"  {k}: '{v}'\n" for k, v in settings.items()
    )
    assert f"kafka.{path}" in problems_of(text, "platform")


def test_scram_spellings_of_the_helm_chart_are_accepted() -> None:
    k = KafkaConfig(
        security_protocol="SASL_SSL",
        auth_mechanism="sasl_scram_sha_256",  # type: ignore[arg-type]
        sasl_username="u",
        sasl_password="p",
    )
    assert k.auth_mechanism == "sasl_scram_256"


def test_transport_requirements() -> None:
    assert problems_of("transport_mode: pubsub\n", "platform") == {
        "pubsub.project_id": "transport_mode pubsub requires pubsub.project_id"
    }
    assert problems_of("transport_mode: kinesis\n", "platform") == {
        "kinesis.region": "transport_mode kinesis requires kinesis.region"
    }
    assert PlatformConfig(transport_mode="kafka").kafka == KafkaConfig()
    assert PlatformConfig.model_validate(
        {"transport_mode": "pubsub", "pubsub": {"project_id": "p"}}
    )
    assert PlatformConfig.model_validate({"transport_mode": "kinesis", "kinesis": {"region": "r"}})


def test_sections_of_another_transport_are_rejected() -> None:
    found = problems_of(
        """\
        transport_mode: direct
        kafka:
          bootstrap_servers: k:9092
        connector: {}
        pubsub: {project_id: p}
        """,
        "platform",
    )
    assert set(found) == {"kafka", "connector", "pubsub"}
    assert found["kafka"] == (
        "section 'kafka' is used only with transport_mode kafka, but transport_mode is direct; "
        "remove it"
    )
    found = problems_of("transport_mode: kafka\nwal_reader: {batch_size: 5}\n", "platform")
    assert found == {
        "wal_reader": (
            "section 'wal_reader' is used only with transport_mode direct or pubsub or kinesis, "
            "but transport_mode is kafka; remove it"
        )
    }


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"pubsub": {"ack_deadline_seconds": 5}}, ("pubsub", "ack_deadline_seconds")),
        ({"pubsub": {"ack_deadline_seconds": 601}}, ("pubsub", "ack_deadline_seconds")),
        ({"kinesis": {"max_records_per_shard": 10001}}, ("kinesis", "max_records_per_shard")),
        ({"kinesis": {"shard_count": 0}}, ("kinesis", "shard_count")),
        ({"health_port": 0}, ("health_port",)),
        ({"health_port": 65536}, ("health_port",)),
        ({"ingest": {"grpc_port": 70000}}, ("ingest", "grpc_port")),
        ({"ingest": {"batch_max_events": 0}}, ("ingest", "batch_max_events")),
        ({"ingest": {"batch_max_delay_ms": -1}}, ("ingest", "batch_max_delay_ms")),
        ({"max_buffered_messages": 0}, ("max_buffered_messages",)),
        ({"lag_monitor_interval_seconds": 0}, ("lag_monitor_interval_seconds",)),
        ({"retry": {"multiplier": 0.5}}, ("retry", "multiplier")),
        ({"retry": {"initial_wait_seconds": 0}}, ("retry", "initial_wait_seconds")),
        ({"dlq": {"max_retries": -1}}, ("dlq", "max_retries")),
        ({"dlq": {"topic_suffix": "d l q"}}, ("dlq", "topic_suffix")),
        ({"wal_reader": {"batch_size": 0}}, ("wal_reader", "batch_size")),
        ({"wal_reader": {"slot_name": "Bad"}}, ("wal_reader", "slot_name")),
        (
            {"wal_reader": {"status_interval_seconds": "inf"}},
            ("wal_reader", "status_interval_seconds"),
        ),
        ({"tracing": {"service_name_prefix": ""}}, ("tracing", "service_name_prefix")),
    ],
)
def test_platform_ranges(data: dict[str, Any], loc: tuple[Any, ...]) -> None:
    mode = "pubsub" if "pubsub" in data else "kinesis" if "kinesis" in data else "direct"
    with pytest.raises(ValidationError) as info:
        PlatformConfig.model_validate({"transport_mode": mode, **data})
    assert info.value.errors()[0]["loc"] == loc


def test_retry_max_wait_not_below_initial_wait() -> None:
    found = problems_of("retry: {initial_wait_seconds: 10, max_wait_seconds: 5}\n", "platform")
    assert found == {
        "retry.max_wait_seconds": "max_wait_seconds (5.0) is below initial_wait_seconds (10.0)"
    }


def test_health_and_grpc_ports_must_differ() -> None:
    found = problems_of("health_port: 50050\n", "platform")
    assert found == {"ingest.grpc_port": "ingest.grpc_port 50050 is also the health_port"}


def test_pipeline_checked_against_platform() -> None:
    text = """\
        pipeline_id: p
        source:
          source_type: mysql
          mysql_server_id: 7
          database: shop
          tables: [shop.orders]
        """
    text = textwrap.dedent(text)
    kafka = PlatformConfig(transport_mode="kafka")
    assert loads_pipeline(text, env={}, platform=kafka).source.source_type == "mysql"
    with pytest.raises(ConfigError) as info:
        loads_pipeline(text, env={}, platform=PlatformConfig())
    problem = info.value.problems[0]
    assert (problem.path, problem.line) == ("source.source_type", 3)
    assert "needs transport_mode kafka" in problem.message


# ------------------------------------------------------------------ slot / publication names


def test_own_names_win() -> None:
    p = pipeline(source={**SOURCE, "slot_name": "mine", "publication_name": "my_pub"})
    platform = PlatformConfig.model_validate(
        {"wal_reader": {"slot_name": "pre", "publication_name": "pp"}}
    )
    assert p.effective_slot_name(platform) == "mine"
    assert p.effective_publication_name(platform) == "my_pub"
    assert p.effective_slot_name() == "mine"


def test_names_derived_from_pipeline_id() -> None:
    p = pipeline(pipeline_id="orders-cdc")
    assert p.effective_slot_name(PlatformConfig()) == "cdc_orders_cdc"
    assert p.effective_publication_name(PlatformConfig()) == "cdc_orders_cdc_pub"
    assert p.effective_slot_name() == "cdc_orders_cdc"
    # the same through the source, as the contract names it
    assert p.source.effective_slot_name(PlatformConfig()) == "cdc_orders_cdc"
    assert p.source.effective_publication_name() == "cdc_orders_cdc_pub"


def test_platform_names_are_prefixes() -> None:
    platform = PlatformConfig.model_validate(
        {"wal_reader": {"slot_name": "cdc_slot", "publication_name": "cdc_publication"}}
    )
    p = pipeline(pipeline_id="orders-cdc")
    assert p.effective_slot_name(platform) == "cdc_slot_orders_cdc"
    assert p.effective_publication_name(platform) == "cdc_publication_orders_cdc"


@pytest.mark.parametrize(
    "wal_reader", [{}, {"slot_name": "cdc_slot", "publication_name": "cdc_publication"}]
)
def test_two_pipelines_sharing_one_platform_file_get_different_slots(
    wal_reader: dict[str, Any],
) -> None:
    platform = loads_platform(
        "transport_mode: pubsub\npubsub: {project_id: p}\n"
        + (f"wal_reader: {wal_reader}\n" if wal_reader else ""),
        env={},
    )
    a = pipeline(pipeline_id="orders-cdc")
    b = pipeline(pipeline_id="customers-cdc")
    assert a.effective_slot_name(platform) != b.effective_slot_name(platform)
    assert a.effective_publication_name(platform) != b.effective_publication_name(platform)


def test_long_pipeline_ids_give_valid_distinct_names() -> None:
    a = pipeline(pipeline_id="a" * 56 + "-one")
    b = pipeline(pipeline_id="a" * 56 + "-two")
    platform = PlatformConfig.model_validate({"wal_reader": {"slot_name": "x" * 63}})
    for plat in (PlatformConfig(), platform):
        names = {
            a.effective_slot_name(plat),
            b.effective_slot_name(plat),
            a.effective_publication_name(plat),
            b.effective_publication_name(plat),
        }
        assert len(names) == 4
        for name in names:
            assert len(name) <= 63
            source(slot_name=name)  # a valid slot name


def test_standalone_source_needs_a_pipeline_id() -> None:
    s = source()
    with pytest.raises(ValueError, match="pipeline_id"):
        s.effective_slot_name()
    assert s.effective_slot_name(pipeline_id="x-y") == "cdc_x_y"


def test_effective_group_id() -> None:
    p = pipeline(pipeline_id="orders-cdc")
    assert p.effective_group_id(PlatformConfig()) == "cdc-platform-orders-cdc"
    explicit = PlatformConfig.model_validate(
        {"transport_mode": "kafka", "kafka": {"group_id": "g"}}
    )
    assert p.effective_group_id(explicit) == "g"
