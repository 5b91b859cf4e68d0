"""domain.pgtypes: PostgreSQL text output to Python values, by type OID."""

from __future__ import annotations

import ipaddress
import math
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from domain import pgtypes
from domain.events import UNCHANGED, Column, TableSchema
from domain.pgtypes import row_to_python, to_python


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
    assert value == expected  # the same instant...
    # ...in UTC: the offset in the text is the sending session's TimeZone, not the value's.
    assert value.tzinfo is UTC
    assert value.utcoffset() == timedelta(0)


def test_timestamptz_same_instant_in_different_offsets() -> None:
    a = to_python(pgtypes.TIMESTAMPTZ, "2024-01-02 08:34:05+05:30")
    b = to_python(pgtypes.TIMESTAMPTZ, "2024-01-01 19:04:05-08")
    c = to_python(pgtypes.TIMESTAMPTZ, "2024-01-02 03:04:05+00")
    assert a == b == c


def test_timestamptz_historical_offset_with_seconds() -> None:
    # Local mean time before standard zones: PostgreSQL prints +HH:MM:SS.
    value = to_python(pgtypes.TIMESTAMPTZ, "1900-01-01 00:00:00+05:53:28")
    assert value == datetime(1899, 12, 31, 18, 6, 32, tzinfo=UTC)


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


def test_more_type_oids_match_pg_type() -> None:
    assert (pgtypes.CHAR, pgtypes.NAME, pgtypes.XML, pgtypes.CIDR, pgtypes.MONEY) == (
        18,
        19,
        142,
        650,
        790,
    )
    assert (pgtypes.MACADDR, pgtypes.MACADDR8, pgtypes.INET, pgtypes.BPCHAR) == (
        829,
        774,
        869,
        1042,
    )
    assert (pgtypes.VARCHAR, pgtypes.INTERVAL, pgtypes.TIMETZ, pgtypes.BIT, pgtypes.VARBIT) == (
        1043,
        1186,
        1266,
        1560,
        1562,
    )
    assert (pgtypes.PG_LSN, pgtypes.TSVECTOR, pgtypes.TSQUERY) == (3220, 3614, 3615)
    assert (pgtypes.INT4RANGE, pgtypes.NUMRANGE, pgtypes.TSRANGE, pgtypes.TSTZRANGE) == (
        3904,
        3906,
        3908,
        3910,
    )
    assert (pgtypes.DATERANGE, pgtypes.INT8RANGE) == (3912, 3926)
    # A few array OIDs (the full table is checked against a real pg_type in the
    # integration test).
    assert pgtypes.ARRAY_ELEMENT[1007] == pgtypes.INT4
    assert pgtypes.ARRAY_ELEMENT[1009] == pgtypes.TEXT
    assert pgtypes.ARRAY_ELEMENT[3807] == pgtypes.JSONB
    assert pgtypes.ARRAY_ELEMENT[1231] == pgtypes.NUMERIC
    assert len(set(pgtypes.ARRAY_ELEMENT.values())) == len(pgtypes.ARRAY_ELEMENT)


@pytest.mark.parametrize("text", ["", "true", "T", "1", "yes"])
def test_bool_rejects_anything_but_t_and_f(text: str) -> None:
    with pytest.raises(ValueError, match="boolean"):
        to_python(pgtypes.BOOL, text)


# -- money ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$0.00", Decimal("0.00")),
        ("$1.50", Decimal("1.50")),
        ("$1,234.56", Decimal("1234.56")),
        ("-$1,234.56", Decimal("-1234.56")),
        ("$92,233,720,368,547,758.07", Decimal("92233720368547758.07")),
        ("-$92,233,720,368,547,758.08", Decimal("-92233720368547758.08")),
        ("$1,000", Decimal("1000")),  # a locale with no fraction digits
    ],
)
def test_money_in_the_c_locale_format_is_an_exact_decimal(text: str, expected: Decimal) -> None:
    value = to_python(pgtypes.MONEY, text)
    assert isinstance(value, Decimal)
    assert value == expected
    assert str(value) == str(expected)


@pytest.mark.parametrize(
    "text",
    [
        "1.234,56 €",  # de_DE
        "€ 1.234,56",  # nl_NL
        "-1 234,56 €",  # fr_FR (narrow no-break space in real output)
        "£1,234.56",  # en_GB: a different currency must not become a bare number
        "($1,234.56)",
        "$1.234,56",
    ],
)
def test_money_in_other_locales_stays_text(text: str) -> None:
    # The text form depends on lc_monetary; only the C/en_US form is unambiguous. Guessing
    # a separator could turn 1.234,56 into 1.23456, so anything else is kept as sent.
    value = to_python(pgtypes.MONEY, text)
    assert value == text and type(value) is str


# -- time with time zone, interval ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12:34:56+02", time(12, 34, 56, tzinfo=tz(2))),
        ("12:34:56.5-05:30", time(12, 34, 56, 500000, tzinfo=tz(-5, 30))),
        ("00:00:00+00", time(0, 0, tzinfo=UTC)),
        ("23:59:59.999999-12", time(23, 59, 59, 999999, tzinfo=tz(-12))),
    ],
)
def test_timetz_keeps_its_offset(text: str, expected: time) -> None:
    # Unlike timestamptz, timetz stores the offset: it is part of the value.
    value = to_python(pgtypes.TIMETZ, text)
    assert value == expected
    assert value.utcoffset() == expected.utcoffset()


def test_timetz_24_00_stays_text() -> None:
    assert to_python(pgtypes.TIMETZ, "24:00:00+02") == "24:00:00+02"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("00:00:00", timedelta(0)),
        ("00:00:01.5", timedelta(seconds=1.5)),
        ("-00:00:01.5", timedelta(seconds=-1.5)),
        ("04:05:06.000789", timedelta(hours=4, minutes=5, seconds=6, microseconds=789)),
        ("100:00:00", timedelta(hours=100)),
        ("3 days", timedelta(days=3)),
        ("1 day", timedelta(days=1)),
        ("-3 days", timedelta(days=-3)),
        ("1 day -00:00:01", timedelta(days=1, seconds=-1)),
        ("-1 days +00:00:01", timedelta(days=-1, seconds=1)),
        ("3 days 04:05:06.789", timedelta(days=3, hours=4, minutes=5, seconds=6.789)),
        ("-2 days -04:00:00", timedelta(days=-2, hours=-4)),
        ("0 years 0 mons 2 days", timedelta(days=2)),
        ("2562047788:00:54.775807", timedelta(hours=2562047788, seconds=54.775807)),
    ],
)
def test_interval_without_months_is_a_timedelta(text: str, expected: timedelta) -> None:
    value = to_python(pgtypes.INTERVAL, text)
    assert isinstance(value, timedelta)
    assert value == expected


@pytest.mark.parametrize(
    "text",
    [
        "1 year",
        "-10 mons",
        "1 year 2 mons 3 days 04:05:06.789",
        "10 mons -3 days +04:00:00",
        "-178000000 years",
        "infinity",
        "-infinity",
    ],
)
def test_interval_with_months_or_infinite_stays_text(text: str) -> None:
    # A month has no fixed length in days (PostgreSQL adds it to dates by the calendar):
    # turning it into 30 days would be a wrong value, so the text is kept.
    value = to_python(pgtypes.INTERVAL, text)
    assert value == text and type(value) is str


@pytest.mark.parametrize("text", ["", "P1D", "PT1S", "1 day 02:03", "+1-2 +3 +4:05:06", "x"])
def test_interval_in_another_style_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="IntervalStyle"):
        to_python(pgtypes.INTERVAL, text)


# -- network types -------------------------------------------------------------------------


def test_inet_is_an_interface_and_cidr_a_network() -> None:
    host = to_python(pgtypes.INET, "10.1.2.3")
    assert host == ipaddress.IPv4Interface("10.1.2.3/32")
    assert host.ip == ipaddress.IPv4Address("10.1.2.3")
    with_mask = to_python(pgtypes.INET, "192.168.0.1/24")
    assert with_mask.ip == ipaddress.IPv4Address("192.168.0.1")
    assert with_mask.network == ipaddress.IPv4Network("192.168.0.0/24")
    assert to_python(pgtypes.INET, "::1") == ipaddress.IPv6Interface("::1/128")
    assert to_python(pgtypes.INET, "2001:db8::1/64").network == ipaddress.IPv6Network(
        "2001:db8::/64"
    )
    assert to_python(pgtypes.CIDR, "10.0.0.0/8") == ipaddress.IPv4Network("10.0.0.0/8")
    assert to_python(pgtypes.CIDR, "2001:db8::/32") == ipaddress.IPv6Network("2001:db8::/32")


# -- timestamps near the edges -------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["9999-12-31 23:00:00-05", "0001-01-01 00:30:00+01", "0001-01-01 00:00:00+00:00:01"]
)
def test_timestamptz_whose_utc_instant_python_cannot_hold_stays_text(text: str) -> None:
    assert to_python(pgtypes.TIMESTAMPTZ, text) == text


def test_timestamptz_at_the_edges_that_fit() -> None:
    assert to_python(pgtypes.TIMESTAMPTZ, "9999-12-31 23:59:59.999999+00") == datetime(
        9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC
    )
    assert to_python(pgtypes.TIMESTAMPTZ, "0001-01-01 00:00:00-01") == datetime(
        1, 1, 1, 1, tzinfo=UTC
    )


@pytest.mark.parametrize(
    "oid", [pgtypes.DATE, pgtypes.TIMESTAMP, pgtypes.TIMESTAMPTZ, pgtypes.INTERVAL]
)
def test_infinity_is_the_text_infinity(oid: int) -> None:
    # Documented: infinite values stay the strings PostgreSQL prints, never date.max.
    assert to_python(oid, "infinity") == "infinity"
    assert to_python(oid, "-infinity") == "-infinity"


# -- text-like and other types kept as text ------------------------------------------------


@pytest.mark.parametrize(
    "oid",
    [
        pgtypes.TEXT,
        pgtypes.VARCHAR,
        pgtypes.BPCHAR,
        pgtypes.NAME,
        pgtypes.CHAR,
        pgtypes.XML,
        pgtypes.MACADDR,
        pgtypes.MACADDR8,
        pgtypes.BIT,
        pgtypes.VARBIT,
        pgtypes.TSVECTOR,
        pgtypes.TSQUERY,
        pgtypes.PG_LSN,
        pgtypes.INT4RANGE,
        pgtypes.TSTZRANGE,
        pgtypes.DATERANGE,
        0,
        99999,
    ],
)
def test_types_without_converter_stay_text(oid: int) -> None:
    for text in ("", "1 day 02:03:04", "$1,000.00", "12:00:00+02", "  padded  ", "[1,5)", "é"):
        value: Any = to_python(oid, text)
        assert value == text
        assert type(value) is str


def test_enum_and_domain_values_are_text_by_default() -> None:
    # Their OIDs are assigned by CREATE TYPE / CREATE DOMAIN; nothing to convert them by.
    assert to_python(16385, "happy", "mood") == "happy"
    assert to_python(16390, "42", "posint") == "42"
    assert to_python(16390, "42", "public.posint") == "42"


# -- arrays --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("oid", "text", "expected"),
    [
        (1007, "{}", []),
        (1007, "{1,2,3}", [1, 2, 3]),
        (1007, "{1,NULL,3}", [1, None, 3]),
        (1007, "{NULL}", [None]),
        (1007, "{{1,2},{3,4}}", [[1, 2], [3, 4]]),
        (1007, "{{{1},{2}},{{3},{NULL}}}", [[[1], [2]], [[3], [None]]]),
        (1007, "[0:2]={7,8,9}", [7, 8, 9]),
        (1007, "[0:1][1:2]={{1,2},{3,4}}", [[1, 2], [3, 4]]),
        (1016, "{-9223372036854775808,9223372036854775807}", [-(2**63), 2**63 - 1]),
        (1000, "{t,f,NULL}", [True, False, None]),
        (1231, "{1.50,-Infinity}", [Decimal("1.50"), Decimal("-Infinity")]),
        (1182, "{2024-02-29,infinity}", [date(2024, 2, 29), "infinity"]),
        (
            1185,
            '{"2024-01-02 03:04:05+00","2024-01-02 05:04:05+02"}',
            [datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)] * 2,
        ),
        (1115, '{"2024-01-02 03:04:05.5"}', [datetime(2024, 1, 2, 3, 4, 5, 500000)]),
        (1187, '{"1 day",00:00:01,"1 year"}', [timedelta(days=1), timedelta(seconds=1), "1 year"]),
        (
            2951,
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            [uuid.UUID(int=0xA0EEBC999C0B4EF8BB6D6BB9BD380A11)],
        ),
        (1001, '{"\\\\x0102","\\\\x"}', [b"\x01\x02", b""]),
        (3807, '{"{\\"a\\": [1, null]}",NULL,"[]"}', [{"a": [1, None]}, None, []]),
        (
            1041,
            "{10.0.0.1,::1/128}",
            [ipaddress.ip_interface("10.0.0.1"), ipaddress.ip_interface("::1")],
        ),
        (791, '{"$1.00","-$2,000.50"}', [Decimal("1.00"), Decimal("-2000.50")]),
        (1270, '{"12:00:00+02"}', [time(12, tzinfo=tz(2))]),
    ],
)
def test_arrays_of_converted_types(oid: int, text: str, expected: list[Any]) -> None:
    value = to_python(oid, text)
    assert value == expected


def test_numeric_arrays_keep_nan() -> None:
    value = to_python(1231, "{NaN,1}")
    assert value[0].is_nan() and value[1] == Decimal(1)


def test_float_arrays_keep_nan_and_infinity() -> None:
    value = to_python(1022, "{1.5,NaN,Infinity,-Infinity,NULL}")
    assert value[0] == 1.5 and math.isnan(value[1])
    assert value[2:] == [math.inf, -math.inf, None]


def test_text_array_quoting_and_escapes() -> None:
    # What array_out prints for ARRAY['a b', 'c"d', 'NULL', '', 'x\y', 'é', NULL, '{}', ',']
    text = '{"a b","c\\"d","NULL","","x\\\\y",é,NULL,"{}",","}'
    assert to_python(1009, text) == ["a b", 'c"d', "NULL", "", "x\\y", "é", None, "{}", ","]
    # Quoted "NULL" is the string; unquoted NULL in any case is SQL NULL.
    assert to_python(1009, '{"NULL",NULL,null}') == ["NULL", None, None]
    # Elements keep their inner whitespace only when quoted.
    assert to_python(1009, '{"  padded  "}') == ["  padded  "]
    assert to_python(1015, "{abc,de}") == ["abc", "de"]


def test_very_long_array_element() -> None:
    big = "x" * 100_000
    assert to_python(1009, "{" + big + ',"' + big + ' "}') == [big, big + " "]


def test_box_arrays_use_semicolons() -> None:
    assert to_python(1020, "{(1,1),(0,0);(2,2),(1,1)}") == ["(1,1),(0,0)", "(2,2),(1,1)"]
    assert to_python(0, "{(1,1),(0,0);(2,2),(1,1)}", "box[]") == ["(1,1),(0,0)", "(2,2),(1,1)"]


def test_range_arrays_are_lists_of_text() -> None:
    assert to_python(3905, '{"[1,5)",empty}') == ["[1,5)", "empty"]


@pytest.mark.parametrize(
    "text", ["", "1,2", "{1,2", "{1,2}}", "{1,2}x", '{"abc}', "{{1,2}", "[0:1]{1,2}", "}"]
)
def test_malformed_arrays_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="array"):
        to_python(1007, text)


def test_parse_array_is_usable_directly() -> None:
    assert pgtypes.parse_array('{a,"b c"}') == ["a", "b c"]
    assert pgtypes.parse_array("{1;2}", int, ";") == [1, 2]


# -- by type name: enums, domains, extension types and their arrays ------------------------


@pytest.mark.parametrize(
    ("type_name", "text", "expected"),
    [
        ("mood[]", "{happy,NULL,sad}", ["happy", None, "sad"]),
        ("public.mood[]", '{"very happy"}', ["very happy"]),
        ("citext[]", "{Abc,aBC}", ["Abc", "aBC"]),
        ("integer[]", "{1,2}", [1, 2]),
        ("numeric(12,2)[]", "{1.50}", [Decimal("1.50")]),
        (
            "timestamp(3) with time zone[]",
            '{"2024-01-02 03:04:05+00"}',
            [datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)],
        ),
        ("character varying(10)[]", "{a}", ["a"]),
        ("integer", "5", 5),
        ("numeric(12,2)", "1.50", Decimal("1.50")),
        ("timestamp(6) without time zone", "2024-01-02 03:04:05", datetime(2024, 1, 2, 3, 4, 5)),
        ("interval day to second", "1 day", timedelta(days=1)),
        ("interval second(3)", "00:00:01.5", timedelta(seconds=1.5)),
        ("pg_catalog.int8", "7", 7),
        ("mood", "happy", "happy"),
        ("posint", "5", "5"),
    ],
)
def test_unknown_oid_falls_back_to_the_type_name(type_name: str, text: str, expected: Any) -> None:
    assert to_python(987654, text, type_name) == expected


def test_the_oid_wins_over_the_type_name() -> None:
    assert to_python(pgtypes.INT4, "5", "text") == 5
    assert to_python(pgtypes.TEXT, "5", "integer") == "5"


def test_converter_for() -> None:
    assert pgtypes.converter_for(pgtypes.INT4) is int
    assert pgtypes.converter_for(pgtypes.TEXT) is None
    assert pgtypes.converter_for(424242, "mood") is None
    convert = pgtypes.converter_for(424243, "mood[]")
    assert convert is not None and convert("{a,b}") == ["a", "b"]


def test_row_to_python() -> None:
    table = TableSchema(
        "public",
        "t",
        (
            Column("id", pgtypes.INT4, "integer", is_key=True),
            Column("amount", pgtypes.NUMERIC, "numeric(12,2)"),
            Column("tags", 424242, "mood[]"),
            Column("big", pgtypes.TEXT, "text"),
            Column("gone", pgtypes.TEXT, "text"),
        ),
    )
    assert row_to_python(table, ("1", "2.50", "{happy}", UNCHANGED, None)) == {
        "id": 1,
        "amount": Decimal("2.50"),
        "tags": ["happy"],
        "big": UNCHANGED,
        "gone": None,
    }
    with pytest.raises(ValueError):
        row_to_python(table, ("1",))
