"""Table columns as Iceberg sees them: logical type -> Iceberg / Arrow type, text columns
(``postgres_text`` blocks) and typed columns (``arrow`` blocks) of a block cast whole
(pyarrow.compute) to those types, the `_cdc_*` metadata columns, and the schema evolution
rules (add, keep dropped, widen safely, refuse the rest by column name)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.types import (
    BinaryType,
    BooleanType,
    DateType,
    DecimalType,
    DoubleType,
    FloatType,
    IcebergType,
    IntegerType,
    LongType,
    StringType,
    TimestampType,
    TimestamptzType,
)

from domain.arrow_types import DATE_DAYS_MAX, DATE_DAYS_MIN, TIMESTAMP_US_MAX, TIMESTAMP_US_MIN
from domain.block_text import column_text
from domain.errors import PermanentError
from domain.events import Column
from domain.types import LogicalType

OP_COL = "_cdc_op"
COMMIT_TIME_COL = "_cdc_commit_time"
POSITION_COL = "_cdc_position"
SEQUENCE_COL = "_cdc_sequence"
DELETED_COL = "_cdc_deleted"
META_TYPES: dict[str, IcebergType] = {
    OP_COL: StringType(),
    COMMIT_TIME_COL: TimestamptzType(),
    POSITION_COL: LongType(),
    SEQUENCE_COL: LongType(),
}


class UnsafeSchemaChangeError(PermanentError):
    """A column changed to a type the Iceberg table cannot widen to: the sink stops."""


def iceberg_type(logical: LogicalType) -> IcebergType:
    """The Iceberg type of a column of `logical` type (docs/lakehouse.md, the type table)."""
    kind = logical.kind
    if kind == "bool":
        return BooleanType()
    if kind == "int":
        return LongType() if logical.width > 32 else IntegerType()
    if kind == "uint":
        if logical.width < 32:
            return IntegerType()
        return LongType() if logical.width == 32 else DecimalType(20, 0)
    if kind == "float":
        return FloatType() if logical.width == 32 else DoubleType()
    if kind == "decimal" and logical.precision is not None and 0 < logical.precision <= 38:
        return DecimalType(logical.precision, logical.scale or 0)
    if kind == "date":
        return DateType()
    if kind == "timestamp":
        return TimestampType()
    if kind == "timestamptz":
        return TimestamptzType()
    if kind == "bytes":
        return BinaryType()
    # decimal without a precision, time, timetz, interval, uuid, json, lists and the types
    # without a neutral counterpart: their exact text form.
    return StringType()


def arrow_type(t: IcebergType) -> pa.DataType:
    if isinstance(t, BooleanType):
        return pa.bool_()
    if isinstance(t, IntegerType):
        return pa.int32()
    if isinstance(t, LongType):
        return pa.int64()
    if isinstance(t, FloatType):
        return pa.float32()
    if isinstance(t, DoubleType):
        return pa.float64()
    if isinstance(t, DecimalType):
        return pa.decimal128(t.precision, t.scale)
    if isinstance(t, DateType):
        return pa.date32()
    if isinstance(t, TimestampType):
        return pa.timestamp("us")
    if isinstance(t, TimestamptzType):
        return pa.timestamp("us", tz="UTC")
    if isinstance(t, BinaryType):
        return pa.large_binary()
    return pa.large_string()


_SPECIAL_FLOATS = {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}


def cast_text(values: pa.Array, target: pa.DataType) -> tuple[pa.Array, pa.Array | None]:
    """PostgreSQL text values cast to `target` as a whole column. Returns the typed column
    and, when some values do not fit (``infinity`` timestamps, BC dates, ...), a boolean
    mask of those rows (their value is null in the column; the caller dead-letters them)."""
    if pa.types.is_large_string(target) or pa.types.is_string(target):
        return values.cast(target), None
    if pa.types.is_boolean(target):
        return pc.equal(values, "t"), None
    text = values
    if pa.types.is_floating(target):
        for pg, arrow in _SPECIAL_FLOATS.items():
            text = pc.replace_substring_regex(text, f"^{pg}$", arrow)
    if pa.types.is_large_binary(target):
        return _hex_bytes(values), None
    try:
        return pc.cast(text, target), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    out: list[object] = []
    bad: list[bool] = []
    for v in text.to_pylist():
        if v is None:
            out.append(None)
            bad.append(False)
            continue
        try:
            out.append(pc.cast(pa.array([v]), target)[0].as_py())
            bad.append(False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            out.append(None)
            bad.append(True)
    return pa.array(out, target), pa.array(bad, pa.bool_())


def cast_typed(values: pa.Array, target: pa.DataType) -> tuple[pa.Array, pa.Array | None]:
    """A typed column of an ``arrow`` block cast to `target`, with the same result as
    `cast_text` on its PostgreSQL text: string columns (time, interval, uuid, json, lists,
    decimals without a precision) hold that text; dates and timestamps outside 0001..9999
    (PostgreSQL's +-infinity, domain/arrow_types.py) do not fit, as in the text path: their
    rows are masked. A value the cast refuses (one too wide for a narrower stored column)
    is masked too, through the text path's per-value fallback."""
    if pa.types.is_large_string(target) or pa.types.is_string(target):
        return column_text(values).cast(target), None
    bad: pa.Array | None = None
    if pa.types.is_timestamp(values.type) and values.type.unit != "us":
        values = values.cast(pa.timestamp("us", values.type.tz))
    if pa.types.is_date32(values.type) or pa.types.is_timestamp(values.type):
        as_int = values.view(pa.int32() if pa.types.is_date32(values.type) else pa.int64())
        low, high = (
            (DATE_DAYS_MIN, DATE_DAYS_MAX)
            if pa.types.is_date32(values.type)
            else (TIMESTAMP_US_MIN, TIMESTAMP_US_MAX)
        )
        outside = pc.or_(pc.less(as_int, low), pc.greater(as_int, high))
        if pc.any(outside).as_py():
            bad = pc.fill_null(outside, False)
            values = pc.if_else(bad, pa.nulls(len(values), values.type), values)
    try:
        return pc.cast(values, target), bad
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        arr, wrong = cast_text(column_text(values), target)
        if bad is not None and wrong is not None:
            wrong = pc.or_(bad, wrong)
        return arr, wrong if wrong is not None else bad


def _hex_bytes(values: pa.Array) -> pa.Array:
    """bytea in hex output format (``\\x0a1b``) to bytes."""
    return pa.array(
        [None if v is None else bytes.fromhex(v[2:]) for v in values.to_pylist()],
        pa.large_binary(),
    )


# Widenings Iceberg allows (the spec's type promotion rules).
def _can_widen(old: IcebergType, new: IcebergType) -> bool:
    if old == new:
        return True
    if isinstance(old, IntegerType) and isinstance(new, LongType):
        return True
    if isinstance(old, FloatType) and isinstance(new, DoubleType):
        return True
    return (
        isinstance(old, DecimalType)
        and isinstance(new, DecimalType)
        and old.scale == new.scale
        and new.precision >= old.precision
    )


@dataclass(frozen=True, slots=True)
class Evolution:
    """What the table needs to take a new source shape."""

    add: list[tuple[str, IcebergType]]
    widen: list[tuple[str, IcebergType]]


def plan_evolution(
    table: str, existing: dict[str, IcebergType], columns: Sequence[Column]
) -> Evolution:
    """Columns to add and to widen; a column whose new type is not a safe widening of the
    stored one stops the sink (UnsafeSchemaChangeError, naming the column and what to do).
    A column the source dropped stays in the table (NULL from then on)."""
    add: list[tuple[str, IcebergType]] = []
    widen: list[tuple[str, IcebergType]] = []
    for column in columns:
        wanted = iceberg_type(column.logical)
        have = existing.get(column.name)
        if have is None:
            add.append((column.name, wanted))
        elif have != wanted:
            if _can_widen(have, wanted):
                widen.append((column.name, wanted))
            elif not _can_widen(wanted, have):
                # A narrowing (bigint -> integer) still fits the wider stored column; any
                # other change does not.
                raise UnsafeSchemaChangeError(
                    f"iceberg table {table}: column {column.name!r} changed from {have} to"
                    f" {wanted} ({column.type_name}), which Iceberg cannot widen to; the sink"
                    f" stops. Rename the column at the source, or write to a new table"
                    f" (table_name), or drop column {column.name!r} from the Iceberg table"
                    " and restart"
                )
    return Evolution(add, widen)
