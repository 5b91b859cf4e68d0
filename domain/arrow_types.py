"""The Arrow type of each logical type: what the table columns of an ``arrow``-encoded
change block hold (domain/blocks.py).

=====================  ==============================  =====================================
logical type           Arrow type                      note
=====================  ==============================  =====================================
bool                   bool
int8..int64            int8..int64
uint8..uint64          uint8..uint64
float32, float64       float32, float64
decimal(p,s)           decimal128(p,s)                 p <= 38; else decimal256(p,s)
decimal                string                          no fixed scale (Debezium's
                                                       VariableScaleDecimal): its exact text
string                 string
bytes                  binary
date                   date32
time                   time64[us]
timetz                 string                          Arrow has no time with zone
timestamp              timestamp[us]
timestamptz            timestamp[us, UTC]
interval               duration[us]                    months count as 30 days (Debezium's
                                                       MicroDuration does the same)
uuid                   string                          canonical 8-4-4-4-12 text
json                   string                          the JSON text
list<T>                list<Arrow type of T>
=====================  ==============================  =====================================

PostgreSQL's ``infinity`` / ``-infinity`` dates and timestamps (Debezium sends them as huge
values) are any value after 9999-12-31 23:59:59.999999 / before 0001-01-01: a source clamps
them to the Arrow type's limits (int64 / int32 max and min), and `to_postgres_text` writes
every value outside that range as ``infinity`` / ``-infinity`` (years past 9999 or BC are not
kept: Python's datetime cannot hold them either; docs/types.md).
"""

from __future__ import annotations

from functools import lru_cache

import pyarrow as pa

from domain.types import LogicalType

# The finite range of date and timestamp values (docstring): 0001-01-01 .. 9999-12-31.
DATE_DAYS_MIN = -719_162
DATE_DAYS_MAX = 2_932_896
TIMESTAMP_US_MIN = -62_135_596_800_000_000
TIMESTAMP_US_MAX = 253_402_300_799_999_999

_SIMPLE: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "decimal": pa.string(),
    "string": pa.string(),
    "bytes": pa.binary(),
    "date": pa.date32(),
    "time": pa.time64("us"),
    "timetz": pa.string(),
    "timestamp": pa.timestamp("us"),
    "timestamptz": pa.timestamp("us", tz="UTC"),
    "interval": pa.duration("us"),
    "uuid": pa.string(),
    "json": pa.string(),
}


@lru_cache(maxsize=1024)
def value_type(logical: LogicalType) -> pa.DataType:
    """The Arrow type of a column of `logical` type in an ``arrow``-encoded block."""
    if logical.kind == "list":
        assert logical.element is not None
        return pa.list_(value_type(logical.element))
    if logical.kind == "decimal" and logical.precision is not None:
        scale = logical.scale or 0
        if logical.precision <= 38:
            return pa.decimal128(logical.precision, scale)
        return pa.decimal256(logical.precision, scale)
    return _SIMPLE[str(logical)]
