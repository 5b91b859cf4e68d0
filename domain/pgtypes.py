"""PostgreSQL text values to Python values, by type OID. Pure: standard library only."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

from domain.events import UNCHANGED

# Type OIDs from pg_type.dat; stable across PostgreSQL versions.
BOOL, BYTEA, NAME, INT8, INT2, INT4, TEXT, OID = 16, 17, 19, 20, 21, 23, 25, 26
JSON, FLOAT4, FLOAT8, MONEY, BPCHAR, VARCHAR = 114, 700, 701, 790, 1042, 1043
DATE, TIME, TIMESTAMP, TIMESTAMPTZ, INTERVAL, TIMETZ = 1082, 1083, 1114, 1184, 1186, 1266
NUMERIC, UUID, JSONB = 1700, 2950, 3802


def _bool(text: str) -> bool:
    return text == "t"


def _bytea(text: str) -> bytes:
    if text.startswith("\\x"):
        return bytes.fromhex(text[2:])
    raise ValueError("bytea must be in hex output format (bytea_output = 'hex')")


def _numeric(text: str) -> Decimal | str:
    return Decimal(text)  # exact; NaN and +/-Infinity are valid Decimals too


def _beyond_python(text: str) -> bool:
    """Values PostgreSQL has but datetime cannot hold: infinities, BC, years past 9999."""
    return (
        text in ("infinity", "-infinity")
        or text.endswith(" BC")
        or len(text.split("-", 1)[0]) > 4
    )


def _timestamp(text: str) -> datetime | str:
    if _beyond_python(text):
        return text
    return datetime.fromisoformat(text)


def _timestamptz(text: str) -> datetime | str:
    if _beyond_python(text):
        return text
    # PostgreSQL prints offsets as +HH or +HH:MM; fromisoformat needs +HH:MM.
    if len(text) >= 3 and text[-3] in "+-" and text[-2:].isdigit():
        text += ":00"
    return datetime.fromisoformat(text)


def _date(text: str) -> date | str:
    if _beyond_python(text):
        return text
    return date.fromisoformat(text)


def _time(text: str) -> time | str:
    if text.startswith("24:"):
        return text  # PostgreSQL allows 24:00:00; Python's time() does not
    return time.fromisoformat(text)


def _float(text: str) -> float:
    return float(text)  # accepts NaN, Infinity, -Infinity


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
    DATE: _date,
    TIME: _time,
    TIMESTAMP: _timestamp,
    TIMESTAMPTZ: _timestamptz,
    UUID: uuid.UUID,
    JSON: json.loads,
    JSONB: json.loads,
}


def to_python(type_oid: int, text: str | None) -> Any:
    """Convert one text value; types without a converter stay text (exact, lossless)."""
    if text is None or text is UNCHANGED:
        return text
    convert = CONVERTERS.get(type_oid)
    return text if convert is None else convert(text)
