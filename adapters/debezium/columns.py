"""Column builders: the Avro-decoded values of one column across many Debezium messages ->
one Arrow array of the column's Arrow type (`domain.arrow_types.value_type`).

A builder is compiled once per (key schema, value schema) pair (`builder_for`) from the
field's Avro type and its Kafka Connect annotations (``connect.name``,
``connect.parameters``). The decoder reads messages with the schemas' ``logicalType``
annotations removed (adapters/kafka/avro.py), so values arrive in Connect's own
representation: days, ms / µs / ns counts, unscaled decimal bytes, ISO texts. Integers are
turned into an int64 array once and cast or scaled by pyarrow.compute; only the values that
have no vectorised conversion (decimals, ISO texts Arrow cannot parse, JSON of records)
are converted one by one.

`build` raises `ColumnError` for a value it cannot represent (a decimal out of its
precision, a malformed ISO timestamp, an integer out of range): the block builder then
finds the message by building the values one at a time (adapters/debezium/block_builder.py).

Debezium's ``__debezium_unavailable_value`` (an unchanged TOASTed value; bytes-typed
columns get its UTF-8 bytes, arrays a one-element array of it) becomes null, and its index
is returned so the block can list it in ``@unchanged``.

PostgreSQL's ``infinity`` / ``-infinity`` timestamps: Debezium sends the PostgreSQL JDBC
driver's sentinels (9223372036825200000 / -9223372036832400000, whatever the unit) for
``timestamp`` and the texts ``infinity`` / ``-infinity`` for ``timestamptz``. Both become
the extreme int64 values of timestamp[us] (``INFINITY_US`` / ``MINUS_INFINITY_US``, what
PostgreSQL itself stores for them), so they stay representable and distinct from any real
time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from domain.arrow_types import value_type
from domain.types import LogicalType

UNAVAILABLE = "__debezium_unavailable_value"
UNAVAILABLE_BYTES = UNAVAILABLE.encode()

INFINITY_US = 2**63 - 1
MINUS_INFINITY_US = -(2**63)
# The PostgreSQL JDBC driver's +-infinity (PGStatement.DATE_POSITIVE/NEGATIVE_INFINITY),
# which Debezium sends as the raw value of a timestamp column.
_JDBC_INFINITY = 9223372036825200000
_JDBC_MINUS_INFINITY = -9223372036832400000

_INT64 = pa.int64()
_STRING = pa.string()
_BINARY = pa.binary()


class ColumnError(ValueError):
    """A value the column's Arrow type cannot hold (the message is poison)."""


@dataclass(frozen=True, slots=True)
class Built:
    array: pa.Array
    unavailable: list[int]  # positions of unavailable (unchanged TOASTed) values


Build = Callable[[Sequence[Any]], Built]


@dataclass(frozen=True, slots=True)
class ColumnBuilder:
    """How one column's values become an Arrow array of `arrow_type`."""

    logical: LogicalType
    arrow_type: pa.DataType
    build: Build


# ------------------------------------------------------------------------- helpers


def _checked(fn: Callable[[Sequence[Any]], Built]) -> Build:
    """`fn` with the exceptions of a bad value turned into `ColumnError`."""

    def build(values: Sequence[Any]) -> Built:
        try:
            return fn(values)
        except ColumnError:
            raise
        except (pa.ArrowException, ValueError, TypeError, OverflowError, ArithmeticError) as exc:
            raise ColumnError(f"{type(exc).__name__}: {exc}") from exc

    return build


def _without_placeholder(array: pa.Array, placeholder: Any) -> Built:
    """`array` with the unavailable placeholder nulled, and where it was."""
    if array.null_count == len(array):
        return Built(array, [])
    hits = pc.equal(array, pa.scalar(placeholder, array.type))
    if not pc.any(hits).as_py():
        return Built(array, [])
    where = [i for i, hit in enumerate(hits.to_pylist()) if hit]
    return Built(pc.if_else(hits, pa.scalar(None, array.type), array), where)


def _ints(values: Sequence[Any]) -> pa.Array:
    return pa.array(values, _INT64)


def _floor_divide(ints: pa.Array, divisor: int) -> pa.Array:
    """Integer division rounding down (pyarrow's truncates toward zero)."""
    quotient = pc.divide(ints, divisor)
    behind = pc.and_(pc.less(ints, 0), pc.not_equal(pc.multiply(quotient, divisor), ints))
    if not pc.any(behind).as_py():
        return quotient
    return pc.if_else(behind, pc.subtract(quotient, 1), quotient)


def _scale(ints: pa.Array, per_second: int) -> pa.Array:
    """A count of 1/`per_second` units as microseconds."""
    if per_second == 1_000_000:
        return ints
    if per_second < 1_000_000:
        return pc.multiply_checked(ints, 1_000_000 // per_second)
    return _floor_divide(ints, per_second // 1_000_000)


# -------------------------------------------------------------------- the builders


def _plain(arrow_type: pa.DataType) -> Build:
    return _checked(lambda values: Built(pa.array(values, arrow_type), []))


def _text(arrow_type: pa.DataType) -> Build:
    def build(values: Sequence[Any]) -> Built:
        return _without_placeholder(pa.array(values, arrow_type), UNAVAILABLE)

    return _checked(build)


def _bytes() -> Build:
    def build(values: Sequence[Any]) -> Built:
        return _without_placeholder(pa.array(values, _BINARY), UNAVAILABLE_BYTES)

    return _checked(build)


def _date() -> Build:
    return _checked(lambda values: Built(pa.array(values, pa.int32()).cast(pa.date32()), []))


def _time(per_second: int) -> Build:
    target = pa.time64("us")

    def build(values: Sequence[Any]) -> Built:
        return Built(_scale(_ints(values), per_second).cast(target), [])

    return _checked(build)


def _duration() -> Build:
    target = pa.duration("us")
    return _checked(lambda values: Built(_ints(values).cast(target), []))


def _timestamp(per_second: int) -> Build:
    target = pa.timestamp("us")

    def build(values: Sequence[Any]) -> Built:
        ints = _ints(values)
        plus = pc.equal(ints, _JDBC_INFINITY)
        minus = pc.equal(ints, _JDBC_MINUS_INFINITY)
        infinite = pc.or_(plus, minus)
        if pc.any(infinite).as_py():
            finite = _scale(pc.if_else(infinite, 0, ints), per_second)
            micros = pc.if_else(plus, INFINITY_US, pc.if_else(minus, MINUS_INFINITY_US, finite))
        else:
            micros = _scale(ints, per_second)
        return Built(micros.cast(target), [])

    return _checked(build)


_ISO_TIMESTAMP = re.compile(
    r"([+-]?\d{4,})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?"
    r"(?:Z|([+-])(\d\d):(\d\d))"
)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date, any year (H. Hinnant's)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


def _iso_micros(text: str) -> int:
    """An ISO 8601 timestamp with offset in µs since the epoch, for the years Arrow's
    parser refuses (after 9999 and BC are written with a sign: ``+10000-01-01T00:00:00Z``)."""
    if text == "infinity":
        return INFINITY_US
    if text == "-infinity":
        return MINUS_INFINITY_US
    match = _ISO_TIMESTAMP.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an ISO 8601 timestamp with an offset")
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    days = _days_from_civil(int(year), int(month), int(day))
    seconds = days * 86_400 + int(hour) * 3600 + int(minute) * 60 + int(second)
    if sign:
        offset = int(off_h) * 3600 + int(off_m) * 60
        seconds -= offset if sign == "+" else -offset
    micros = int((fraction or "").ljust(6, "0")[:6])
    return seconds * 1_000_000 + micros


def _zoned_timestamp() -> Build:
    target = pa.timestamp("us", tz="UTC")

    def build(values: Sequence[Any]) -> Built:
        texts = pa.array(values, _STRING)
        hits = _without_placeholder(texts, UNAVAILABLE)
        if hits.unavailable:
            raise ColumnError("an unavailable value in a timestamp column")
        try:
            if pc.any(pc.is_in(texts, pa.array(["infinity", "-infinity"]))).as_py():
                raise pa.ArrowInvalid("infinity")
            return Built(texts.cast(target), [])
        except pa.ArrowInvalid:  # infinity, or ISO forms Arrow does not parse (years > 9999)
            micros = [None if v is None else _iso_micros(v) for v in values]
            return Built(pa.array(micros, _INT64).cast(target), [])

    return _checked(build)


_ISO_DURATION = re.compile(
    r"(-)?P(?:(-?\d+)Y)?(?:(-?\d+)M)?(?:(-?\d+)D)?"
    r"(?:T(?:(-?\d+)H)?(?:(-?\d+)M)?(?:(-?\d+(?:\.\d+)?)S)?)?"
)


def _iso_duration_micros(text: str) -> int:
    """io.debezium.time.Interval's ISO 8601 text in µs, a month counted as 30 days (the
    `interval` row of domain/arrow_types.py)."""
    match = _ISO_DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an ISO 8601 duration")
    sign, years, months, days, hours, minutes, seconds = match.groups()
    total_days = int(years or 0) * 360 + int(months or 0) * 30 + int(days or 0)
    micros = (total_days * 86_400 + int(hours or 0) * 3600 + int(minutes or 0) * 60) * 10**6
    micros += int(Decimal(seconds or 0) * 10**6)
    return -micros if sign else micros


def _interval_text() -> Build:
    target = pa.duration("us")

    def build(values: Sequence[Any]) -> Built:
        micros = [None if v is None else _iso_duration_micros(v) for v in values]
        return Built(pa.array(micros, _INT64).cast(target), [])

    return _checked(build)


def _unscaled(value: Any, scale: int) -> int:
    if isinstance(value, Decimal):  # fastavro's, when a reader kept the logical type
        if not value.is_finite():
            raise ValueError(f"{value} has no decimal128 form")
        return int(value.scaleb(scale).to_integral_exact())
    return int.from_bytes(value, "big", signed=True)


def _decimal(arrow_type: pa.DataType) -> Build:
    """Unscaled big-endian bytes -> decimal128 / decimal256, written straight into the
    array's buffer (16 / 32-byte little-endian two's complement)."""
    width = arrow_type.byte_width
    limit = 10**arrow_type.precision
    scale = arrow_type.scale

    def build(values: Sequence[Any]) -> Built:
        chunks: list[bytes] = []
        valid: list[bool] = []
        unavailable: list[int] = []
        zero = bytes(width)
        for i, value in enumerate(values):
            if value is None or value == UNAVAILABLE_BYTES:
                if value is not None:
                    unavailable.append(i)
                chunks.append(zero)
                valid.append(False)
                continue
            unscaled = _unscaled(value, scale)
            if not -limit < unscaled < limit:
                raise ColumnError(
                    f"{Decimal(unscaled).scaleb(-scale)} does not fit decimal"
                    f"({arrow_type.precision},{scale})"
                )
            chunks.append(unscaled.to_bytes(width, "little", signed=True))
            valid.append(True)
        n = len(values)
        nulls = n - sum(valid)
        bitmap = pa.array(valid, pa.bool_()).buffers()[1] if nulls else None
        array = pa.Array.from_buffers(
            arrow_type, n, [bitmap, pa.py_buffer(b"".join(chunks))], null_count=nulls
        )
        return Built(array, unavailable)

    return _checked(build)


def _decimal_text(value: Decimal) -> str:
    if value.is_nan():
        return "NaN"
    if value.is_infinite():
        return "Infinity" if value > 0 else "-Infinity"
    return format(value, "f")


def _decimal_string(scale: int) -> Build:
    """A Connect Decimal without a precision: its exact text (the `decimal` logical type)."""

    def build(values: Sequence[Any]) -> Built:
        out: list[str | None] = []
        unavailable: list[int] = []
        for i, value in enumerate(values):
            if value is None or value == UNAVAILABLE_BYTES:
                if value is not None:
                    unavailable.append(i)
                out.append(None)
            elif isinstance(value, Decimal):
                out.append(_decimal_text(value))
            else:
                unscaled = int.from_bytes(value, "big", signed=True)
                out.append(_decimal_text(Decimal(unscaled).scaleb(-scale)))
        return Built(pa.array(out, _STRING), unavailable)

    return _checked(build)


def _variable_decimal() -> Build:
    """io.debezium.data.VariableScaleDecimal ``{scale, value}`` -> its exact text."""

    def build(values: Sequence[Any]) -> Built:
        out: list[str | None] = []
        for value in values:
            if value is None:
                out.append(None)
                continue
            unscaled = int.from_bytes(value["value"], "big", signed=True)
            out.append(_decimal_text(Decimal(unscaled).scaleb(-int(value["scale"]))))
        return Built(pa.array(out, _STRING), [])

    return _checked(build)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, (Decimal, date, time, datetime)):
        return str(obj)
    raise TypeError(type(obj).__name__)


def _json() -> Build:
    """Records (geometry, points, ...) and maps -> their JSON text."""

    def build(values: Sequence[Any]) -> Built:
        out = [
            None if v is None else json.dumps(v, default=_json_default, separators=(",", ":"))
            for v in values
        ]
        return Built(pa.array(out, _STRING), [])

    return _checked(build)


def _list(element: ColumnBuilder, arrow_type: pa.DataType) -> Build:
    def build(values: Sequence[Any]) -> Built:
        offsets = [0]
        flat: list[Any] = []
        valid: list[bool] = []
        unavailable: list[int] = []
        for i, value in enumerate(values):
            if (
                value is not None
                and len(value) == 1
                and value[0] in (UNAVAILABLE, UNAVAILABLE_BYTES)
            ):
                unavailable.append(i)
                value = None
            if value is None:
                valid.append(False)
            else:
                valid.append(True)
                flat.extend(value)
            offsets.append(len(flat))
        items = element.build(flat)
        if items.unavailable:
            raise ColumnError("an unavailable value inside an array")
        mask = None if all(valid) else pa.array([not v for v in valid], pa.bool_())
        array = pa.ListArray.from_arrays(
            pa.array(offsets, pa.int32()), items.array, type=arrow_type, mask=mask
        )
        return Built(array, unavailable)

    return _checked(build)


# ---------------------------------------------------------------------- compiling


_TIME_UNITS = {
    "io.debezium.time.Time": 1000,
    "org.apache.kafka.connect.data.Time": 1000,
    "io.debezium.time.MicroTime": 1_000_000,
    "io.debezium.time.NanoTime": 1_000_000_000,
}
_TIMESTAMP_UNITS = {
    "io.debezium.time.Timestamp": 1000,
    "org.apache.kafka.connect.data.Timestamp": 1000,
    "io.debezium.time.MicroTimestamp": 1_000_000,
    "io.debezium.time.NanoTimestamp": 1_000_000_000,
}


def builder_for(
    logical: LogicalType,
    connect_name: str | None,
    *,
    record: bool = False,
    element: ColumnBuilder | None = None,
    scale: int = 0,
) -> ColumnBuilder:
    """The builder of a column of `logical` type whose Avro values carry Connect's
    `connect_name` representation (`record`: a struct other than VariableScaleDecimal,
    written as JSON; `element`: a list's element builder; `scale`: a Connect Decimal's)."""
    arrow_type = value_type(logical)
    build = _compile(logical, arrow_type, connect_name or "", record, element, scale)
    return ColumnBuilder(logical, arrow_type, build)


def _compile(
    logical: LogicalType,
    arrow_type: pa.DataType,
    name: str,
    record: bool,
    element: ColumnBuilder | None,
    scale: int,
) -> Build:
    kind = logical.kind
    if record:
        if name == "io.debezium.data.VariableScaleDecimal":
            return _variable_decimal()
        return _json()
    if kind == "list":
        assert element is not None
        return _list(element, arrow_type)
    if kind == "decimal":
        if logical.precision is None:
            return _decimal_string(scale)
        return _decimal(arrow_type)
    if name in _TIMESTAMP_UNITS:
        return _timestamp(_TIMESTAMP_UNITS[name])
    if name in _TIME_UNITS:
        return _time(_TIME_UNITS[name])
    if kind == "date":
        return _date()
    if kind == "timestamptz":
        return _zoned_timestamp()
    if kind == "interval":
        if name == "io.debezium.time.Interval":
            return _interval_text()
        return _duration()
    if kind == "bytes":
        return _bytes()
    if arrow_type == _STRING:
        return _text(_STRING)
    return _plain(arrow_type)


def json_builder() -> ColumnBuilder:
    """Maps: their JSON text (the `json` logical type)."""
    logical = LogicalType("json")
    return ColumnBuilder(logical, value_type(logical), _json())
