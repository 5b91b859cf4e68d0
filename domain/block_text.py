"""Typed Arrow columns as PostgreSQL text: what ``arrow`` -> ``postgres_text`` does to each
table column of a change block (`domain.blocks.to_postgres_text`).

Whole columns at a time (pyarrow.compute), so every consumer of text blocks (the PostgreSQL
sink's COPY, the row view `domain.blocks.events_of`, text-typed Iceberg columns) takes arrow
blocks too. The forms are PostgreSQL's own output forms where that costs nothing more (what a
PostgreSQL source sends), and always forms PostgreSQL's input reads back as the same value:

=========================  ===================================================================
Arrow type                 text
=========================  ===================================================================
bool                       ``t`` / ``f``
ints, uints                decimal digits
float32, float64           shortest round-trip form; ``NaN``, ``Infinity``, ``-Infinity``
decimal128, decimal256     the exact decimal, scale kept (``12.50``)
string                     as is
binary                     bytea hex: ``\\x00ff10``
date32                     ``2024-02-29``
time64                     ``13:45:07.25`` (``24:00:00`` for a whole day)
timestamp                  ``2024-02-29 13:45:07.5``
timestamp, UTC             ``2024-02-29 13:45:07.5+00``
duration                   an interval of days and time, as PostgreSQL prints it:
                           ``3 days 04:05:06.789``, ``-1 days -02:00:00``, ``00:00:01``
list<T>                    an array literal: ``{1,NULL,3}``, ``{"a b","c\\"d",""}``;
                           list<list<T>>: ``{{1,2},{3,4}}``
=========================  ===================================================================

Dates and timestamps outside 0001-01-01 .. 9999-12-31 23:59:59.999999 are PostgreSQL's
``-infinity`` / ``infinity`` (the rule of domain/arrow_types.py, the same as the Kafka
source's text path).
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from domain.arrow_types import DATE_DAYS_MAX, DATE_DAYS_MIN, TIMESTAMP_US_MAX, TIMESTAMP_US_MIN

_STRING = pa.string()
_DAY_US = 86_400_000_000
_ARRAY_QUOTE_NEEDED = r'(?i)^$|^null$|[{}",\\\s]'


class TextFormError(ValueError):
    """An Arrow type without a PostgreSQL text form here."""


def struct_text(values: pa.Array, text_type: pa.DataType) -> pa.Array:
    """A struct of typed columns (a block's `@before`) as the struct of their text."""
    if values.null_count == len(values):
        return pa.nulls(len(values), text_type)
    children = [column_text(values.field(i)) for i in range(values.type.num_fields)]
    return pa.StructArray.from_arrays(
        children, fields=list(text_type), mask=pc.invert(values.is_valid())
    )


def column_text(values: pa.Array) -> pa.Array:
    """One typed column as PostgreSQL text (nulls stay null)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    t = values.type
    if pa.types.is_string(t):
        return values
    if pa.types.is_large_string(t):
        return values.cast(_STRING)
    convert = _converter(t)
    if convert is None:
        raise TextFormError(f"no PostgreSQL text form for Arrow type {t}")
    return convert(values)


def _converter(t: pa.DataType) -> Callable[[pa.Array], pa.Array] | None:
    if pa.types.is_boolean(t):
        return _bool_text
    if pa.types.is_integer(t) or pa.types.is_decimal(t):
        return _cast_text
    if pa.types.is_floating(t):
        return _float_text
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return _bytea_text
    if pa.types.is_date32(t):
        return _date_text
    if pa.types.is_time64(t) or pa.types.is_time32(t):
        return _time_text
    if pa.types.is_timestamp(t):
        return _timestamp_text
    if pa.types.is_duration(t):
        return _interval_text
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _array_text
    return None


def _cast_text(values: pa.Array) -> pa.Array:
    return pc.cast(values, _STRING)


def _bool_text(values: pa.Array) -> pa.Array:
    return pc.if_else(values, "t", "f")


def _float_text(values: pa.Array) -> pa.Array:
    # Arrow prints the shortest round-trip form, as PostgreSQL 12+ does; only the special
    # values are spelled differently (nan, inf, -inf).
    text = pc.cast(values, _STRING)
    special = pc.invert(pc.is_finite(values))
    if not pc.any(special).as_py():
        return text
    text = pc.if_else(pc.is_nan(values), "NaN", text)
    positive = pc.and_(pc.is_inf(values), pc.greater(values, 0))
    text = pc.if_else(positive, "Infinity", text)
    return pc.if_else(pc.and_(pc.is_inf(values), pc.less(values, 0)), "-Infinity", text)


def _bytea_text(values: pa.Array) -> pa.Array:
    # Arrow has no hex kernel; bytes.hex per value is the fast path in Python.
    return pa.array([None if v is None else "\\x" + v.hex() for v in values.to_pylist()], _STRING)


def _trim_fraction(text: pa.Array) -> pa.Array:
    """``13:45:07.250000`` -> ``13:45:07.25``, ``13:45:07.000000`` -> ``13:45:07`` (the
    text always ends in a six-digit fraction, so only its zeros match)."""
    return pc.replace_substring_regex(text, r"\.?0+$", "")


def _out_of_range(as_int: pa.Array, low: int, high: int, text: pa.Array) -> pa.Array:
    too_low = pc.less(as_int, low)
    too_high = pc.greater(as_int, high)
    if not pc.any(pc.or_(too_low, too_high)).as_py():
        return text
    text = pc.if_else(too_low, "-infinity", text)
    return pc.if_else(too_high, "infinity", text)


def _date_text(values: pa.Array) -> pa.Array:
    days = values.cast(pa.int32())
    return _out_of_range(days, DATE_DAYS_MIN, DATE_DAYS_MAX, pc.cast(values, _STRING))


def _time_text(values: pa.Array) -> pa.Array:
    us = pc.cast(values.cast(pa.time64("us")), pa.int64())
    text = _trim_fraction(pc.cast(values.cast(pa.time64("us")), _STRING))
    return pc.if_else(pc.greater_equal(us, _DAY_US), "24:00:00", text)


def _timestamp_text(values: pa.Array) -> pa.Array:
    t: pa.TimestampType = values.type
    micros = values if t.unit == "us" else values.cast(pa.timestamp("us", tz=t.tz))
    us = micros.view(pa.int64())
    clipped = pc.if_else(
        pc.or_(pc.less(us, TIMESTAMP_US_MIN), pc.greater(us, TIMESTAMP_US_MAX)), 0, us
    )
    naive = clipped.cast(pa.timestamp("us"))
    text = _trim_fraction(pc.cast(naive, _STRING))
    if t.tz is not None:
        # the instant in UTC, written with its offset so any session TimeZone reads it alike
        text = pc.binary_join_element_wise(text, "+00", "")
    return _out_of_range(us, TIMESTAMP_US_MIN, TIMESTAMP_US_MAX, text)


def _two_digits(values: pa.Array) -> pa.Array:
    return pc.utf8_lpad(pc.cast(values, _STRING), 2, "0")


def _interval_text(values: pa.Array) -> pa.Array:
    """A duration as PostgreSQL prints an interval of days and time (IntervalStyle
    postgres): days and time share the duration's sign."""
    us = values.cast(pa.duration("us")).view(pa.int64())
    negative = pc.less(us, 0)
    magnitude = pc.abs_checked(us)
    days = pc.divide(magnitude, _DAY_US)
    rest = pc.subtract(magnitude, pc.multiply(days, _DAY_US))
    seconds = pc.divide(rest, 1_000_000)
    micros = pc.subtract(rest, pc.multiply(seconds, 1_000_000))
    hours = pc.divide(seconds, 3600)
    minutes = pc.divide(pc.subtract(seconds, pc.multiply(hours, 3600)), 60)
    secs = pc.subtract(seconds, pc.add(pc.multiply(hours, 3600), pc.multiply(minutes, 60)))
    fraction = pc.utf8_lpad(pc.cast(micros, _STRING), 6, "0")
    clock = pc.binary_join_element_wise(
        _two_digits(hours), _two_digits(minutes), _two_digits(secs), ":"
    )
    clock = _trim_fraction(pc.binary_join_element_wise(clock, fraction, "."))
    sign = pc.if_else(negative, "-", "")
    signed_clock = pc.binary_join_element_wise(sign, clock, "")
    day_word = pc.if_else(pc.and_(pc.equal(days, 1), pc.invert(negative)), " day", " days")
    day_part = pc.binary_join_element_wise(sign, pc.cast(days, _STRING), day_word, "")
    with_both = pc.binary_join_element_wise(day_part, signed_clock, " ")
    text = pc.if_else(pc.equal(rest, 0), day_part, with_both)
    return pc.if_else(pc.equal(days, 0), signed_clock, text)


def _array_text(values: pa.Array) -> pa.Array:
    """list<T> as a PostgreSQL array literal; an inner list is a sub-array (not quoted)."""
    offsets = values.offsets
    start = offsets[0].as_py()
    end = offsets[len(offsets) - 1].as_py()
    items = values.values.slice(start, end - start)
    nested = pa.types.is_list(items.type) or pa.types.is_large_list(items.type)
    text = column_text(items)
    if not nested:
        quoted = pc.binary_join_element_wise(
            '"', pc.replace_substring(pc.replace_substring(text, "\\", "\\\\"), '"', '\\"'), '"', ""
        )
        text = pc.if_else(pc.match_substring_regex(text, _ARRAY_QUOTE_NEEDED), quoted, text)
    text = pc.fill_null(text, "NULL")
    rebased = pc.subtract(offsets, offsets[0])  # a fresh array: a slice takes no mask
    if pa.types.is_large_list(values.type):
        lists = pa.LargeListArray.from_arrays(rebased, text, mask=pc.is_null(values))
    else:
        lists = pa.ListArray.from_arrays(rebased, text, mask=pc.is_null(values))
    return pc.binary_join_element_wise("{", pc.binary_join(lists, ","), "}", "")
