"""Our local schema registry (services/stack/schema_registry.py) against Confluent's own client
(confluent-kafka's SchemaRegistryClient): what the AvroConverter and our consumer rely on."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("confluent_kafka", reason="confluent-kafka is in the kafka/stack/dev extras")
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from services.stack.schema_registry import make_server

V1 = {
    "type": "record",
    "name": "Value",
    "namespace": "cdc.public.orders",
    "fields": [{"name": "id", "type": "int"}, {"name": "note", "type": ["null", "string"]}],
}
# adds a field with a default: readers of v2 can read v1 data (BACKWARD compatible)
V2 = {**V1, "fields": [*V1["fields"], {"name": "qty", "type": "long", "default": 0}]}
# adds a field without a default: BACKWARD incompatible
V_BAD = {**V1, "fields": [*V1["fields"], {"name": "qty", "type": "long"}]}
# int -> long is a promotion a reader may do; long -> int is not
V_LONG_ID = {**V1, "fields": [{"name": "id", "type": "long"}, V1["fields"][1]]}


def _avro(schema: dict[str, object]) -> Schema:
    return Schema(json.dumps(schema), "AVRO")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[SchemaRegistryClient, str, Path]]:
    data_file = tmp_path / "schemas.json"
    server = make_server("127.0.0.1", 0, data_file)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield SchemaRegistryClient({"url": url}), url, data_file
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_register_and_look_up(registry: tuple[SchemaRegistryClient, str, Path]) -> None:
    client, _, _ = registry
    first = client.register_schema("orders-value", _avro(V1))
    assert client.register_schema("orders-value", _avro(V1)) == first  # idempotent
    second = client.register_schema("orders-value", _avro(V2))
    assert second != first
    assert json.loads(client.get_schema(first).schema_str) == V1
    assert client.get_subjects() == ["orders-value"]
    assert client.get_versions("orders-value") == [1, 2]
    latest = client.get_latest_version("orders-value")
    assert (latest.version, latest.schema_id) == (2, second)
    assert client.get_version("orders-value", 1).schema_id == first
    found = client.lookup_schema("orders-value", _avro(V2))
    assert found.version == 2
    # the same schema under another subject keeps its global id
    assert client.register_schema("other-value", _avro(V1)) == first


def test_backward_compatibility_is_enforced(
    registry: tuple[SchemaRegistryClient, str, Path],
) -> None:
    client, _, _ = registry
    client.register_schema("orders-value", _avro(V1))
    assert client.test_compatibility("orders-value", _avro(V2)) is True
    assert client.test_compatibility("orders-value", _avro(V_BAD)) is False
    assert client.test_compatibility("orders-value", _avro(V_LONG_ID), version=1) is True
    with pytest.raises(SchemaRegistryError) as caught:
        client.register_schema("orders-value", _avro(V_BAD))
    assert caught.value.http_status_code == 409
    assert "qty" in caught.value.error_message
    assert client.get_versions("orders-value") == [1]


def test_config_levels(registry: tuple[SchemaRegistryClient, str, Path]) -> None:
    client, _, _ = registry
    assert client.get_compatibility() == "BACKWARD"
    client.register_schema("orders-value", _avro(V_LONG_ID))
    # long -> int loses data: not BACKWARD, and FORWARD (old reads new) fails too
    narrowed = {**V1}
    assert client.test_compatibility("orders-value", _avro(narrowed)) is False
    client.set_compatibility("orders-value", "NONE")
    assert client.get_compatibility("orders-value") == "NONE"
    assert client.register_schema("orders-value", _avro(narrowed)) > 0
    client.set_compatibility(level="FULL")
    assert client.get_compatibility() == "FULL"


def test_errors_carry_confluent_codes(registry: tuple[SchemaRegistryClient, str, Path]) -> None:
    client, url, _ = registry
    with pytest.raises(SchemaRegistryError) as caught:
        client.get_schema(999)
    assert (caught.value.http_status_code, caught.value.error_code) == (404, 40403)
    with pytest.raises(SchemaRegistryError) as caught:
        client.get_latest_version("nope")
    assert caught.value.error_code == 40401
    request = urllib.request.Request(
        f"{url}/subjects/bad/versions",
        data=json.dumps({"schema": '{"type": "no_such_type"}'}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(request, timeout=5)
    assert http_error.value.code == 422
    assert json.loads(http_error.value.read())["error_code"] == 42201


def test_state_survives_a_restart(registry: tuple[SchemaRegistryClient, str, Path]) -> None:
    client, _, data_file = registry
    schema_id = client.register_schema("orders-value", _avro(V1))
    client.set_compatibility("orders-value", "FORWARD")
    again = make_server("127.0.0.1", 0, data_file)
    try:
        state = again.state
        assert json.loads(state.schema_by_id(schema_id)) == V1
        assert state.compatibility("orders-value") == "FORWARD"
        assert state.version("orders-value", "latest")["id"] == schema_id
    finally:
        again.server_close()


def test_basic_auth_is_required_when_configured(tmp_path: Path) -> None:
    server = make_server("127.0.0.1", 0, None, basic_auth=("reg-user", "reg-secret"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        good = SchemaRegistryClient({"url": url, "basic.auth.user.info": "reg-user:reg-secret"})
        assert good.register_schema("orders-value", _avro(V1)) == 1
        for config in ({"url": url}, {"url": url, "basic.auth.user.info": "reg-user:wrong"}):
            with pytest.raises(SchemaRegistryError) as caught:
                SchemaRegistryClient(config).get_subjects()
            assert caught.value.http_status_code == 401
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
