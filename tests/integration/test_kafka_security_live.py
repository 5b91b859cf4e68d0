"""Kafka security settings live: clients built from platform.yaml by adapters/kafka/security.py
(through adapters/kafka/clients.py and the topic admin, as the product builds them) against
brokers that demand TLS or SASL.

* ``tls_broker`` (always here): Tansu behind an OpenSSL TLS terminator
  (tests/support/kafka_tls_front.py): ``SSL`` with CA verification, a wrong CA, and the Kafka
  event source reading Avro over TLS.
* ``apache_kafka``: a real Apache Kafka 4.x broker (tests/support/apache_kafka.py) with SSL,
  SASL_PLAINTEXT and SASL_SSL listeners, PLAIN and SCRAM-SHA-256/512 users. Its jars come from
  Maven Central (or ``$CDC_KAFKA_LIBS``); where java, mvn or the registry is missing these
  tests are skipped with that reason.

sasl_iam and sasl_oauthbearer need the cloud services' token endpoints: unit-tested only
(tests/unit/test_kafka_security.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Consumer, KafkaError, Producer

from adapters.config import KafkaConfig, PlatformConfig, loads_platform
from adapters.kafka import clients
from adapters.kafka.admin import TopicAdmin, TopicAdminError, TopicSpec
from adapters.kafka.avro import SchemaRegistry
from adapters.kafka.consumer import KafkaEventSource, KafkaSourceSettings, lane_of
from domain.health import ComponentHealth, Status
from services import kafka_ops
from tests.support import apache_kafka as apache
from tests.support import kafka_tls_front
from tests.support.debezium_avro import Writer, change, items_schemas
from tests.support.tls import make_pki

pytestmark = pytest.mark.integration
TIMEOUT = 30.0


# ------------------------------------------------------------------------------ brokers


@pytest.fixture(scope="session")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kafka_tls_front.TlsBroker]:
    broker = kafka_tls_front.start(tmp_path_factory.mktemp("tansu-tls"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def apache_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[apache.ApacheKafka]:
    try:
        java = apache.java_executable()
        jars = apache.broker_jars()
    except apache.BrokerUnavailable as exc:
        pytest.skip(f"no Apache Kafka broker here: {exc}")
    broker = apache.start(tmp_path_factory.mktemp("apache-kafka"), jars=jars, java=java)
    try:
        yield broker
    finally:
        broker.stop()


# ------------------------------------------------------------------------------ helpers


def platform(
    bootstrap: str,
    protocol: str,
    mechanism: str = "none",
    *,
    ca_file: str | None = None,
    username: str | None = None,
    password: str | None = None,
    registry_url: str = "http://127.0.0.1:8081",
) -> PlatformConfig:
    """platform.yaml with these kafka settings, loaded as `cdc` loads it."""
    kafka: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "schema_registry_url": registry_url,
        "security_protocol": protocol,
        "auth_mechanism": mechanism,
    }
    if ca_file is not None:
        kafka["ssl_ca_file"] = ca_file
    if username is not None:
        kafka["sasl_username"] = username
        kafka["sasl_password"] = password
    return loads_platform(yaml.safe_dump({"transport_mode": "kafka", "kafka": kafka}))


def read_back(kafka: KafkaConfig, topic: str, count: int) -> list[bytes]:
    consumer = Consumer(clients.consumer_settings(kafka, f"g-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe([topic])
    got: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT
    try:
        while len(got) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            value = message.value()
            assert value is not None
            got.append(value)
    finally:
        consumer.close()
    return got


def produce(
    kafka: KafkaConfig, topic: str, values: list[bytes], keys: list[bytes] | None = None
) -> None:
    failures: list[KafkaError] = []
    producer = Producer(clients.producer_settings(kafka))
    for i, value in enumerate(values):
        producer.produce(
            topic,
            key=keys[i] if keys else None,
            value=value,
            on_delivery=lambda err, _msg: failures.append(err) if err else None,
        )
    assert producer.flush(TIMEOUT) == 0
    assert failures == []


def round_trip(kafka: KafkaConfig) -> None:
    """The admin creates a topic, the producer writes, the consumer reads the same back."""
    topic = f"sec.{uuid.uuid4().hex[:8]}"
    created = TopicAdmin(kafka).ensure_topics([TopicSpec(topic, 1, 1)])
    assert created.created == [topic]
    sent = [f"message {i}".encode() for i in range(5)]
    produce(kafka, topic, sent)
    assert read_back(kafka, topic, len(sent)) == sent


def broker_health(config: PlatformConfig) -> tuple[ComponentHealth, float]:
    """The broker component of `cdc health` (without a pipeline) and how long it took."""
    started = time.monotonic()
    components = asyncio.run(kafka_ops.platform_health(config))
    (broker,) = [c for c in components if c.name == "broker"]
    return broker, time.monotonic() - started


def read_items_through_source(kafka: KafkaConfig, registry_url: str) -> list[str]:
    """Confluent-framed Avro changes produced with `kafka`'s settings, read back by the
    KafkaEventSource with the consumer settings the pipeline builds from the same config."""
    topic = f"cdc.public.items_{uuid.uuid4().hex[:8]}"
    TopicAdmin(kafka).ensure_topics([TopicSpec(topic, 1, 1)])
    registry = SchemaRegistry(registry_url)
    key_schema, value_schema = items_schemas(topic)
    key = Writer(key_schema, registry.register(f"{topic}-key", key_schema))
    value = Writer(value_schema, registry.register(f"{topic}-value", value_schema))
    ids = [1, 2, 3]
    produce(
        kafka,
        topic,
        [value(change("c", None, {"id": i, "name": f"n{i}"})) for i in ids],
        keys=[key({"id": i}) for i in ids],
    )
    settings = KafkaSourceSettings(
        consumer=clients.consumer_settings(kafka, f"g-{uuid.uuid4().hex[:8]}"),
        topics={topic: "public.items"},
        registry_url=registry_url,
        source_database="shop",
        poll_timeout_seconds=0.2,
    )

    async def scenario() -> list[str]:
        source = KafkaEventSource(settings)
        await source.start()
        chunks = source.chunks()
        names: list[str] = []
        try:
            while len(names) < len(ids):
                chunk = await asyncio.wait_for(anext(chunks), TIMEOUT)
                names += [str(ev.after[1]) for ev in chunk.row_view() if ev.after]
                if chunk.ack is not None:
                    await source.ack(lane_of(topic, 0), [chunk.ack])
            assert (await source.health()).status is Status.OK
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
            await source.stop()
        return names

    return asyncio.run(scenario())


# ------------------------------------------------------------- TLS (Tansu behind OpenSSL)


def test_ssl_with_the_ca_creates_writes_and_reads(tls_broker: kafka_tls_front.TlsBroker) -> None:
    config = platform(tls_broker.bootstrap_servers, "SSL", ca_file=tls_broker.ca_file)
    round_trip(config.kafka)
    health, _ = broker_health(config)
    assert health.status is Status.OK, health.detail


def test_ssl_with_another_ca_fails_the_handshake_clearly(
    tls_broker: kafka_tls_front.TlsBroker, tmp_path: Path
) -> None:
    other_ca = make_pki(tmp_path / "other")["ca"]
    config = platform(tls_broker.bootstrap_servers, "SSL", ca_file=other_ca)
    health, took = broker_health(config)
    assert health.status is Status.ERROR
    assert "certificate verify failed" in health.detail["error"], health.detail
    assert took < 10
    with pytest.raises(TopicAdminError, match="certificate verify failed"):
        TopicAdmin(config.kafka, timeout=2).ensure_topics([TopicSpec("never", 1, 1)])


def test_ssl_without_a_ca_does_not_trust_a_private_ca(
    tls_broker: kafka_tls_front.TlsBroker,
) -> None:
    """No ssl_ca_file: the system's trust store, which does not know the test CA."""
    config = platform(tls_broker.bootstrap_servers, "SSL")
    health, _ = broker_health(config)
    assert health.status is Status.ERROR
    assert "certificate verify failed" in health.detail["error"], health.detail


def test_the_kafka_source_reads_avro_over_ssl(
    tls_broker: kafka_tls_front.TlsBroker, schema_registry: Any
) -> None:
    config = platform(
        tls_broker.bootstrap_servers,
        "SSL",
        ca_file=tls_broker.ca_file,
        registry_url=schema_registry.url,
    )
    assert read_items_through_source(config.kafka, schema_registry.url) == ["n1", "n2", "n3"]


# ----------------------------------------------------------------------- Apache Kafka


SECURED = [
    ("SSL", "none"),
    ("SASL_PLAINTEXT", "sasl_plain"),
    ("SASL_SSL", "sasl_scram_256"),
    ("SASL_SSL", "sasl_scram_512"),
]


def apache_platform(
    broker: apache.ApacheKafka,
    protocol: str,
    mechanism: str,
    *,
    password: str | None = None,
    registry_url: str = "http://127.0.0.1:8081",
) -> PlatformConfig:
    sasl = mechanism != "none"
    return platform(
        broker.bootstrap(protocol),
        protocol,
        mechanism,
        ca_file=broker.ca_file if protocol.endswith("SSL") else None,
        username=broker.user.username if sasl else None,
        password=(password or broker.user.password) if sasl else None,
        registry_url=registry_url,
    )


@pytest.mark.parametrize(("protocol", "mechanism"), SECURED)
def test_apache_kafka_creates_writes_and_reads(
    apache_kafka: apache.ApacheKafka, protocol: str, mechanism: str
) -> None:
    config = apache_platform(apache_kafka, protocol, mechanism)
    round_trip(config.kafka)
    health, _ = broker_health(config)
    assert health.status is Status.OK, health.detail


@pytest.mark.parametrize("mechanism", ["sasl_plain", "sasl_scram_256", "sasl_scram_512"])
def test_apache_kafka_refuses_a_wrong_password_clearly(
    apache_kafka: apache.ApacheKafka, mechanism: str
) -> None:
    config = apache_platform(apache_kafka, "SASL_SSL", mechanism, password="not-the-password")
    health, took = broker_health(config)
    assert health.status is Status.ERROR
    assert "authentication" in health.detail["error"].lower(), health.detail
    assert took < 10


def test_apache_kafka_with_another_ca_fails_the_handshake_clearly(
    apache_kafka: apache.ApacheKafka, tmp_path: Path
) -> None:
    config = platform(
        apache_kafka.bootstrap("SASL_SSL"),
        "SASL_SSL",
        "sasl_scram_512",
        ca_file=make_pki(tmp_path / "other")["ca"],
        username=apache_kafka.user.username,
        password=apache_kafka.user.password,
    )
    health, took = broker_health(config)
    assert health.status is Status.ERROR
    assert "certificate verify failed" in health.detail["error"], health.detail
    assert took < 10


def test_the_kafka_source_reads_avro_over_sasl_ssl(
    apache_kafka: apache.ApacheKafka, schema_registry: Any
) -> None:
    config = apache_platform(
        apache_kafka, "SASL_SSL", "sasl_scram_512", registry_url=schema_registry.url
    )
    assert read_items_through_source(config.kafka, schema_registry.url) == ["n1", "n2", "n3"]
