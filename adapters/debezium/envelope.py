"""Debezium change envelopes (already Avro-decoded into Python values) -> `SourceEvent`s.

A Debezium value is ``{before, after, source, op, ts_ms, transaction}``; `op` is c / u / d /
r / t. The column schemas come from the Avro schema the Schema Registry holds for the
message: each field's Kafka Connect type and logical name (``connect.name``,
``connect.parameters``) give its neutral logical type (`domain.types.from_debezium`) and
the converter that turns Debezium's representation of a value (days since the epoch,
microseconds, unscaled decimal bytes, ...) into PostgreSQL's text form, which is the row
encoding every stage agrees on (docs/types.md). MongoDB's `before` / `after` are JSON
strings (extended JSON): its table has two columns, `_id` (the key, as Debezium's key JSON)
and `document` (json).

`compile_shape` runs once per (key schema, value schema) pair; `decode` once per message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from domain.events import UNCHANGED, Column, Operation, Position, SourceEvent, TableSchema
from domain.types import LogicalType, LogicalTypeError, from_debezium

# What Debezium's PostgreSQL connector sends for an unchanged TOASTed value.
UNAVAILABLE = "__debezium_unavailable_value"
_UNAVAILABLE_BYTES = UNAVAILABLE.encode()

_EPOCH = datetime(1970, 1, 1)
_EPOCH_DATE = date(1970, 1, 1)
_OPS = {
    "c": Operation.CREATE,
    "u": Operation.UPDATE,
    "d": Operation.DELETE,
    "r": Operation.READ,
    "t": Operation.TRUNCATE,
}
_AVRO_TO_CONNECT = {
    "int": "int32",
    "long": "int64",
    "float": "float32",
    "double": "float64",
    "boolean": "boolean",
    "string": "string",
    "bytes": "bytes",
}
# The PostgreSQL type a sink creates for a logical type (Column.type_name of a Kafka source).
_PG_TYPES = {
    "bool": "boolean",
    "int8": "smallint",
    "int16": "smallint",
    "int32": "integer",
    "int64": "bigint",
    "uint8": "smallint",
    "uint16": "integer",
    "uint32": "bigint",
    "uint64": "numeric(20,0)",
    "float32": "real",
    "float64": "double precision",
    "string": "text",
    "bytes": "bytea",
    "date": "date",
    "time": "time",
    "timetz": "time with time zone",
    "timestamp": "timestamp",
    "timestamptz": "timestamp with time zone",
    "interval": "interval",
    "uuid": "uuid",
    "json": "jsonb",
}


class EnvelopeError(ValueError):
    """A message that is not a Debezium envelope this decoder understands (dead-lettered)."""


Converter = Callable[[Any], Any]  # a decoded Avro value -> PostgreSQL text (or UNCHANGED)


def postgres_type(logical: LogicalType) -> str:
    """The PostgreSQL type name a sink creates for `logical`."""
    if logical.kind == "decimal":
        if logical.precision is None:
            return "numeric"
        return f"numeric({logical.precision},{logical.scale or 0})"
    if logical.kind == "list":
        assert logical.element is not None
        return postgres_type(logical.element) + "[]"
    return _PG_TYPES[str(logical)]


# ------------------------------------------------------------------------- converters


def _text(value: Any) -> Any:
    if value == UNAVAILABLE:
        return UNCHANGED
    return value


def _bool(value: Any) -> str:
    return "t" if value else "f"


def _int(value: Any) -> str:
    return str(int(value))


def _float(value: Any) -> str:
    f = float(value)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "Infinity" if f > 0 else "-Infinity"
    return repr(f)


def _bytes(value: Any) -> Any:
    if value == _UNAVAILABLE_BYTES:
        return UNCHANGED
    return "\\x" + bytes(value).hex()


def _decimal_text(d: Decimal) -> str:
    if d.is_nan():
        return "NaN"
    if d.is_infinite():
        return "Infinity" if d > 0 else "-Infinity"
    return format(d, "f")


def _decimal(scale: int) -> Converter:
    def convert(value: Any) -> Any:
        if isinstance(value, Decimal):
            return _decimal_text(value)
        if value == _UNAVAILABLE_BYTES:
            return UNCHANGED
        unscaled = int.from_bytes(value, "big", signed=True)
        return _decimal_text(Decimal(unscaled).scaleb(-scale))

    return convert


def _variable_decimal(value: Any) -> str:
    unscaled = int.from_bytes(value["value"], "big", signed=True)
    return _decimal_text(Decimal(unscaled).scaleb(-int(value["scale"])))


def _date(value: Any) -> str:
    if isinstance(value, date):
        return value.isoformat()
    return (_EPOCH_DATE + timedelta(days=int(value))).isoformat()


def _time(unit_per_second: int) -> Converter:
    def convert(value: Any) -> str:
        if isinstance(value, time):
            return value.isoformat()
        us = int(value) * 1_000_000 // unit_per_second
        if us >= 86_400_000_000:
            return "24:00:00"
        return (_EPOCH + timedelta(microseconds=us)).time().isoformat()

    return convert


def _timestamp(unit_per_second: int) -> Converter:
    def convert(value: Any) -> str:
        if isinstance(value, datetime):
            return value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
        us = int(value) * 1_000_000 // unit_per_second
        try:
            return (_EPOCH + timedelta(microseconds=us)).isoformat(sep=" ")
        except OverflowError:  # Debezium's encoding of PostgreSQL's +-infinity
            return "infinity" if us > 0 else "-infinity"

    return convert


def _duration(value: Any) -> str:
    us = int(value)
    sign = "-" if us < 0 else ""
    us = abs(us)
    days, rest = divmod(us, 86_400_000_000)
    seconds, micros = divmod(rest, 1_000_000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return f"{sign}{days} days {sign}{hours:02d}:{minutes:02d}:{seconds:02d}.{micros:06d}"


def _json_value(value: Any) -> str:
    def default(obj: Any) -> Any:
        if isinstance(obj, bytes):
            return obj.hex()
        if isinstance(obj, (Decimal, date, time, datetime)):
            return str(obj)
        raise TypeError(type(obj).__name__)

    return json.dumps(value, default=default, separators=(",", ":"))


def _array(element: Converter) -> Converter:
    def convert(value: Any) -> str:
        items = []
        for item in value:
            if item is None:
                items.append("NULL")
                continue
            text = element(item)
            if text is UNCHANGED:
                raise EnvelopeError("an unavailable value inside an array")
            items.append('"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"')
        return "{" + ",".join(items) + "}"

    return convert


_BY_NAME: Mapping[str, Converter] = {
    "io.debezium.time.Date": _date,
    "org.apache.kafka.connect.data.Date": _date,
    "io.debezium.time.Time": _time(1000),
    "org.apache.kafka.connect.data.Time": _time(1000),
    "io.debezium.time.MicroTime": _time(1_000_000),
    "io.debezium.time.NanoTime": _time(1_000_000_000),
    "io.debezium.time.Timestamp": _timestamp(1000),
    "org.apache.kafka.connect.data.Timestamp": _timestamp(1000),
    "io.debezium.time.MicroTimestamp": _timestamp(1_000_000),
    "io.debezium.time.NanoTimestamp": _timestamp(1_000_000_000),
    "io.debezium.time.MicroDuration": _duration,
    "io.debezium.data.VariableScaleDecimal": _variable_decimal,
}
_BY_CONNECT: Mapping[str, Converter] = {
    "boolean": _bool,
    "int8": _int,
    "int16": _int,
    "int32": _int,
    "int64": _int,
    "float32": _float,
    "float64": _float,
    "string": _text,
    "bytes": _bytes,
}


# ----------------------------------------------------------------------- the schemas


def _non_null(avro_type: Any) -> tuple[Any, bool]:
    """The type of an optional field's value, and whether the field is optional."""
    if isinstance(avro_type, list):
        members = [t for t in avro_type if t != "null"]
        if len(members) != 1:
            raise EnvelopeError(f"unsupported union {avro_type!r}")
        return members[0], len(members) != len(avro_type)
    return avro_type, False


@dataclass(frozen=True, slots=True)
class _FieldType:
    logical: LogicalType
    convert: Converter


def _field_type(avro_type: Any, names: dict[str, Any]) -> _FieldType:
    t, _ = _non_null(avro_type)
    if isinstance(t, str):
        if t in names:
            t = names[t]
        else:
            connect = _AVRO_TO_CONNECT.get(t)
            if connect is None:
                raise EnvelopeError(f"unsupported Avro type {t!r}")
            return _FieldType(from_debezium(connect), _BY_CONNECT[connect])
    kind = t.get("type")
    if isinstance(kind, (dict, list)):
        return _field_type(kind, names)
    name = t.get("connect.name")
    params = {str(k): str(v) for k, v in (t.get("connect.parameters") or {}).items()}
    if kind == "record":
        if t.get("name"):
            names[t["name"]] = t
            if t.get("namespace"):
                names[f"{t['namespace']}.{t['name']}"] = t
        if name == "io.debezium.data.VariableScaleDecimal":
            return _FieldType(from_debezium("struct", name), _variable_decimal)
        return _FieldType(LogicalType("json"), _json_value)  # geometry, points, ...
    if kind == "array":
        element = _field_type(t["items"], names)
        return _FieldType(from_debezium("array", element=element.logical), _array(element.convert))
    if kind == "map":
        return _FieldType(LogicalType("json"), _json_value)
    if kind == "enum":
        return _FieldType(LogicalType("string"), _text)
    connect = t.get("connect.type") or _AVRO_TO_CONNECT.get(kind)
    if connect is None:
        raise EnvelopeError(f"unsupported Avro type {kind!r}")
    if name == "org.apache.kafka.connect.data.Decimal" or t.get("logicalType") == "decimal":
        if "scale" not in params and "scale" in t:
            params["scale"] = str(t["scale"])
        logical = from_debezium(connect, "org.apache.kafka.connect.data.Decimal", params)
        return _FieldType(logical, _decimal(int(params.get("scale", "0"))))
    try:
        logical = from_debezium(connect, name, params)
    except LogicalTypeError as exc:
        raise EnvelopeError(str(exc)) from exc
    convert = _BY_NAME.get(name or "") or _BY_CONNECT.get(connect, _text)
    if logical.kind in ("string", "uuid", "json", "timetz", "timestamptz") and connect == "string":
        convert = _text
    return _FieldType(logical, convert)


@dataclass(frozen=True, slots=True)
class EnvelopeShape:
    """How to read the messages of one (key schema, value schema) pair."""

    table: TableSchema
    converters: tuple[Converter, ...]
    mongodb: bool = False


def _record_fields(envelope: Mapping[str, Any]) -> tuple[list[dict[str, Any]] | None, bool]:
    """The row record's fields (from `before` or `after`), or None with mongodb=True when
    the rows are JSON strings (MongoDB)."""
    if envelope.get("type") != "record":
        raise EnvelopeError("the value schema is not a record")
    fields = {f["name"]: f for f in envelope.get("fields", [])}
    if "op" not in fields or "after" not in fields:
        raise EnvelopeError("the value schema is not a Debezium envelope (no op / after)")
    for side in ("before", "after"):
        f = fields.get(side)
        if f is None:
            continue
        t, _ = _non_null(f["type"])
        if isinstance(t, dict) and t.get("type") == "record":
            return list(t.get("fields", [])), False
        if t == "string" or (isinstance(t, dict) and t.get("type") == "string"):
            return None, True
    raise EnvelopeError("the envelope's before / after is neither a record nor a JSON string")


def compile_shape(
    schema_name: str,
    table_name: str,
    value_schema: Mapping[str, Any],
    key_schema: Mapping[str, Any] | None,
) -> EnvelopeShape:
    """The shape of table `schema_name.table_name` from its envelope's Avro schema and the
    Avro schema of its keys (None: the table has no key)."""
    key_names: list[str] = []
    if key_schema is not None and key_schema.get("type") == "record":
        key_names = [f["name"] for f in key_schema.get("fields", [])]
    fields, mongodb = _record_fields(value_schema)
    if mongodb:
        table = TableSchema(
            schema_name,
            table_name,
            (
                Column("_id", 0, "text", True, "string"),
                Column("document", 0, "jsonb", False, "json"),
            ),
        )
        return EnvelopeShape(table, (_text, _text), mongodb=True)
    assert fields is not None
    names: dict[str, Any] = {}
    columns: list[Column] = []
    converters: list[Converter] = []
    for f in fields:
        ft = _field_type(f["type"], names)
        columns.append(
            Column(f["name"], 0, postgres_type(ft.logical), f["name"] in key_names, str(ft.logical))
        )
        converters.append(ft.convert)
    return EnvelopeShape(TableSchema(schema_name, table_name, tuple(columns)), tuple(converters))


# -------------------------------------------------------------------------- decoding


def _row(shape: EnvelopeShape, record: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
    if record is None:
        return None
    out: list[Any] = []
    for column, convert in zip(shape.table.columns, shape.converters, strict=True):
        value = record.get(column.name)
        out.append(None if value is None else convert(value))
    return tuple(out)


def _mongo_row(document: str | None, key: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
    if document is None:
        return None
    ident = None if key is None else key.get("id")
    if ident is None:
        ident = json.dumps(json.loads(document).get("_id"), separators=(",", ":"))
    return (ident, document)


def _commit_time_us(source: Mapping[str, Any] | None, value: Mapping[str, Any]) -> int:
    if source:
        if source.get("ts_us") is not None:
            return int(source["ts_us"])
        if source.get("ts_ms") is not None:
            return int(source["ts_ms"]) * 1000
    ts = value.get("ts_ms")
    return int(ts) * 1000 if ts is not None else 0


def _transaction_id(source: Mapping[str, Any] | None) -> int:
    if not source:
        return 0
    tx = source.get("txId")
    if isinstance(tx, int):
        return tx
    return 0


def decode(
    shape: EnvelopeShape,
    value: Mapping[str, Any],
    key: Mapping[str, Any] | None,
    offset: int,
    source_database: str = "",
) -> SourceEvent:
    """The event of one decoded envelope at `offset` of its partition."""
    op = value.get("op")
    operation = _OPS.get(op) if isinstance(op, str) else None
    if operation is None:
        raise EnvelopeError(f"unknown Debezium operation {op!r}")
    source = value.get("source")
    before_raw = value.get("before")
    after_raw = value.get("after")
    try:
        if shape.mongodb:
            before = _mongo_row(before_raw, key)
            after = _mongo_row(after_raw, key)
            if operation is Operation.DELETE and before is None and key is not None:
                before = (key.get("id"), None)
        else:
            before = _row(shape, before_raw)
            after = _row(shape, after_raw)
    except EnvelopeError:
        raise
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise EnvelopeError(f"{shape.table.qualified_name}: bad value: {exc}") from exc
    if operation in (Operation.CREATE, Operation.READ, Operation.UPDATE) and after is None:
        raise EnvelopeError(f"operation {op!r} without an 'after' row")
    if operation is Operation.DELETE and before is None:
        raise EnvelopeError("a delete without a 'before' row")
    if operation is not Operation.UPDATE and operation is not Operation.DELETE:
        before = None
    if operation is Operation.DELETE:
        after = None
    if operation is Operation.TRUNCATE:
        before = after = None
    return SourceEvent(
        operation,
        shape.table,
        Position(offset, 0),
        before,
        after,
        _commit_time_us(source, value),
        _transaction_id(source),
        source_database,
    )


def table_of(qualified: str) -> tuple[str, str]:
    """("schema", "table") of a configured source table (MongoDB: "db", "collection")."""
    schema, dot, table = qualified.partition(".")
    if not dot:
        raise EnvelopeError(f"{qualified!r} is not schema.table")
    return schema, table


def column_names(shape: EnvelopeShape) -> Sequence[str]:
    return shape.table.column_names
