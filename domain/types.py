"""Neutral logical types: what a column's values are, whatever engine sent them.

Every column of a table schema has a logical type (integers by width and sign, decimal(p,s),
float, bool, string, bytes, date, time, timestamp with / without zone, interval, uuid, json,
list of T) and keeps its `source_type` text (``numeric(12,2)``, ``DATETIME(6)``) for
same-engine DDL. A logical type is written as a short text, which is also its form on the
wire: ``int32``, ``uint16``, ``decimal(12,2)``, ``decimal`` (no fixed precision),
``timestamptz``, ``list<int64>``. The mapping from PostgreSQL types and from Debezium's
logical types is in docs/types.md. Pure: standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# Kinds without parameters, besides int*/uint*/float*/decimal/list.
_SIMPLE = frozenset(
    {
        "bool",
        "string",
        "bytes",
        "date",
        "time",
        "timetz",
        "timestamp",
        "timestamptz",
        "interval",
        "uuid",
        "json",
    }
)
_INT_WIDTHS = (8, 16, 32, 64)
_DECIMAL = re.compile(r"decimal\((\d+),(-?\d+)\)")


class LogicalTypeError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class LogicalType:
    """`kind` is one of: bool, int, uint, float, decimal, string, bytes, date, time, timetz,
    timestamp, timestamptz, interval, uuid, json, list. `width` is the bit width of int,
    uint and float; `precision` / `scale` those of a decimal (None: not fixed); `element`
    the element type of a list."""

    kind: str
    width: int = 0
    precision: int | None = None
    scale: int | None = None
    element: LogicalType | None = None

    def __str__(self) -> str:
        if self.kind in ("int", "uint", "float"):
            return f"{self.kind}{self.width}"
        if self.kind == "decimal":
            if self.precision is None:
                return "decimal"
            return f"decimal({self.precision},{self.scale or 0})"
        if self.kind == "list":
            return f"list<{self.element}>"
        return self.kind

    @staticmethod
    def parse(text: str) -> LogicalType:
        return _parse(text.replace(" ", ""))


@lru_cache(maxsize=4096)
def _parse(text: str) -> LogicalType:
    if text in _SIMPLE:
        return LogicalType(text)
    if text.startswith("list<") and text.endswith(">"):
        return LogicalType("list", element=_parse(text[5:-1]))
    if text == "decimal":
        return LogicalType("decimal")
    match = _DECIMAL.fullmatch(text)
    if match:
        return LogicalType("decimal", precision=int(match[1]), scale=int(match[2]))
    for kind, widths in (("uint", _INT_WIDTHS), ("int", _INT_WIDTHS), ("float", (32, 64))):
        if text.startswith(kind) and text[len(kind) :].isdigit():
            width = int(text[len(kind) :])
            if width in widths:
                return LogicalType(kind, width)
    raise LogicalTypeError(f"unknown logical type {text!r}")


BOOL = LogicalType("bool")
STRING = LogicalType("string")
BYTES = LogicalType("bytes")
JSON = LogicalType("json")
INT16, INT32, INT64 = LogicalType("int", 16), LogicalType("int", 32), LogicalType("int", 64)

# PostgreSQL: by type OID (the built-in types), then by base type name (format_type()).
_PG_BY_OID: dict[int, str] = {
    16: "bool",
    17: "bytes",
    18: "string",  # "char"
    19: "string",  # name
    20: "int64",
    21: "int16",
    23: "int32",
    25: "string",
    26: "uint32",  # oid
    114: "json",
    700: "float32",
    701: "float64",
    790: "decimal",  # money: its text carries the currency format, see docs/types.md
    1042: "string",  # char(n)
    1043: "string",  # varchar(n)
    1082: "date",
    1083: "time",
    1114: "timestamp",
    1184: "timestamptz",
    1186: "interval",
    1266: "timetz",
    1700: "decimal",
    2950: "uuid",
    3802: "json",
}
_PG_BY_NAME: dict[str, str] = {
    "boolean": "bool",
    "bytea": "bytes",
    "smallint": "int16",
    "integer": "int32",
    "bigint": "int64",
    "real": "float32",
    "double precision": "float64",
    "text": "string",
    "character varying": "string",
    "character": "string",
    "name": "string",
    "date": "date",
    "time without time zone": "time",
    "time with time zone": "timetz",
    "timestamp without time zone": "timestamp",
    "timestamp with time zone": "timestamptz",
    "interval": "interval",
    "uuid": "uuid",
    "json": "json",
    "jsonb": "json",
    "numeric": "decimal",
    "money": "decimal",
    "oid": "uint32",
}
_TYPMOD = re.compile(r"\(\s*(\d+)\s*(?:,\s*(-?\d+)\s*)?\)")


@lru_cache(maxsize=4096)
def from_postgres(type_oid: int, type_name: str = "") -> LogicalType:
    """The logical type of a PostgreSQL column (its type OID and format_type() name).

    Arrays become list<element>; numeric(p,s) keeps p and s; types without a neutral
    counterpart (enums, domains, ranges, inet, xml, extension types) are strings: their
    PostgreSQL text form is the value, and `source_type` says what it is."""
    name = type_name.strip()
    if name.endswith("[]"):
        element = from_postgres(0, name[:-2])
        return LogicalType("list", element=element)
    base = _TYPMOD.sub("", name).strip()
    kind = _PG_BY_OID.get(type_oid) or _PG_BY_NAME.get(base)
    if kind is None:
        # Array OIDs without a name: the element is unknown, the text stays.
        return STRING
    if kind == "decimal" and base == "numeric":
        match = _TYPMOD.search(name)
        if match:
            return LogicalType("decimal", precision=int(match[1]), scale=int(match[2] or 0))
    if kind == "decimal" and (base == "money" or type_oid == 790):
        return LogicalType("decimal", precision=19, scale=2)
    return _parse(kind)


# Debezium's logical type names (the `name` of a Kafka Connect schema) -> logical type.
_DEBEZIUM_BY_NAME: dict[str, str] = {
    "io.debezium.time.Date": "date",
    "org.apache.kafka.connect.data.Date": "date",
    "io.debezium.time.Time": "time",
    "io.debezium.time.MicroTime": "time",
    "io.debezium.time.NanoTime": "time",
    "org.apache.kafka.connect.data.Time": "time",
    "io.debezium.time.ZonedTime": "timetz",
    "io.debezium.time.Timestamp": "timestamp",
    "io.debezium.time.MicroTimestamp": "timestamp",
    "io.debezium.time.NanoTimestamp": "timestamp",
    "org.apache.kafka.connect.data.Timestamp": "timestamp",
    "io.debezium.time.ZonedTimestamp": "timestamptz",
    "io.debezium.time.MicroDuration": "interval",
    "io.debezium.time.Interval": "interval",
    "io.debezium.data.Uuid": "uuid",
    "io.debezium.data.Json": "json",
    "io.debezium.data.VariableScaleDecimal": "decimal",
    "io.debezium.data.Enum": "string",
    "io.debezium.data.EnumSet": "string",
    "io.debezium.data.Xml": "string",
    "io.debezium.data.Bits": "bytes",
}
_CONNECT_PRIMITIVES: dict[str, str] = {
    "boolean": "bool",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "float32": "float32",
    "float64": "float64",
    "string": "string",
    "bytes": "bytes",
}


def from_debezium(
    connect_type: str,
    name: str | None = None,
    parameters: dict[str, str] | None = None,
    element: LogicalType | None = None,
) -> LogicalType:
    """The logical type of a Kafka Connect / Debezium field: its primitive `connect_type`
    (int64, string, ...), its logical `name` (io.debezium.time.MicroTimestamp,
    org.apache.kafka.connect.data.Decimal, ...) and the schema's `parameters`
    (``scale``, ``connect.decimal.precision``). Arrays give list<element>."""
    params = parameters or {}
    if name == "org.apache.kafka.connect.data.Decimal":
        scale = int(params.get("scale", "0"))
        precision = params.get("connect.decimal.precision")
        if precision is None:
            return LogicalType("decimal", precision=None, scale=scale)
        return LogicalType("decimal", precision=int(precision), scale=scale)
    if name is not None and name in _DEBEZIUM_BY_NAME:
        return _parse(_DEBEZIUM_BY_NAME[name])
    if connect_type == "array":
        if element is None:
            raise LogicalTypeError("an array needs its element type")
        return LogicalType("list", element=element)
    kind = _CONNECT_PRIMITIVES.get(connect_type)
    if kind is None:
        raise LogicalTypeError(f"no logical type for Connect type {connect_type!r}")
    return _parse(kind)
