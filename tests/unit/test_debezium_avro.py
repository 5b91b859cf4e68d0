"""Debezium envelopes in Confluent-framed Avro -> typed (``arrow``-encoded) change blocks.

The schemas below are what Confluent's AvroConverter registers for Debezium 3 envelopes
(field attributes ``connect.name`` / ``connect.parameters`` / ``connect.type``, optional
fields as ``["null", T]``), the messages are written with fastavro's schemaless writer and
framed like the converter frames them. The registry here is a dict pre-filled with those
schemas (a stand-in at the schema-lookup boundary: the real registry client is exercised
by tests/integration/test_kafka_source.py).
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from adapters.debezium.block_builder import build_blocks
from adapters.debezium.columns import INFINITY_US, MINUS_INFINITY_US
from adapters.debezium.envelope import UNAVAILABLE, EnvelopeError, postgres_type
from adapters.kafka.avro import (
    SchemaNotFoundError,
    SchemaRegistry,
    TopicDecoder,
    _without_logical_types,
    frame,
)
from domain.blocks import ENCODING_ARROW, IMAGE_AFTER, IMAGE_BEFORE, arrow_schema
from domain.events import Operation
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


def _block(decoder: TopicDecoder, *messages: tuple[bytes | None, bytes], first: int = 0) -> Any:
    changes = []
    for offset, (key, value) in enumerate(messages, start=first):
        change = decoder.decode(key, value, offset).change
        assert change is not None
        changes.append(change)
    built = build_blocks(changes)
    assert not built.rejected, built.rejected
    (block,) = built.blocks
    assert block.encoding == ENCODING_ARROW
    assert block.records.schema == arrow_schema(block.schema, ENCODING_ARROW)
    return block


def _values(block: Any, name: str) -> list[Any]:
    return block.records.column(name).to_pylist()


def _raw(block: Any, name: str) -> list[Any]:
    """A temporal column's int64 values (for values Python's datetime cannot hold)."""
    return block.records.column(name).cast(pa.int64()).to_pylist()


UTC = dt.UTC


def test_a_postgres_insert_becomes_a_typed_block() -> None:
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
    out = decoder.decode(*_message("c", None, row), offset=17)
    assert out.change is not None
    # The first shape of a table is announced, but it is not a change.
    assert out.schema_change is not None and not out.schema_change.is_change
    (block,) = build_blocks([out.change]).blocks
    rb = block.records
    assert rb.schema.field("price").type == pa.decimal128(12, 2)
    types = {f.name: f.type for f in rb.schema}
    assert types["id"] == pa.int64() and types["qty"] == pa.int16()
    assert types["ok"] == pa.bool_() and types["ratio"] == pa.float64()
    assert types["born"] == pa.date32() and types["at"] == pa.timestamp("us")
    assert types["at_tz"] == pa.timestamp("us", tz="UTC")
    assert types["wake"] == pa.time64("us") and types["span"] == pa.duration("us")
    assert types["uid"] == types["doc"] == types["name"] == types["amount"] == pa.string()
    assert types["blob"] == pa.binary() and types["tags"] == pa.list_(pa.string())
    (got,) = rb.to_pylist()
    assert {k: v for k, v in got.items() if not k.startswith("@")} == {
        "id": 42,
        "name": "widget",
        "price": Decimal("12.50"),
        "qty": -3,
        "ok": True,
        "ratio": 0.25,
        "born": dt.date(2024, 2, 29),
        "at": dt.datetime(2024, 2, 29, 13, 45, 7, 500_000),
        "at_tz": dt.datetime(2024, 2, 29, 13, 45, 7, 500_000, tzinfo=UTC),
        "wake": dt.time(13, 45, 7, 250_000),
        "span": dt.timedelta(days=3, hours=4, minutes=5, seconds=6, microseconds=789_000),
        "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "doc": '{"a": [1, 2.5, null]}',
        "blob": b"\x00\xff\x10",
        "tags": ["a b", None, 'c"d'],
        "amount": "-12.345",
        "notes": None,
    }
    assert got["@index"] == 0 and got["@op"] == "c" and got["@position"] == 17
    assert got["@sequence"] == 0 and got["@xid"] == 777 and got["@lane"] == 0
    assert got["@commit_time"] == dt.datetime(2023, 11, 14, 22, 13, 20, 123_000, tzinfo=UTC)
    assert got["@image"] == IMAGE_AFTER and got["@unchanged"] is None and got["@before"] is None
    columns = {c.name: (c.logical_type, c.type_name) for c in block.schema.columns}
    assert columns["price"] == ("decimal(12,2)", "numeric(12,2)")
    assert columns["at_tz"] == ("timestamptz", "timestamp with time zone")
    assert columns["tags"] == ("list<string>", "text[]")
    assert columns["amount"] == ("decimal", "numeric")
    assert block.schema.key_columns == ("id",)


def test_all_null_values_stay_null_in_every_type() -> None:
    block = _block(_decoder(), _message("c", None, _row(1)))
    (got,) = block.records.to_pylist()
    assert [v for k, v in got.items() if not k.startswith("@") and k != "id"] == [None] * 16


def _typed_envelope(fields: list[dict[str, Any]], name: str = "cdc.public.kinds") -> Any:
    return envelope(name, [{"name": "id", "type": "long"}, *fields], "postgresql")


def _one_table(
    fields: list[dict[str, Any]], *rows: dict[str, Any], ts_us: int | None = None
) -> Any:
    value_schema = _typed_envelope(fields)
    if ts_us is not None:
        source = value_schema["fields"][2]["type"]
        source["fields"] = [*source["fields"], _field("ts_us", "long")]
    decoder = TopicDecoder(DictRegistry({30: value_schema}), "public", "kinds", "shop")
    messages = []
    for i, row in enumerate(rows):
        source = source_block()
        if ts_us is not None:
            source["ts_us"] = ts_us
        record = {"before": None, "after": {"id": i, **row}, "source": source}
        record.update(transaction=None, op="c", ts_ms=None)
        messages.append((None, write(value_schema, 30, record)))
    return _block(decoder, *messages)


def _named(t: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"type": t, "connect.version": 1, "connect.name": name, **extra}


def test_the_other_debezium_logical_types() -> None:
    point = {
        "type": "record",
        "name": "Point",
        "namespace": "io.debezium.data.geometry",
        "fields": [
            {"name": "x", "type": "double"},
            {"name": "y", "type": "double"},
            {"name": "wkb", "type": ["null", "bytes"], "default": None},
            {"name": "srid", "type": ["null", "int"], "default": None},
        ],
        "connect.name": "io.debezium.data.geometry.Point",
    }
    fields = [
        _field("ms", _named("long", "io.debezium.time.Timestamp")),
        _field("ns", _named("long", "io.debezium.time.NanoTimestamp")),
        _field("t_ms", _named("int", "io.debezium.time.Time")),
        _field("t_ns", _named("long", "io.debezium.time.NanoTime")),
        _field("ttz", _named("string", "io.debezium.time.ZonedTime")),
        _field("iv", _named("string", "io.debezium.time.Interval")),
        _field(
            "loose",  # a Connect Decimal without precision: its exact text
            {
                "type": "bytes",
                "scale": 3,
                "precision": 64,
                "connect.parameters": {"scale": "3"},
                "connect.name": "org.apache.kafka.connect.data.Decimal",
                "logicalType": "decimal",
            },
        ),
        _field("kind", _named("string", "io.debezium.data.Enum")),
        _field("kinds", _named("string", "io.debezium.data.EnumSet")),
        _field("x", _named("string", "io.debezium.data.Xml")),
        _field("bits", _named("bytes", "io.debezium.data.Bits")),
        _field("small", {"type": "int", "connect.type": "int8"}),
        _field("f", "float"),
        _field("where", point),
        _field("attrs", {"type": "map", "values": _opt("string")}),
        _field("days", {"type": "array", "items": _opt(_named("int", "io.debezium.time.Date"))}),
        _field("prices", {"type": "array", "items": _opt(PG_ROW[2]["type"][1])}),
    ]
    block = _one_table(
        fields,
        {
            "ms": 1_709_214_307_123,
            "ns": 1_709_214_307_123_456_789,
            "t_ms": 45_296_789,
            "t_ns": 45_296_789_123_999,
            "ttz": "13:45:07.5Z",
            "iv": "P1Y2M3DT4H5M6.78S",
            "loose": Decimal("-1.250"),
            "kind": "b",
            "kinds": "a,b",
            "x": "<a/>",
            "bits": b"\x05",
            "small": -128,
            "f": 1.5,
            "where": {"x": 1.0, "y": 2.0, "wkb": b"\x01", "srid": 4326},
            "attrs": {"k": "v"},
            "days": [0, None, -1],
            "prices": [Decimal("1.00"), None],
        },
    )
    rb = block.records
    types = {f.name: f.type for f in rb.schema}
    assert types["ms"] == types["ns"] == pa.timestamp("us")
    assert types["t_ms"] == types["t_ns"] == pa.time64("us")
    assert types["iv"] == pa.duration("us") and types["small"] == pa.int8()
    assert types["f"] == pa.float32() and types["bits"] == pa.binary()
    assert types["days"] == pa.list_(pa.date32())
    assert types["prices"] == pa.list_(pa.decimal128(12, 2))
    (got,) = rb.to_pylist()
    assert got["ms"] == dt.datetime(2024, 2, 29, 13, 45, 7, 123_000)
    assert got["ns"] == dt.datetime(2024, 2, 29, 13, 45, 7, 123_456)
    assert got["t_ms"] == dt.time(12, 34, 56, 789_000)
    assert got["t_ns"] == dt.time(12, 34, 56, 789_123)
    assert got["ttz"] == "13:45:07.5Z"
    # a year as 12 months of 30 days (domain/arrow_types.py)
    assert got["iv"] == dt.timedelta(days=360 + 60 + 3, hours=4, minutes=5, seconds=6.78)
    assert got["loose"] == "-1.250"
    assert (got["kind"], got["kinds"], got["x"]) == ("b", "a,b", "<a/>")
    assert got["bits"] == b"\x05" and got["small"] == -128 and got["f"] == 1.5
    assert json.loads(got["where"]) == {"x": 1.0, "y": 2.0, "wkb": "01", "srid": 4326}
    assert json.loads(got["attrs"]) == {"k": "v"}
    assert got["days"] == [dt.date(1970, 1, 1), None, dt.date(1969, 12, 31)]
    assert got["prices"] == [Decimal("1.00"), None]
    columns = {c.name: c.logical_type for c in block.schema.columns}
    assert columns["loose"] == "decimal" and columns["where"] == columns["attrs"] == "json"
    assert columns["ttz"] == "timetz" and columns["bits"] == "bytes"


def test_negative_timestamps_round_down_and_infinity_is_representable() -> None:
    fields = [
        _field("us", PG_ROW[7]["type"][1]),
        _field("ms", _named("long", "io.debezium.time.Timestamp")),
        _field("ns", _named("long", "io.debezium.time.NanoTimestamp")),
        _field("tz", PG_ROW[8]["type"][1]),
    ]
    block = _one_table(
        fields,
        {"us": -1, "ms": -1, "ns": -1, "tz": "1969-12-31T23:59:59.999999Z"},
        {
            "us": 9223372036825200000,  # what Debezium sends for PostgreSQL's infinity
            "ms": 9223372036825200000,
            "ns": -9223372036832400000,
            "tz": "infinity",
        },
        {"us": -9223372036832400000, "ms": None, "ns": 1_500, "tz": "-infinity"},
        {"us": 0, "ms": 0, "ns": -1_500, "tz": "+10000-01-01T00:00:00+01:00"},
    )
    assert _raw(block, "us") == [-1, INFINITY_US, MINUS_INFINITY_US, 0]
    assert _raw(block, "ms") == [-1000, INFINITY_US, None, 0]
    assert _raw(block, "ns") == [-1, MINUS_INFINITY_US, 1, -2]
    assert _raw(block, "tz") == [-1, INFINITY_US, MINUS_INFINITY_US, 253402297200000000]


def test_updates_deletes_truncates_reads_and_tombstones() -> None:
    decoder = _decoder()
    messages = [
        _message("u", _row(1, name="old", price=Decimal("1.10")), _row(1, name="new")),
        _message("d", _row(1, name="gone"), None),
        _message("r", None, _row(5)),
        _message("u", None, _row(6, name="no before")),
    ]
    assert decoder.decode(messages[1][0], None, 9).change is None  # a tombstone
    truncate = write(
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
    block = _block(decoder, *messages, (None, truncate), first=3)
    rb = block.records
    assert _values(block, "@op") == ["u", "d", "r", "u", "t"]
    assert _values(block, "@position") == [3, 4, 5, 6, 7]
    assert _values(block, "@index") == [0, 1, 2, 3, 4]
    both = IMAGE_AFTER | IMAGE_BEFORE
    assert _values(block, "@image") == [both, IMAGE_BEFORE, IMAGE_AFTER, IMAGE_AFTER, 0]
    assert _values(block, "name") == ["new", "gone", None, "no before", None]
    assert _values(block, "id") == [1, 1, 5, 6, None]
    before = rb.column("@before")
    assert before.type == pa.struct(list(arrow_schema(block.schema, ENCODING_ARROW))[10:])
    assert before.is_valid().to_pylist() == [True, False, False, False, False]
    old = before.to_pylist()[0]
    assert old["name"] == "old" and old["price"] == Decimal("1.10") and old["id"] == 1


def _truncate_message() -> bytes:
    return write(
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


class SubjectRegistry(DictRegistry):
    """A registry that also answers the newest version of its subjects."""

    def __init__(self, schemas: dict[int, dict[str, Any]], latest: dict[str, int]) -> None:
        super().__init__(schemas)
        self.latest = latest

    def version(self, subject: str, version: int | str) -> dict[str, Any]:
        assert version == "latest"
        if subject not in self.latest:
            raise LookupError(subject)
        return {"subject": subject, "id": self.latest[subject], "version": 1}


def test_a_truncate_read_first_keeps_the_key_the_registry_holds_for_the_topic() -> None:
    """A restarted ingest whose first message is a truncate (no message key) must not
    take the keyed table for a keyless one: its next keyed message would then change the
    table's key, an incompatible schema change."""
    registry = SubjectRegistry({1: PG_KEY, 2: PG_VALUE}, {"cdc.public.orders-key": 1})
    decoder = TopicDecoder(registry, "public", "orders", "shop", "cdc.public.orders")
    truncated = decoder.decode(None, _truncate_message(), 7)
    assert truncated.change is not None and truncated.change.operation is Operation.TRUNCATE
    assert decoder.table is not None and decoder.table.key_columns == ("id",)
    key, value = _message("c", None, _row(8))
    assert decoder.decode(key, value, 8).schema_change is None  # the same table
    # A table without a key has no key subject: its truncate stays keyless.
    keyless = TopicDecoder(SubjectRegistry({2: PG_VALUE}, {}), "public", "orders", "shop", "t")
    keyless.decode(None, _truncate_message(), 1)
    assert keyless.table is not None and keyless.table.key_columns == ()


def test_commit_time_prefers_ts_us() -> None:
    block = _one_table([], {}, ts_us=1_700_000_000_123_456)
    assert _raw(block, "@commit_time") == [1_700_000_000_123_456]


def test_unchanged_toasted_values_are_null_and_listed() -> None:
    decoder = _decoder()
    placeholder_bytes = UNAVAILABLE.encode()
    after = _row(9, notes=UNAVAILABLE, name=None, blob=placeholder_bytes, tags=[UNAVAILABLE])
    before = _row(9, doc=UNAVAILABLE, notes="old")
    block = _block(
        decoder,
        _message("u", before, after),
        _message("c", None, _row(10, notes="here", tags=["x"])),
    )
    names = block.schema.column_names
    n = len(names)
    assert _values(block, "@unchanged") == [
        [names.index("blob"), names.index("tags"), names.index("notes"), n + names.index("doc")],
        None,
    ]
    assert _values(block, "notes") == [None, "here"]
    assert _values(block, "blob") == [None, None]
    assert _values(block, "tags") == [None, ["x"]]
    old = block.records.column("@before").to_pylist()[0]
    assert old["doc"] is None and old["notes"] == "old"


def test_an_unchanged_decimal_is_null_and_listed() -> None:
    raw_value = _without_logical_types(PG_VALUE)
    key = write(PG_KEY, 1, {"id": 1})
    row = _row(1, price=UNAVAILABLE.encode())
    record = {"before": None, "after": row, "source": source_block(), "transaction": None}
    value = write(raw_value, 2, {**record, "op": "u", "ts_ms": None})
    block = _block(_decoder(), (key, value))
    assert _values(block, "price") == [None]
    assert _values(block, "@unchanged") == [[block.schema.column_names.index("price")]]


def _raw_message(offset_id: int, **values: Any) -> tuple[bytes, bytes]:
    """A message written without the logical types (values in Connect's raw form)."""
    row = _row(offset_id, **values)
    record = {"before": None, "after": row, "source": source_block(), "transaction": None}
    key = write(PG_KEY, 1, {"id": offset_id})
    return key, write(_without_logical_types(PG_VALUE), 2, {**record, "op": "c", "ts_ms": None})


def test_a_value_its_column_cannot_hold_rejects_only_its_message() -> None:
    decoder = _decoder()
    too_wide = (10**12).to_bytes(6, "big", signed=True)  # 10000000000.00 > numeric(12,2)
    messages = [
        _raw_message(1, price=(150).to_bytes(2, "big", signed=True)),
        _raw_message(2, price=too_wide),
        _raw_message(3, at_tz="not a time"),
        _raw_message(4, name="fine"),
    ]
    changes = []
    for offset, (key, value) in enumerate(messages):
        change = decoder.decode(key, value, offset).change
        assert change is not None
        changes.append(change)
    built = build_blocks(changes)
    assert [(c.offset, "decimal(12,2)" in why) for c, why in built.rejected] == [
        (1, True),
        (2, False),
    ]
    assert "public.orders" in built.rejected[1][1]
    (block,) = built.blocks
    assert _values(block, "@position") == [0, 3]
    assert _values(block, "@index") == [0, 1]
    assert _values(block, "price") == [Decimal("1.50"), None]


def test_a_shape_change_mid_poll_starts_a_new_block() -> None:
    grown = envelope("cdc.public.orders", [*PG_ROW, _field("color", "string")], "postgresql")
    registry = DictRegistry({1: PG_KEY, 2: PG_VALUE, 3: grown})
    decoder = TopicDecoder(registry, "public", "orders", "shop")
    key, value = _message("c", None, _row(1))
    first = decoder.decode(key, value, 1)
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
    second = decoder.decode(key, value, 2)
    assert second.schema_change is not None and second.schema_change.added == ("color",)
    # The old shape again (an older writer's message) is a change back, not a crash.
    key, value = _message("c", None, _row(3))
    third = decoder.decode(key, value, 3)
    assert third.schema_change is not None and third.schema_change.dropped == ("color",)
    changes = [d.change for d in (first, second, third)]
    assert all(c is not None for c in changes)
    blocks = build_blocks([c for c in changes if c is not None]).blocks
    assert [len(b) for b in blocks] == [1, 1, 1]
    assert [_values(b, "@index") for b in blocks] == [[0], [1], [2]]
    assert _values(blocks[1], "color") == ["red"]
    assert blocks[0].schema is blocks[2].schema


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
    block = _block(decoder, (write(key_schema, 5, {"id": 7}), value))
    (got,) = block.records.to_pylist()
    assert [got[c] for c in ("id", "made", "day", "flag", "kind")] == [
        7,
        dt.datetime(2024, 2, 29, 13, 45, 7),
        dt.date(2024, 2, 29),
        1,
        "b",
    ]
    assert got["@xid"] == 0
    assert [c.type_name for c in block.schema.columns] == [
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
    created = write(
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
    deleted = write(
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
    block = _block(decoder, (key, created), (key, deleted))
    assert _values(block, "_id") == ['{"$oid": "65f0c0ffee"}'] * 2
    assert _values(block, "document") == [doc, None]
    assert _values(block, "@op") == ["c", "d"]
    assert _values(block, "@image") == [IMAGE_AFTER, IMAGE_BEFORE]
    assert block.schema.key_columns == ("_id",)
    assert block.records.schema.field("document").type == pa.string()


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
    block = _block(decoder, (None, value))
    assert _values(block, "at") == [dt.datetime(2024, 2, 29, 13, 45, 7, 123_456)]
    assert block.schema.key_columns == ()


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


def test_an_envelope_without_its_row_image_is_refused() -> None:
    value = write(
        PG_VALUE,
        2,
        {"before": None, "after": None, "source": source_block(), "transaction": None}
        | {"op": "c", "ts_ms": None},
    )
    with pytest.raises(EnvelopeError, match="without an 'after' row"):
        _decoder().decode(None, value, 0)


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


def test_wide_decimals_and_small_integers_keep_their_bounds() -> None:
    wide = {
        "type": "bytes",
        "scale": 4,
        "precision": 40,
        "connect.parameters": {"scale": "4", "connect.decimal.precision": "40"},
        "connect.name": "org.apache.kafka.connect.data.Decimal",
        "logicalType": "decimal",
    }
    fields = [_field("big", wide), _field("tiny", {"type": "int", "connect.type": "int8"})]
    big = Decimal("-" + "9" * 36 + ".1234")
    block = _one_table(fields, {"big": big, "tiny": 127}, {"big": None, "tiny": None})
    assert block.records.schema.field("big").type == pa.decimal256(40, 4)
    assert _values(block, "big") == [big, None]
    value_schema = _typed_envelope(fields)
    decoder = TopicDecoder(DictRegistry({30: value_schema}), "public", "kinds", "shop")
    changes = []
    for i, tiny in enumerate((1, 128, -129, -128)):
        record = {"before": None, "after": {"id": i, "big": None, "tiny": tiny}}
        record.update(source=source_block(), transaction=None, op="c", ts_ms=None)
        change = decoder.decode(None, write(value_schema, 30, record), i).change
        assert change is not None
        changes.append(change)
    built = build_blocks(changes)
    assert [c.offset for c, _ in built.rejected] == [1, 2]
    (block,) = built.blocks
    assert _values(block, "tiny") == [1, -128]
    assert _values(block, "@index") == [0, 1]


def test_negative_and_fractional_iso_intervals() -> None:
    fields = [_field("iv", _named("string", "io.debezium.time.Interval"))]
    block = _one_table(fields, {"iv": "-P1DT0.5S"}, {"iv": "PT-1H"}, {"iv": "P0D"})
    assert _values(block, "iv") == [
        -dt.timedelta(days=1, seconds=0.5),
        -dt.timedelta(hours=1),
        dt.timedelta(0),
    ]
