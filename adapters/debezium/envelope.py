"""Debezium change envelopes (already Avro-decoded into Python values) -> `Change`s, the
input of the typed block builder (adapters/debezium/block_builder.py).

A Debezium value is ``{before, after, source, op, ts_ms, transaction}``; `op` is c / u / d /
r / t. The column schemas come from the Avro schema the Schema Registry holds for the
message: each field's Kafka Connect type and logical name (``connect.name``,
``connect.parameters``) give its neutral logical type (`domain.types.from_debezium`) and
the column builder that turns Debezium's representation of the column's values (days since
the epoch, microseconds, unscaled decimal bytes, ...) into one Arrow array of the logical
type's Arrow type (adapters/debezium/columns.py, docs/types.md). MongoDB's `before` /
`after` are JSON strings (extended JSON): its table has two columns, `_id` (the key, as
Debezium's key JSON) and `document` (json).

`compile_shape` runs once per (key schema, value schema) pair; `read_change` once per
message: it checks the envelope (operation, row images) and picks the row values out, but
converts none of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from adapters.debezium.columns import UNAVAILABLE, ColumnBuilder, builder_for, json_builder
from domain.events import Column, Operation, TableSchema
from domain.types import LogicalType, LogicalTypeError, from_debezium

__all__ = ["UNAVAILABLE", "Change", "EnvelopeError", "EnvelopeShape", "compile_shape"]

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


# ----------------------------------------------------------------------- the schemas


def _non_null(avro_type: Any) -> tuple[Any, bool]:
    """The type of an optional field's value, and whether the field is optional."""
    if isinstance(avro_type, list):
        members = [t for t in avro_type if t != "null"]
        if len(members) != 1:
            raise EnvelopeError(f"unsupported union {avro_type!r}")
        return members[0], len(members) != len(avro_type)
    return avro_type, False


def _field_builder(avro_type: Any, names: dict[str, Any]) -> ColumnBuilder:
    t, _ = _non_null(avro_type)
    if isinstance(t, str):
        if t in names:
            t = names[t]
        else:
            connect = _AVRO_TO_CONNECT.get(t)
            if connect is None:
                raise EnvelopeError(f"unsupported Avro type {t!r}")
            return builder_for(from_debezium(connect), None)
    kind = t.get("type")
    if isinstance(kind, (dict, list)):
        return _field_builder(kind, names)
    name = t.get("connect.name")
    params = {str(k): str(v) for k, v in (t.get("connect.parameters") or {}).items()}
    if kind == "record":
        if t.get("name"):
            names[t["name"]] = t
            if t.get("namespace"):
                names[f"{t['namespace']}.{t['name']}"] = t
        if name == "io.debezium.data.VariableScaleDecimal":
            return builder_for(from_debezium("struct", name), name, record=True)
        return builder_for(LogicalType("json"), name, record=True)  # geometry, points, ...
    if kind == "array":
        element = _field_builder(t["items"], names)
        return builder_for(from_debezium("array", element=element.logical), name, element=element)
    if kind == "map":
        return json_builder()
    if kind == "enum":
        return builder_for(LogicalType("string"), name)
    connect = t.get("connect.type") or _AVRO_TO_CONNECT.get(kind)
    if connect is None:
        if kind == "fixed":
            connect = "bytes"
        else:
            raise EnvelopeError(f"unsupported Avro type {kind!r}")
    if name == "org.apache.kafka.connect.data.Decimal" or t.get("logicalType") == "decimal":
        if "scale" not in params and "scale" in t:
            params["scale"] = str(t["scale"])
        # Without connect.decimal.precision the Avro "precision" is the converter's
        # default (64), not the column's: such a decimal stays `decimal` (exact text).
        logical = from_debezium(connect, "org.apache.kafka.connect.data.Decimal", params)
        return builder_for(logical, name, scale=int(params.get("scale", "0")))
    try:
        logical = from_debezium(connect, name, params)
    except LogicalTypeError as exc:
        raise EnvelopeError(str(exc)) from exc
    return builder_for(logical, name)


@dataclass(frozen=True, slots=True)
class EnvelopeShape:
    """How to read the messages of one (key schema, value schema) pair: the table and one
    column builder per column."""

    table: TableSchema
    builders: tuple[ColumnBuilder, ...]
    mongodb: bool = False
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _pick: Callable[[Mapping[str, Any]], Any] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = self.table.column_names
        object.__setattr__(self, "_names", tuple(names))
        object.__setattr__(self, "_pick", itemgetter(*names) if len(names) > 1 else None)

    def row(self, record: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
        """The column values of a row record, in table order, as Avro decoded them."""
        if record is None:
            return None
        if self._pick is None:
            return tuple(record.get(n) for n in self._names)
        try:
            return self._pick(record)  # type: ignore[no-any-return]
        except KeyError:  # a record written without some field: it is null
            return tuple(record.get(n) for n in self._names)


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
        text = builder_for(LogicalType("string"), None)
        document = builder_for(LogicalType("json"), None)
        return EnvelopeShape(table, (text, document), mongodb=True)
    assert fields is not None
    names: dict[str, Any] = {}
    columns: list[Column] = []
    builders: list[ColumnBuilder] = []
    for f in fields:
        builder = _field_builder(f["type"], names)
        columns.append(
            Column(
                f["name"],
                0,
                postgres_type(builder.logical),
                f["name"] in key_names,
                str(builder.logical),
            )
        )
        builders.append(builder)
    return EnvelopeShape(TableSchema(schema_name, table_name, tuple(columns)), tuple(builders))


# -------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Change:
    """One Debezium message at `offset` of its partition: its operation, its row images
    (column values in table order, still as Avro decoded them; None: not sent) and the
    metadata of its block row."""

    shape: EnvelopeShape
    operation: Operation
    offset: int
    before: tuple[Any, ...] | None
    after: tuple[Any, ...] | None
    commit_time_us: int
    transaction_id: int


def _mongo_row(document: str | None, key: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
    if document is None:
        return None
    ident = None if key is None else key.get("id")
    if ident is None:
        try:
            ident = json.dumps(json.loads(document).get("_id"), separators=(",", ":"))
        except (ValueError, AttributeError) as exc:
            raise EnvelopeError(f"a MongoDB document that is not a JSON object: {exc}") from exc
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
    if isinstance(tx, int) and tx >= 0:
        return tx
    return 0


def read_change(
    shape: EnvelopeShape, value: Mapping[str, Any], key: Mapping[str, Any] | None, offset: int
) -> Change:
    """The change of one decoded envelope at `offset` of its partition."""
    op = value.get("op")
    operation = _OPS.get(op) if isinstance(op, str) else None
    if operation is None:
        raise EnvelopeError(f"unknown Debezium operation {op!r}")
    source = value.get("source")
    before_raw = value.get("before")
    after_raw = value.get("after")
    if shape.mongodb:
        before = _mongo_row(before_raw, key)
        after = _mongo_row(after_raw, key)
        if operation is Operation.DELETE and before is None and key is not None:
            before = (key.get("id"), None)
    else:
        if not isinstance(before_raw, (dict, type(None))) or not isinstance(
            after_raw, (dict, type(None))
        ):
            raise EnvelopeError("a row image that is not a record")
        before = shape.row(before_raw)
        after = shape.row(after_raw)
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
    return Change(
        shape,
        operation,
        offset,
        before,
        after,
        _commit_time_us(source, value),
        _transaction_id(source),
    )


def table_of(qualified: str) -> tuple[str, str]:
    """("schema", "table") of a configured source table (MongoDB: "db", "collection")."""
    schema, dot, table = qualified.partition(".")
    if not dot:
        raise EnvelopeError(f"{qualified!r} is not schema.table")
    return schema, table
