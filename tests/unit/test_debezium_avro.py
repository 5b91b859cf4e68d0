"""Debezium envelopes in Confluent-framed Avro -> events with PostgreSQL text values.

The schemas below are what Confluent's AvroConverter registers for Debezium 3 envelopes
(field attributes ``connect.name`` / ``connect.parameters`` / ``connect.type``, optional
fields as ``["null", T]``), the messages are written with fastavro's schemaless writer and
framed like the converter frames them. The registry here is a dict pre-filled with those
schemas (a stand-in at the schema-lookup boundary: the real registry client is exercised
by tests/integration/test_kafka_source.py).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from adapters.debezium.envelope import UNAVAILABLE, EnvelopeError, postgres_type
from adapters.kafka.avro import SchemaNotFoundError, SchemaRegistry, TopicDecoder, frame
from domain.blocks import build_blocks, events_of
from domain.events import UNCHANGED, Operation, Position
from domain.types import LogicalType
from tests.support.debezium_avro import envelope, source_block, source_schema, write
from tests.support.debezium_avro import field as _field
from tests.support.debezium_avro import opt as _opt

PG_ROW = [
    {"name": "id", "type": {"type": "long", "connect.default": 0}},
    _field("name", "string"),
    _field(
        "price",
        {
            "type": "bytes",
            "scale": 2,
            "precision": 12,
            "connect.version": 1,
            "connect.parameters": {"scale": "2", "connect.decimal.precision": "12"},
            "connect.name": "org.apache.kafka.connect.data.Decimal",
            "logicalType": "decimal",
        },
    ),
    _field("qty", {"type": "int", "connect.type": "int16"}),
    _field("ok", "boolean"),
    _field("ratio", "double"),
    _field("born", {"type": "int", "connect.version": 1, "connect.name": "io.debezium.time.Date"}),
    _field(
        "at",
        {"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.MicroTimestamp"},
    ),
    _field(
        "at_tz",
        {"type": "string", "connect.version": 1, "connect.name": "io.debezium.time.ZonedTimestamp"},
    ),
    _field(
        "wake", {"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.MicroTime"}
    ),
    _field(
        "span",
        {"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.MicroDuration"},
    ),
    _field(
        "uid", {"type": "string", "connect.version": 1, "connect.name": "io.debezium.data.Uuid"}
    ),
    _field(
        "doc", {"type": "string", "connect.version": 1, "connect.name": "io.debezium.data.Json"}
    ),
    _field("blob", "bytes"),
    _field("tags", {"type": "array", "items": _opt("string")}),
    _field(
        "amount",
        {
            "type": "record",
            "name": "VariableScaleDecimal",
            "namespace": "io.debezium.data",
            "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
            "connect.name": "io.debezium.data.VariableScaleDecimal",
        },
    ),
    _field("notes", "string"),
]
PG_KEY = {
    "type": "record",
    "name": "Key",
    "namespace": "cdc.public.orders",
    "fields": [{"name": "id", "type": {"type": "long", "connect.default": 0}}],
}


class DictRegistry(SchemaRegistry):
    def __init__(self, schemas: dict[int, dict[str, Any]]) -> None:
        super().__init__("http://registry.invalid")
        self._by_id.update(schemas)


PG_VALUE = envelope("cdc.public.orders", PG_ROW, "postgresql")


def _row(id_: int, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {f["name"]: None for f in PG_ROW}
    row["id"] = id_
    row.update(kw)
    return row


def _decoder() -> TopicDecoder:
    return TopicDecoder(DictRegistry({1: PG_KEY, 2: PG_VALUE}), "public", "orders", "shop")


def _message(
    op: str, before: dict[str, Any] | None, after: dict[str, Any] | None
) -> tuple[bytes, bytes]:
    key = write(PG_KEY, 1, {"id": (after or before or {"id": 0})["id"]})
    value = write(
        PG_VALUE,
        2,
        {
            "before": before,
            "after": after,
            "source": source_block(),
            "transaction": None,
            "op": op,
            "ts_ms": 1_700_000_000_200,
        },
    )
    return key, value


def test_a_postgres_insert_becomes_postgres_text_with_typed_columns() -> None:
    decoder = _decoder()
    row = _row(
        42,
        name="widget",
        price=Decimal("12.50"),
        qty=-3,
        ok=True,
        ratio=0.25,
        born=19_782,  # 2024-02-29
        at=1_709_214_307_500_000,
        at_tz="2024-02-29T13:45:07.5Z",
        wake=(13 * 3600 + 45 * 60 + 7) * 1_000_000 + 250_000,
        span=(3 * 86_400 + 4 * 3600 + 5 * 60 + 6) * 1_000_000 + 789_000,
        uid="a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        doc='{"a": [1, 2.5, null]}',
        blob=b"\x00\xff\x10",
        tags=["a b", None, 'c"d'],
        amount={"scale": 3, "value": (-12345).to_bytes(2, "big", signed=True)},
    )
    key, value = _message("c", None, row)
    out = decoder.decode(key, value, offset=17)
    ev = out.event
    assert ev is not None
    assert ev.operation is Operation.CREATE
    assert ev.position == Position(17, 0)
    assert ev.transaction_id == 777
    assert ev.commit_time_us == 1_700_000_000_123_000
    assert ev.table.qualified_name == "public.orders"
    assert ev.table.key_columns == ("id",)
    assert ev.after == (
        "42",
        "widget",
        "12.50",
        "-3",
        "t",
        "0.25",
        "2024-02-29",
        "2024-02-29 13:45:07.500000",
        "2024-02-29T13:45:07.5Z",
        "13:45:07.250000",
        "3 days 04:05:06.789000",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        '{"a": [1, 2.5, null]}',
        "\\x00ff10",
        '{"a b",NULL,"c\\"d"}',
        "-12.345",
        None,
    )
    types = {c.name: (c.logical_type, c.type_name) for c in ev.table.columns}
    assert types["id"] == ("int64", "bigint")
    assert types["price"] == ("decimal(12,2)", "numeric(12,2)")
    assert types["qty"] == ("int16", "smallint")
    assert types["at"] == ("timestamp", "timestamp")
    assert types["at_tz"] == ("timestamptz", "timestamp with time zone")
    assert types["span"] == ("interval", "interval")
    assert types["doc"] == ("json", "jsonb")
    assert types["tags"] == ("list<string>", "text[]")
    assert types["amount"] == ("decimal", "numeric")
    # The first shape of a table is announced, but it is not a change.
    assert out.schema_change is not None and not out.schema_change.is_change


def test_updates_deletes_truncates_and_tombstones() -> None:
    decoder = _decoder()
    key, value = _message("u", _row(1, name="old"), _row(1, name="new"))
    ev = decoder.decode(key, value, 1).event
    assert ev is not None and ev.operation is Operation.UPDATE
    assert ev.after is not None and ev.after[1] == "new"
    assert ev.before is not None and ev.before[1] == "old"
    key, value = _message("d", _row(1), None)
    ev = decoder.decode(key, value, 2).event
    assert ev is not None and ev.operation is Operation.DELETE and ev.after is None
    assert ev.key == {"id": "1"}
    assert decoder.decode(key, None, 3).event is None  # tombstone
    value = write(
        PG_VALUE,
        2,
        {
            "before": None,
            "after": None,
            "source": source_block(),
            "transaction": None,
            "op": "t",
            "ts_ms": None,
        },
    )
    ev = decoder.decode(None, value, 4).event
    assert ev is not None and ev.operation is Operation.TRUNCATE
    key, value = _message("r", None, _row(5))
    ev = decoder.decode(key, value, 5).event
    assert ev is not None and ev.operation is Operation.READ


def test_an_unchanged_toasted_value_is_unchanged_not_null() -> None:
    decoder = _decoder()
    key, value = _message("u", None, _row(9, notes=UNAVAILABLE, name=None))
    ev = decoder.decode(key, value, 1).event
    assert ev is not None and ev.after is not None
    assert ev.after[16] is UNCHANGED and ev.after[1] is None
    block = build_blocks([ev])[0]
    ((_, again),) = events_of(block)
    assert again.after == ev.after


def test_events_build_postgres_text_blocks() -> None:
    decoder = _decoder()
    events = []
    for i in range(5):
        key, value = _message("c", None, _row(i, name=f"n{i}", price=Decimal(i)))
        ev = decoder.decode(key, value, i).event
        assert ev is not None
        events.append(ev)
    (block,) = build_blocks(events)
    assert block.column(0).to_pylist() == ["0", "1", "2", "3", "4"]
    assert block.column(2).to_pylist() == ["0.00", "1.00", "2.00", "3.00", "4.00"]


def test_an_added_column_is_a_schema_change() -> None:
    grown = envelope("cdc.public.orders", [*PG_ROW, _field("color", "string")], "postgresql")
    registry = DictRegistry({1: PG_KEY, 2: PG_VALUE, 3: grown})
    decoder = TopicDecoder(registry, "public", "orders", "shop")
    key, value = _message("c", None, _row(1))
    decoder.decode(key, value, 1)
    row = {**_row(2), "color": "red"}
    value = write(
        grown,
        3,
        {
            "before": None,
            "after": row,
            "source": source_block(),
            "transaction": None,
            "op": "c",
            "ts_ms": None,
        },
    )
    out = decoder.decode(key, value, 2)
    assert out.schema_change is not None and out.schema_change.added == ("color",)
    assert out.event is not None and out.event.after is not None
    assert out.event.after[-1] == "red"
    # The old shape again (an older writer's message) is a change back, not a crash.
    key, value = _message("c", None, _row(3))
    back = decoder.decode(key, value, 3)
    assert back.schema_change is not None and back.schema_change.dropped == ("color",)


MYSQL_ROW = [
    {"name": "id", "type": "int"},
    _field(
        "made", {"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.Timestamp"}
    ),
    _field(
        "day",
        {
            "type": "int",
            "connect.version": 1,
            "connect.name": "org.apache.kafka.connect.data.Date",
            "logicalType": "date",
        },
    ),
    _field("flag", {"type": "int", "connect.type": "int16"}),
    _field(
        "kind",
        {
            "type": "string",
            "connect.version": 1,
            "connect.parameters": {"allowed": "a,b"},
            "connect.name": "io.debezium.data.Enum",
        },
    ),
]


def test_a_mysql_row() -> None:
    value_schema = envelope("cdc.inventory.items", MYSQL_ROW, "mysql")
    key_schema = {
        "type": "record",
        "name": "Key",
        "namespace": "cdc.inventory.items",
        "fields": [{"name": "id", "type": "int"}],
    }
    decoder = TopicDecoder(
        DictRegistry({5: key_schema, 6: value_schema}), "inventory", "items", "inventory"
    )
    import datetime as dt

    row = {"id": 7, "made": 1_709_214_307_000, "day": dt.date(2024, 2, 29), "flag": 1, "kind": "b"}
    value = write(
        value_schema,
        6,
        {
            "before": None,
            "after": row,
            "source": source_block(connector="mysql", db="inventory", schema=None, txId=None),
            "transaction": None,
            "op": "c",
            "ts_ms": None,
        },
    )
    ev = decoder.decode(write(key_schema, 5, {"id": 7}), value, 0).event
    assert ev is not None
    assert ev.after == ("7", "2024-02-29 13:45:07", "2024-02-29", "1", "b")
    assert ev.transaction_id == 0
    assert [c.type_name for c in ev.table.columns] == [
        "integer",
        "timestamp",
        "date",
        "smallint",
        "text",
    ]


def test_a_mongodb_document() -> None:
    json_t = {"type": "string", "connect.version": 1, "connect.name": "io.debezium.data.Json"}
    value_schema = {
        "type": "record",
        "name": "Envelope",
        "namespace": "cdc.shop.users",
        "fields": [
            {"name": "before", "type": ["null", json_t], "default": None},
            {"name": "after", "type": ["null", json_t], "default": None},
            {"name": "updateDescription", "type": ["null", "string"], "default": None},
            {"name": "source", "type": source_schema("mongodb")},
            {"name": "op", "type": ["null", "string"], "default": None},
            _field("ts_ms", "long"),
        ],
    }
    key_schema = {
        "type": "record",
        "name": "Key",
        "namespace": "cdc.shop.users",
        "fields": [{"name": "id", "type": "string"}],
    }
    decoder = TopicDecoder(DictRegistry({8: key_schema, 9: value_schema}), "shop", "users", "shop")
    doc = '{"_id": {"$oid": "65f0c0ffee"}, "name": "ann"}'
    key = write(key_schema, 8, {"id": '{"$oid": "65f0c0ffee"}'})
    value = write(
        value_schema,
        9,
        {
            "before": None,
            "after": doc,
            "updateDescription": None,
            "source": source_block(connector="mongodb", collection="users"),
            "op": "c",
            "ts_ms": None,
        },
    )
    ev = decoder.decode(key, value, 3).event
    assert ev is not None and ev.after == ('{"$oid": "65f0c0ffee"}', doc)
    assert ev.table.key_columns == ("_id",)
    value = write(
        value_schema,
        9,
        {
            "before": None,
            "after": None,
            "updateDescription": None,
            "source": source_block(connector="mongodb"),
            "op": "d",
            "ts_ms": None,
        },
    )
    ev = decoder.decode(key, value, 4).event
    assert ev is not None and ev.operation is Operation.DELETE
    assert ev.key == {"_id": '{"$oid": "65f0c0ffee"}'}


def test_a_sqlserver_row() -> None:
    row = [
        {"name": "id", "type": "int"},
        _field(
            "at",
            {
                "type": "long",
                "connect.version": 1,
                "connect.name": "io.debezium.time.NanoTimestamp",
            },
        ),
    ]
    value_schema = envelope("cdc.testDB.dbo.items", row, "sqlserver")
    decoder = TopicDecoder(DictRegistry({10: value_schema}), "dbo", "items", "testDB")
    value = write(
        value_schema,
        10,
        {
            "before": None,
            "after": {"id": 1, "at": 1_709_214_307_123_456_789},
            "source": source_block(connector="sqlserver", txId=None),
            "transaction": None,
            "op": "c",
            "ts_ms": None,
        },
    )
    ev = decoder.decode(None, value, 0).event
    assert ev is not None and ev.after == ("1", "2024-02-29 13:45:07.123456")
    assert ev.table.key_columns == ()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x01\x00\x00\x00\x02abc", "magic byte 1"),
        (b"\x00\x00", "not Confluent-framed"),
        (frame(2, b"\x02"), "does not decode with schema id 2"),
    ],
)
def test_undecodable_messages_raise_envelope_errors(data: bytes, message: str) -> None:
    with pytest.raises(EnvelopeError, match=message):
        _decoder().decode(None, data, 0)


def test_an_unknown_schema_id_is_poison() -> None:
    class Missing(DictRegistry):
        def _request(self, method: str, path: str, body: Any = None) -> Any:
            raise LookupError(path)  # what the client raises for the registry's 404

    decoder = TopicDecoder(Missing({}), "public", "orders", "shop")
    with pytest.raises(SchemaNotFoundError, match="schema id 2 is not in the registry"):
        decoder.decode(None, frame(2, b""), 0)


def test_a_value_that_is_not_an_envelope_is_refused() -> None:
    plain = {"type": "record", "name": "Plain", "fields": [{"name": "x", "type": "int"}]}
    decoder = TopicDecoder(DictRegistry({4: plain}), "public", "orders", "shop")
    with pytest.raises(EnvelopeError, match="not a Debezium envelope"):
        decoder.decode(None, write(plain, 4, {"x": 1}), 0)


def test_postgres_types_of_logical_types() -> None:
    assert postgres_type(LogicalType.parse("list<decimal(5,1)>")) == "numeric(5,1)[]"
    assert postgres_type(LogicalType.parse("timestamptz")) == "timestamp with time zone"
    assert json.loads(json.dumps({"ok": 1}))  # json round trip used by struct values
