"""Each local-stack launcher (services/stack/): starts on a free 127.0.0.1 port, answers like
the real thing, and stop() leaves no process and no listening port behind."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from services.net import find_free_port
from services.stack.process import LaunchError, port_open


def _assert_gone(pids: list[int], ports: list[int]) -> None:
    alive = [pid for pid in pids if _running(pid)]
    assert alive == [], f"processes still running: {alive}"
    listening = {
        conn.laddr.port
        for conn in psutil.net_connections("tcp")
        if conn.status == psutil.CONN_LISTEN
    }
    assert listening.isdisjoint(ports), f"ports still listening: {listening & set(ports)}"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group(pid: int) -> list[int]:
    parent = psutil.Process(pid)
    return [pid, *(child.pid for child in parent.children(recursive=True))]


def test_tansu_serves_kafka_and_stops_cleanly(tmp_path: Path) -> None:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from services.stack import tansu

    broker = tansu.start(tmp_path)
    pids = _group(broker.process.pid)
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
    _assert_gone(pids, [broker.port])


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
    pids = _group(server.process.pid)
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
    _assert_gone(pids, [server.port])
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
