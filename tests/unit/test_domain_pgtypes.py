"""domain.pgtypes: PostgreSQL text output to Python values, by type OID."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from domain import pgtypes
from domain.events import UNCHANGED
from domain.pgtypes import to_python


def test_type_oids_match_pg_type() -> None:
    # A wrong OID silently sends values through the wrong converter: pin them.
    assert (pgtypes.BOOL, pgtypes.BYTEA, pgtypes.INT8, pgtypes.INT2, pgtypes.INT4) == (
        16,
        17,
        20,
        21,
        23,
    )
    assert (pgtypes.TEXT, pgtypes.OID, pgtypes.JSON, pgtypes.FLOAT4, pgtypes.FLOAT8) == (
        25,
        26,
        114,
        700,
        701,
    )
    assert (pgtypes.DATE, pgtypes.TIME, pgtypes.TIMESTAMP, pgtypes.TIMESTAMPTZ) == (
        1082,
        1083,
        1114,
        1184,
    )
    assert (pgtypes.NUMERIC, pgtypes.UUID, pgtypes.JSONB) == (1700, 2950, 3802)


@pytest.mark.parametrize("oid", [*sorted(pgtypes.CONVERTERS), pgtypes.TEXT, 99999])
def test_none_and_unchanged_pass_through(oid: int) -> None:
    assert to_python(oid, None) is None
    assert to_python(oid, UNCHANGED) is UNCHANGED


def test_bool() -> None:
    assert to_python(pgtypes.BOOL, "t") is True
    assert to_python(pgtypes.BOOL, "f") is False


@pytest.mark.parametrize("oid", [pgtypes.INT2, pgtypes.INT4, pgtypes.INT8, pgtypes.OID])
def test_integers(oid: int) -> None:
    assert to_python(oid, "0") == 0
    assert to_python(oid, "-32768") == -32768
    assert type(to_python(oid, "42")) is int


def test_int8_extremes_are_exact() -> None:
    assert to_python(pgtypes.INT8, "9223372036854775807") == 2**63 - 1
    assert to_python(pgtypes.INT8, "-9223372036854775808") == -(2**63)
    assert to_python(pgtypes.OID, "4294967295") == 2**32 - 1


@pytest.mark.parametrize("oid", [pgtypes.FLOAT4, pgtypes.FLOAT8])
def test_floats(oid: int) -> None:
    assert to_python(oid, "1.5") == 1.5
    assert to_python(oid, "-2.5e-10") == -2.5e-10
    assert to_python(oid, "1e+308") == 1e308
    assert to_python(oid, "Infinity") == math.inf
    assert to_python(oid, "-Infinity") == -math.inf
    nan = to_python(oid, "NaN")
    assert isinstance(nan, float) and math.isnan(nan)
    assert type(to_python(oid, "3")) is float


def test_numeric_is_exact_decimal() -> None:
    value = to_python(pgtypes.NUMERIC, "12345678901234567890.123456789")
    assert isinstance(value, Decimal)
    assert value == Decimal("12345678901234567890.123456789")
    assert str(value) == "12345678901234567890.123456789"  # no float rounding anywhere
    # Trailing zeros carry the column's scale and survive.
    assert str(to_python(pgtypes.NUMERIC, "1.500")) == "1.500"
    assert to_python(pgtypes.NUMERIC, "-0.000000000000000000001") == Decimal("-1E-21")


def test_numeric_special_values() -> None:
    assert to_python(pgtypes.NUMERIC, "NaN").is_nan()
    assert to_python(pgtypes.NUMERIC, "Infinity") == Decimal("Infinity")
    assert to_python(pgtypes.NUMERIC, "-Infinity") == Decimal("-Infinity")


def test_date() -> None:
    assert to_python(pgtypes.DATE, "2024-02-29") == date(2024, 2, 29)
    assert to_python(pgtypes.DATE, "0001-01-01") == date(1, 1, 1)
    assert to_python(pgtypes.DATE, "infinity") == "infinity"
    assert to_python(pgtypes.DATE, "-infinity") == "-infinity"
    assert to_python(pgtypes.DATE, "0044-03-15 BC") == "0044-03-15 BC"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-02 03:04:05", datetime(2024, 1, 2, 3, 4, 5)),
        ("2024-01-02 03:04:05.123456", datetime(2024, 1, 2, 3, 4, 5, 123456)),
        # PostgreSQL drops trailing zeros of the fraction.
        ("2024-01-02 03:04:05.5", datetime(2024, 1, 2, 3, 4, 5, 500000)),
        ("2024-01-02 03:04:05.12", datetime(2024, 1, 2, 3, 4, 5, 120000)),
        ("1999-12-31 23:59:59.999999", datetime(1999, 12, 31, 23, 59, 59, 999999)),
    ],
)
def test_timestamp(text: str, expected: datetime) -> None:
    value = to_python(pgtypes.TIMESTAMP, text)
    assert value == expected
    assert value.tzinfo is None


@pytest.mark.parametrize("text", ["infinity", "-infinity", "2000-01-01 00:00:00 BC"])
def test_timestamp_out_of_python_range_stays_text(text: str) -> None:
    assert to_python(pgtypes.TIMESTAMP, text) == text
    assert to_python(pgtypes.TIMESTAMPTZ, text.replace(" BC", "+00 BC")) == text.replace(
        " BC", "+00 BC"
    )


def tz(hours: int, minutes: int = 0) -> timezone:
    sign = -1 if hours < 0 else 1
    return timezone(sign * timedelta(hours=abs(hours), minutes=minutes))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-02 03:04:05+00", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        (
            "2024-01-02 03:04:05.123456+05:30",
            datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=tz(5, 30)),
        ),
        ("2024-01-02 03:04:05-08", datetime(2024, 1, 2, 3, 4, 5, tzinfo=tz(-8))),
        ("2024-01-02 03:04:05.5-08", datetime(2024, 1, 2, 3, 4, 5, 500000, tzinfo=tz(-8))),
        ("2024-06-30 23:59:59.25+14", datetime(2024, 6, 30, 23, 59, 59, 250000, tzinfo=tz(14))),
        ("2024-01-02 03:04:05-09:30", datetime(2024, 1, 2, 3, 4, 5, tzinfo=tz(-9, 30))),
    ],
)
def test_timestamptz(text: str, expected: datetime) -> None:
    value = to_python(pgtypes.TIMESTAMPTZ, text)
    assert value == expected
    assert value.utcoffset() == expected.utcoffset()


def test_timestamptz_same_instant_in_different_offsets() -> None:
    a = to_python(pgtypes.TIMESTAMPTZ, "2024-01-02 08:34:05+05:30")
    b = to_python(pgtypes.TIMESTAMPTZ, "2024-01-01 19:04:05-08")
    c = to_python(pgtypes.TIMESTAMPTZ, "2024-01-02 03:04:05+00")
    assert a == b == c


def test_timestamptz_historical_offset_with_seconds() -> None:
    # Local mean time before standard zones: PostgreSQL prints +HH:MM:SS.
    value = to_python(pgtypes.TIMESTAMPTZ, "1900-01-01 00:00:00+05:53:28")
    assert value.utcoffset() == timedelta(hours=5, minutes=53, seconds=28)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("00:00:00", time(0, 0)),
        ("13:45:07", time(13, 45, 7)),
        ("13:45:07.5", time(13, 45, 7, 500000)),
        ("23:59:59.999999", time(23, 59, 59, 999999)),
    ],
)
def test_time(text: str, expected: time) -> None:
    assert to_python(pgtypes.TIME, text) == expected


def test_time_24_00_is_valid_postgres_and_must_not_raise() -> None:
    # PostgreSQL accepts and prints time '24:00:00'; Python's time cannot hold it.
    # Like infinity and BC dates, a value Python cannot represent stays text.
    assert to_python(pgtypes.TIME, "24:00:00") == "24:00:00"


@pytest.mark.parametrize(
    ("oid", "text"),
    [
        (pgtypes.DATE, "10000-01-01"),
        (pgtypes.TIMESTAMP, "10000-01-01 00:00:00"),
        (pgtypes.TIMESTAMPTZ, "10000-01-01 00:00:00+00"),
    ],
)
def test_years_after_9999_are_valid_postgres_and_must_not_raise(oid: int, text: str) -> None:
    # PostgreSQL dates reach 5874897 AD, timestamps 294276 AD; Python's stop at 9999.
    assert to_python(oid, text) == text


def test_uuid() -> None:
    text = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    value = to_python(pgtypes.UUID, text)
    assert value == uuid.UUID(text)
    assert isinstance(value, uuid.UUID)


@pytest.mark.parametrize("oid", [pgtypes.JSON, pgtypes.JSONB])
def test_json(oid: int) -> None:
    text = '{"a": [1, 2.5, null, true], "b": {"c": "é"}, "n": 12345678901234567890}'
    assert to_python(oid, text) == {
        "a": [1, 2.5, None, True],
        "b": {"c": "é"},
        "n": 12345678901234567890,
    }
    assert to_python(oid, "[]") == []
    assert to_python(oid, '"s"') == "s"
    assert to_python(oid, "null") is None


def test_bytea_hex() -> None:
    assert to_python(pgtypes.BYTEA, "\\x") == b""
    assert to_python(pgtypes.BYTEA, "\\x00ff10") == b"\x00\xff\x10"
    assert to_python(pgtypes.BYTEA, "\\xDEADbeef") == b"\xde\xad\xbe\xef"


def test_bytea_escape_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="hex"):
        to_python(pgtypes.BYTEA, "abc\\000")


@pytest.mark.parametrize(
    "oid",
    [
        pgtypes.TEXT,
        pgtypes.VARCHAR,
        pgtypes.BPCHAR,
        pgtypes.NAME,
        pgtypes.MONEY,
        pgtypes.INTERVAL,
        pgtypes.TIMETZ,
        0,
        99999,
    ],
)
def test_types_without_converter_stay_text(oid: int) -> None:
    for text in ("", "1 day 02:03:04", "$1,000.00", "12:00:00+02", "  padded  "):
        value: Any = to_python(oid, text)
        assert value == text
        assert type(value) is str
