"""Debezium-shaped Avro for tests and benchmarks: envelope schemas as Confluent's
AvroConverter registers them for Debezium 3 (``connect.name`` / ``connect.parameters`` /
``connect.type`` attributes, optional fields as ``["null", T]``), and messages written with
fastavro's schemaless writer in the Confluent framing."""

from __future__ import annotations

import io
from typing import Any

import fastavro

from adapters.kafka.avro import frame


def opt(t: Any) -> list[Any]:
    return ["null", t]


def field(name: str, t: Any, optional: bool = True) -> dict[str, Any]:
    f: dict[str, Any] = {"name": name, "type": opt(t) if optional else t}
    if optional:
        f["default"] = None
    return f


def source_schema(connector: str) -> dict[str, Any]:
    fields = [
        field("version", "string", False),
        field("connector", "string", False),
        field("name", "string", False),
        field("ts_ms", "long", False),
        field("db", "string", False),
        field("schema", "string"),
        field("table", "string"),
        field("txId", "long"),
        field("lsn", "long"),
        field("collection", "string"),
    ]
    return {
        "type": "record",
        "name": "Source",
        "namespace": f"io.debezium.connector.{connector}",
        "fields": fields,
    }


def envelope(namespace: str, row_fields: list[dict[str, Any]], connector: str) -> dict[str, Any]:
    value = {
        "type": "record",
        "name": "Value",
        "namespace": namespace,
        "fields": row_fields,
        "connect.name": f"{namespace}.Value",
    }
    block = {
        "type": "record",
        "name": "block",
        "namespace": "event",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "total_order", "type": "long"},
            {"name": "data_collection_order", "type": "long"},
        ],
    }
    return {
        "type": "record",
        "name": "Envelope",
        "namespace": namespace,
        "fields": [
            {"name": "before", "type": ["null", value], "default": None},
            {"name": "after", "type": ["null", "Value"], "default": None},
            {"name": "source", "type": source_schema(connector)},
            {"name": "transaction", "type": ["null", block], "default": None},
            {"name": "op", "type": "string"},
            field("ts_ms", "long"),
        ],
        "connect.name": f"{namespace}.Envelope",
    }


def key_schema(namespace: str, fields: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "record", "name": "Key", "namespace": namespace, "fields": fields}


def source_block(**kw: Any) -> dict[str, Any]:
    base = {
        "version": "3.6",
        "connector": "postgresql",
        "name": "cdc",
        "ts_ms": 1_700_000_000_123,
        "db": "shop",
        "schema": "public",
        "table": "orders",
        "txId": 777,
        "lsn": 1234,
        "collection": None,
    }
    base.update(kw)
    return base


def write(schema: dict[str, Any], schema_id: int, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    return frame(schema_id, out.getvalue())


class Writer:
    """Writes records of one schema fast (the schema parsed once)."""

    def __init__(self, schema: dict[str, Any], schema_id: int) -> None:
        self.schema = schema
        self.parsed = fastavro.parse_schema(schema)
        self.header = frame(schema_id, b"")

    def __call__(self, record: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        out.write(self.header)
        fastavro.schemaless_writer(out, self.parsed, record)
        return out.getvalue()


# A small table: items(id bigint primary key, name text).
ITEMS_ROW = [
    {"name": "id", "type": {"type": "long", "connect.default": 0}},
    field("name", "string"),
]
ITEMS_KEY_FIELDS = [{"name": "id", "type": {"type": "long", "connect.default": 0}}]


def items_schemas(topic: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(key schema, value schema) of the items table's topic."""
    return key_schema(topic, ITEMS_KEY_FIELDS), envelope(topic, ITEMS_ROW, "postgresql")


def change(
    op: str, before: dict[str, Any] | None, after: dict[str, Any] | None, **source: Any
) -> dict[str, Any]:
    return {
        "before": before,
        "after": after,
        "source": source_block(**source),
        "transaction": None,
        "op": op,
        "ts_ms": 1_700_000_000_200,
    }
