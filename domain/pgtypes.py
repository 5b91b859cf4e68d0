"""PostgreSQL text values to Python values, by type OID (or type name). Pure: stdlib only.

Values arrive in PostgreSQL's text output format, as pgoutput and COPY produce them with the
server's defaults: DateStyle ISO, IntervalStyle postgres, bytea_output hex. The mapping, and
what every type becomes, is documented in docs/types.md. The rules:

* Exact types stay exact: numeric and money become Decimal, never float.
* A value PostgreSQL has but the Python type cannot hold stays the text PostgreSQL sent
  (``'infinity'``, BC dates, years after 9999, ``24:00:00``, intervals with months): never a
  wrong or clamped value, never an exception.
* ``timestamptz`` becomes an aware datetime in UTC: the offset in the text is only the
  sending session's TimeZone, not part of the value.
* Types without a converter (enums, domains, ranges, bit strings, xml, tsvector, macaddr,
  extension types) stay ``str``, which is exact and lossless.
* A value that is not in the expected output format (bytea in escape format, an interval in
  another IntervalStyle, a malformed array) raises ValueError instead of being guessed at.

Types whose OID is not fixed (enums, domains, extension types, arrays of those) are looked
up by the column's type name (``Column.type_name``, format_type() output) when their OID
has no converter: ``mood[]`` decodes as a list of str, ``integer[]`` as a list of int.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

from domain.events import UNCHANGED, TableSchema, TextRow

# Type OIDs from pg_type.dat; stable across PostgreSQL versions (pinned by the unit tests
# and checked against a real server's pg_type by tests/integration/test_types_end_to_end.py).
BOOL, BYTEA, CHAR, NAME, INT8, INT2, INT4, TEXT, OID = 16, 17, 18, 19, 20, 21, 23, 25, 26
JSON, XML, CIDR, FLOAT4, FLOAT8, MACADDR8, MONEY = 114, 142, 650, 700, 701, 774, 790
MACADDR, INET, BPCHAR, VARCHAR = 829, 869, 1042, 1043
DATE, TIME, TIMESTAMP, TIMESTAMPTZ, INTERVAL, TIMETZ = 1082, 1083, 1114, 1184, 1186, 1266
BIT, VARBIT, NUMERIC, UUID, PG_LSN, TSVECTOR, TSQUERY, JSONB = (
    1560,
    1562,
    1700,
    2950,
    3220,
    3614,
    3615,
    3802,
)
INT4RANGE, NUMRANGE, TSRANGE, TSTZRANGE, DATERANGE, INT8RANGE = 3904, 3906, 3908, 3910, 3912, 3926

# Built-in array types: array OID -> element OID.
ARRAY_ELEMENT: dict[int, int] = {
    1000: BOOL,
    1001: BYTEA,
    1002: CHAR,
    1003: NAME,
    1016: INT8,
    1005: INT2,
    1007: INT4,
    1009: TEXT,
    1028: OID,
    199: JSON,
    143: XML,
    651: CIDR,
    1021: FLOAT4,
    1022: FLOAT8,
    775: MACADDR8,
    791: MONEY,
    1040: MACADDR,
    1041: INET,
    1014: BPCHAR,
    1015: VARCHAR,
    1182: DATE,
    1183: TIME,
    1115: TIMESTAMP,
    1185: TIMESTAMPTZ,
    1187: INTERVAL,
    1270: TIMETZ,
    1561: BIT,
    1563: VARBIT,
    1231: NUMERIC,
    2951: UUID,
    3221: PG_LSN,
    3643: TSVECTOR,
    3645: TSQUERY,
    3807: JSONB,
    3905: INT4RANGE,
    3907: NUMRANGE,
    3909: TSRANGE,
    3911: TSTZRANGE,
    3913: DATERANGE,
    3927: INT8RANGE,
}

# format_type() names (typmods removed) and internal names of the built-in types.
TYPE_NAMES: dict[str, int] = {
    "boolean": BOOL,
    "bool": BOOL,
    "bytea": BYTEA,
    '"char"': CHAR,
    "name": NAME,
    "bigint": INT8,
    "int8": INT8,
    "smallint": INT2,
    "int2": INT2,
    "integer": INT4,
    "int4": INT4,
    "int": INT4,
    "text": TEXT,
    "oid": OID,
    "json": JSON,
    "xml": XML,
    "cidr": CIDR,
    "real": FLOAT4,
    "float4": FLOAT4,
    "double precision": FLOAT8,
    "float8": FLOAT8,
    "macaddr8": MACADDR8,
    "money": MONEY,
    "macaddr": MACADDR,
    "inet": INET,
    "character": BPCHAR,
    "bpchar": BPCHAR,
    "character varying": VARCHAR,
    "varchar": VARCHAR,
    "date": DATE,
    "time without time zone": TIME,
    "time": TIME,
    "timestamp without time zone": TIMESTAMP,
    "timestamp": TIMESTAMP,
    "timestamp with time zone": TIMESTAMPTZ,
    "timestamptz": TIMESTAMPTZ,
    "interval": INTERVAL,
    "time with time zone": TIMETZ,
    "timetz": TIMETZ,
    "bit": BIT,
    "bit varying": VARBIT,
    "varbit": VARBIT,
    "numeric": NUMERIC,
    "decimal": NUMERIC,
    "uuid": UUID,
    "pg_lsn": PG_LSN,
    "tsvector": TSVECTOR,
    "tsquery": TSQUERY,
    "jsonb": JSONB,
}


# -- scalars -----------------------------------------------------------------------------

_BOOLS = {"t": True, "f": False}


def _bool(text: str) -> bool:
    try:
        return _BOOLS[text]
    except KeyError:
        raise ValueError(f"not a PostgreSQL boolean: {text!r}") from None


def _bytea(text: str) -> bytes:
    if text.startswith("\\x"):
        return bytes.fromhex(text[2:])
    raise ValueError("bytea must be in hex output format (bytea_output = 'hex')")


def _numeric(text: str) -> Decimal:
    return Decimal(text)  # exact; NaN and +/-Infinity are valid Decimals too


# money's text form follows lc_monetary. Only the form of lc_monetary C/POSIX (and en_US,
# which prints the same) is unambiguous enough to read back: -$1,234.56.
_MONEY = re.compile(r"(-?)\$(\d{1,3}(?:,\d{3})*)(\.\d+)?")


def _money(text: str) -> Decimal | str:
    match = _MONEY.fullmatch(text)
    if match is None:
        return text  # another locale's format: kept as sent (see docs/types.md)
    sign, whole, frac = match.groups()
    return Decimal(sign + whole.replace(",", "") + (frac or ""))


def _float(text: str) -> float:
    return float(text)  # accepts NaN, Infinity, -Infinity


def _beyond_python(text: str) -> bool:
    """Values PostgreSQL has but datetime cannot hold: infinities, BC, years past 9999."""
    return (
        text in ("infinity", "-infinity") or text.endswith(" BC") or len(text.split("-", 1)[0]) > 4
    )


def _timestamp(text: str) -> datetime | str:
    if _beyond_python(text):
        return text
    return datetime.fromisoformat(text)


def _timestamptz(text: str) -> datetime | str:
    if _beyond_python(text):
        return text
    # PostgreSQL prints offsets as +HH, +HH:MM or +HH:MM:SS; normalise +HH for fromisoformat.
    iso = text + ":00" if len(text) >= 3 and text[-3] in "+-" and text[-2:].isdigit() else text
    try:
        return datetime.fromisoformat(iso).astimezone(UTC)
    except OverflowError:  # 9999-12-31 23:00-05 is in year 10000 in UTC
        return text


def _date(text: str) -> date | str:
    if _beyond_python(text):
        return text
    return date.fromisoformat(text)


def _time(text: str) -> time | str:
    if text.startswith("24:"):
        return text  # PostgreSQL allows 24:00:00; Python's time() does not
    return time.fromisoformat(text)


def _timetz(text: str) -> time | str:
    """An aware time with the offset PostgreSQL stored (timetz keeps its offset)."""
    if text.startswith("24:"):
        return text
    if len(text) >= 3 and text[-3] in "+-" and text[-2:].isdigit():
        text += ":00"
    return time.fromisoformat(text)


_INTERVAL = re.compile(
    r"(?:([+-]?\d+) years? ?)?"
    r"(?:([+-]?\d+) mons? ?)?"
    r"(?:([+-]?\d+) days? ?)?"
    r"(?:([+-]?)(\d+):(\d\d):(\d\d)(?:\.(\d{1,6}))?)?"
)


def _interval(text: str) -> timedelta | str:
    """IntervalStyle postgres. Days and time: a timedelta (a day counts as 24 hours). With
    years or months (no fixed length in days) or infinite: the text as sent."""
    if text in ("infinity", "-infinity"):
        return text
    match = _INTERVAL.fullmatch(text)
    if match is None or not text:
        raise ValueError(f"interval not in IntervalStyle 'postgres' output format: {text!r}")
    years, months, days, sign, hours, minutes, seconds, fraction = match.groups()
    if (years and int(years)) or (months and int(months)):
        return text
    value = timedelta(days=int(days or 0))
    if hours is not None:
        clock = timedelta(
            hours=int(hours),
            minutes=int(minutes),
            seconds=int(seconds),
            microseconds=int((fraction or "").ljust(6, "0")),
        )
        value += -clock if sign == "-" else clock
    return value


def _inet(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    return ipaddress.ip_interface(text)


def _cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


CONVERTERS: dict[int, Callable[[str], Any]] = {
    BOOL: _bool,
    BYTEA: _bytea,
    INT2: int,
    INT4: int,
    INT8: int,
    OID: int,
    FLOAT4: _float,
    FLOAT8: _float,
    NUMERIC: _numeric,
    MONEY: _money,
    DATE: _date,
    TIME: _time,
    TIMETZ: _timetz,
    TIMESTAMP: _timestamp,
    TIMESTAMPTZ: _timestamptz,
    INTERVAL: _interval,
    UUID: uuid.UUID,
    JSON: json.loads,
    JSONB: json.loads,
    INET: _inet,
    CIDR: _cidr,
}


# -- arrays ------------------------------------------------------------------------------


def _identity(text: str) -> str:
    return text


def parse_array(
    text: str, convert: Callable[[str], Any] = _identity, delimiter: str = ","
) -> list[Any]:
    """A PostgreSQL array literal as array_out prints it, to (nested) lists.

    Unquoted NULL is None; quoted elements are unescaped before `convert`. A leading
    dimension decoration (``[0:2]=``, printed when a lower bound is not 1) is dropped: the
    lists hold the elements, not the bounds.
    """
    if text.startswith("["):
        eq = text.find("=")
        if eq < 0:
            raise ValueError(f"malformed array literal: {text!r}")
        text = text[eq + 1 :]
    if not text.startswith("{"):
        raise ValueError(f"malformed array literal: {text!r}")
    stack: list[list[Any]] = []
    root: list[Any] | None = None
    i, n = 0, len(text)
    try:
        while i < n:
            ch = text[i]
            if ch == "{":
                new: list[Any] = []
                if stack:
                    stack[-1].append(new)
                stack.append(new)
                i += 1
            elif ch == "}":
                done = stack.pop()
                i += 1
                if not stack:
                    root = done
                    break
            elif ch == delimiter:
                i += 1
            elif ch == '"':
                i += 1
                parts: list[str] = []
                while True:
                    j = i
                    while text[j] != '"' and text[j] != "\\":
                        j += 1
                    parts.append(text[i:j])
                    if text[j] == "\\":
                        parts.append(text[j + 1])
                        i = j + 2
                    else:
                        i = j + 1
                        break
                stack[-1].append(convert("".join(parts)))
            else:
                j = i
                while text[j] != delimiter and text[j] != "}":
                    j += 1
                token = text[i:j].strip()
                stack[-1].append(None if token.upper() == "NULL" else convert(token))
                i = j
    except IndexError:
        raise ValueError(f"malformed array literal: {text!r}") from None
    if root is None or i != n:
        raise ValueError(f"malformed array literal: {text!r}")
    return root


def _array_of(convert: Callable[[str], Any], delimiter: str = ",") -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return parse_array(text, convert, delimiter)

    return parse


for _array_oid, _element_oid in ARRAY_ELEMENT.items():
    CONVERTERS[_array_oid] = _array_of(CONVERTERS.get(_element_oid, _identity))
# box is the one built-in type whose array delimiter is ';' (its values contain commas).
BOX, BOX_ARRAY = 603, 1020
CONVERTERS[BOX_ARRAY] = _array_of(_identity, ";")


# -- lookup ------------------------------------------------------------------------------

# OIDs below this are assigned at initdb (built-in types); CREATE TYPE, CREATE DOMAIN and
# CREATE EXTENSION get OIDs from here up, different in every database.
FIRST_NORMAL_OBJECT_ID = 16384

_TYPMOD = re.compile(r"\(\s*\d+\s*(?:,\s*-?\d+\s*)?\)")


def _base_name(type_name: str) -> str:
    name = _TYPMOD.sub("", type_name).strip()
    name = name.removeprefix("pg_catalog.")
    if name.startswith("interval "):  # interval day to second, interval second(3), ...
        return "interval"
    return " ".join(name.split())


@lru_cache(maxsize=1024)
def converter_for(type_oid: int, type_name: str = "") -> Callable[[str], Any] | None:
    """The converter of a column: by OID, or for a type created in the database (an OID of
    at least FIRST_NORMAL_OBJECT_ID, or 0 when unknown) by type name: enums, domains and
    extension types have no fixed OID, and ``name[]`` is an array of ``name``.
    None: the value stays a str."""
    convert = CONVERTERS.get(type_oid)
    if convert is not None or not type_name or 0 < type_oid < FIRST_NORMAL_OBJECT_ID:
        return convert  # a built-in type is decided by its OID alone
    name = _base_name(type_name)
    if name.endswith("[]"):
        element = name.rstrip("[]").strip()
        if element == "box":
            return CONVERTERS[BOX_ARRAY]
        element_oid = TYPE_NAMES.get(element)
        inner = CONVERTERS.get(element_oid, _identity) if element_oid else _identity
        return _array_of(inner)
    oid = TYPE_NAMES.get(name)
    return CONVERTERS.get(oid) if oid is not None else None


def to_python(type_oid: int, text: str | None, type_name: str = "") -> Any:
    """Convert one text value; NULL (None) and UNCHANGED pass through untouched.

    `type_name` (Column.type_name) is consulted only when the OID has no converter. Types
    without a converter stay text (exact, lossless)."""
    if text is None or text is UNCHANGED:
        return text
    convert = converter_for(type_oid, type_name)
    return text if convert is None else convert(text)


def row_to_python(table: TableSchema, row: TextRow) -> dict[str, Any]:
    """A whole row (SourceEvent.before or .after) as {column name: Python value}."""
    return {
        column.name: to_python(column.type_oid, value, column.type_name)
        for column, value in zip(table.columns, row, strict=True)
    }
