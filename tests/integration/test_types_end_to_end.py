"""Every common PostgreSQL type through the real pipeline, and through domain.pgtypes.

A source table has one column per type (plus an enum, a domain and citext). Rows with
ordinary, edge (NULL, empty arrays, infinity, NaN, empty strings) and unicode / very long
(TOASTed) values exist before the initial snapshot and are inserted again while streaming,
then updated (without touching the TOASTed columns) and deleted. Real PostgreSQL, real
`cdc ingest` and `cdc sink` processes. Checked:

* the PostgreSQL sink table equals the source, column by column as text, row by row;
* the sink's column types (the source's, or text for types the target database lacks);
* to_python() of every value, as the sink stores it (snapshot rows, read with COPY, the
  same text format the reader gets) and as pgoutput sends it (a second slot on the same
  publication decoded with the pipeline's own PgOutputDecoder), equals the expected value;
* what an update that leaves TOASTed columns alone sends, with REPLICA IDENTITY DEFAULT and
  FULL (docs/types.md, "TOAST and REPLICA IDENTITY").
"""

from __future__ import annotations

import ipaddress
import json
import math
import random
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from adapters.postgres.source.pgoutput import PgOutputDecoder
from domain import pgtypes
from domain.events import UNCHANGED, Column, Operation, SourceEvent, TableSchema
from domain.pgtypes import row_to_python, to_python
from services.net import find_free_port as free_port
from tests.support.pipeline import (
    PipelineFiles,
    Stage,
    http_status,
    ingest_stage,
    sink_stage,
    wait_until,
    write_configs,
)

pytestmark = pytest.mark.integration

TABLE = "public.alltypes"

# (column, SQL type). The sink creates its table from these types (format_type() names).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("c_numeric", "numeric(30,10)"),
    ("c_numeric_free", "numeric"),
    ("c_money", "money"),
    ("c_int2", "smallint"),
    ("c_int4", "integer"),
    ("c_int8", "bigint"),
    ("c_float4", "real"),
    ("c_float8", "double precision"),
    ("c_bool", "boolean"),
    ("c_text", "text"),
    ("c_varchar", "character varying(20)"),
    ("c_char", "character(5)"),
    ("c_name", "name"),
    ("c_citext", "citext"),
    ("c_timestamp", "timestamp without time zone"),
    ("c_timestamptz", "timestamp with time zone"),
    ("c_date", "date"),
    ("c_time", "time without time zone"),
    ("c_timetz", "time with time zone"),
    ("c_interval", "interval"),
    ("c_uuid", "uuid"),
    ("c_json", "json"),
    ("c_jsonb", "jsonb"),
    ("c_bytea", "bytea"),
    ("c_int_array", "integer[]"),
    ("c_int_matrix", "integer[]"),
    ("c_text_array", "text[]"),
    ("c_numeric_array", "numeric[]"),
    ("c_tstz_array", "timestamp with time zone[]"),
    ("c_jsonb_array", "jsonb[]"),
    ("c_mood", "mood"),
    ("c_mood_array", "mood[]"),
    ("c_posint", "posint"),
    ("c_inet", "inet"),
    ("c_cidr", "cidr"),
    ("c_macaddr", "macaddr"),
    ("c_int4range", "int4range"),
    ("c_daterange", "daterange"),
    ("c_bit", "bit(4)"),
    ("c_varbit", "bit varying(16)"),
    ("c_xml", "xml"),
    ("c_tsvector", "tsvector"),
    ("c_oid", "oid"),
)
NAMES = tuple(name for name, _ in COLUMNS)
# Created by the test, not known to a target database that was not prepared for them.
USER_TYPES = {"c_citext", "c_mood", "c_mood_array", "c_posint"}
TOASTED = ("c_text", "c_jsonb", "c_bytea", "c_text_array")

SOURCE_DDL = f"""
CREATE EXTENSION citext;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'very happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE {TABLE} (
    id integer PRIMARY KEY,
    {", ".join(f"{name} {sql_type}" for name, sql_type in COLUMNS)}
);
"""
TARGET_TYPES_DDL = """
CREATE EXTENSION citext;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'very happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
"""


def tz(hours: int, minutes: int = 0) -> timezone:
    sign = -1 if hours < 0 else 1
    return timezone(sign * timedelta(hours=abs(hours), minutes=minutes))


def _long_unicode(rng: random.Random, n: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 éüßçøΩЖ漢字かな한🙂🚀\"'\\,{}"
    return "".join(rng.choice(alphabet) for _ in range(n))


_RNG = random.Random(20240229)
LONG_TEXT = _long_unicode(_RNG, 120_000)  # random: compresses badly, stored out of line
LONG_BYTES = _RNG.randbytes(60_000)
LONG_JSON = {"emoji": "🙂", "items": [_long_unicode(_RNG, 50) for _ in range(1500)]}
LONG_ARRAY = [_long_unicode(_RNG, 40) for _ in range(2000)] + ["NULL", "", " x "]


def _array_literal(items: Sequence[str | None]) -> str:
    def quote(s: str | None) -> str:
        if s is None:
            return "NULL"
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "{" + ",".join(quote(s) for s in items) + "}"


# Each row: column -> (input text, cast by the column's type on insert; expected to_python).
# Columns left out are NULL (expected None).
Row = dict[str, tuple[str, Any]]

ORDINARY: Row = {
    "c_numeric": (
        "12345678901234567890.0123456789",
        Decimal("12345678901234567890.0123456789"),
    ),
    "c_numeric_free": ("-0.000000000000000000001", Decimal("-1E-21")),
    "c_money": ("1234.56", Decimal("1234.56")),
    "c_int2": ("-32768", -32768),
    "c_int4": ("2147483647", 2147483647),
    "c_int8": ("-9223372036854775808", -(2**63)),
    "c_float4": ("1.5", 1.5),
    "c_float8": ("-2.5e-10", -2.5e-10),
    "c_bool": ("true", True),
    "c_text": ('plain "quoted" \\ back\\slash\ttab\nnewline', None),  # expected: the input
    "c_varchar": ("héllo wörld", "héllo wörld"),
    "c_char": ("ab", "ab   "),  # character(n) is blank-padded
    "c_name": ("some_name", "some_name"),
    "c_citext": ("MiXeD Case", "MiXeD Case"),
    "c_timestamp": ("2024-02-29 13:45:07.123456", datetime(2024, 2, 29, 13, 45, 7, 123456)),
    "c_timestamptz": (
        "2024-02-29 13:45:07.5+05:30",
        datetime(2024, 2, 29, 8, 15, 7, 500000, tzinfo=UTC),
    ),
    "c_date": ("2024-02-29", date(2024, 2, 29)),
    "c_time": ("13:45:07.25", time(13, 45, 7, 250000)),
    "c_timetz": ("13:45:07+05:30", time(13, 45, 7, tzinfo=tz(5, 30))),
    "c_interval": (
        "3 days 04:05:06.789",
        timedelta(days=3, hours=4, minutes=5, seconds=6, microseconds=789000),
    ),
    "c_uuid": (
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ),
    "c_json": ('{"b": 1, "a": [1, 2.5, null]}', {"b": 1, "a": [1, 2.5, None]}),
    "c_jsonb": (
        '{"nested": {"k": "é"}, "n": 12345678901234567890}',
        {"nested": {"k": "é"}, "n": 12345678901234567890},
    ),
    "c_bytea": ("\\x00ff10", b"\x00\xff\x10"),
    "c_int_array": ("{1,NULL,3}", [1, None, 3]),
    "c_int_matrix": ("{{1,2},{3,4}}", [[1, 2], [3, 4]]),
    "c_text_array": (
        _array_literal(["a b", 'c"d', "NULL", "", "x\\y", "é", None, "{}", ","]),
        ["a b", 'c"d', "NULL", "", "x\\y", "é", None, "{}", ","],
    ),
    "c_numeric_array": ("{1.50,-Infinity,NULL}", [Decimal("1.50"), Decimal("-Infinity"), None]),
    "c_tstz_array": (
        '{"2024-01-02 03:04:05+00",infinity}',
        [datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "infinity"],
    ),
    "c_jsonb_array": ('{"{\\"a\\": 1}","[]"}', [{"a": 1}, []]),
    "c_mood": ("happy", "happy"),
    "c_mood_array": ('{happy,"very happy",NULL}', ["happy", "very happy", None]),
    "c_posint": ("42", "42"),  # a domain: text (see docs/types.md)
    "c_inet": ("192.168.0.1/24", ipaddress.ip_interface("192.168.0.1/24")),
    "c_cidr": ("10.0.0.0/8", ipaddress.ip_network("10.0.0.0/8")),
    "c_macaddr": ("08:00:2B:01:02:03", "08:00:2b:01:02:03"),
    "c_int4range": ("[1,5)", "[1,5)"),
    "c_daterange": ("[2024-01-01,2024-02-01)", "[2024-01-01,2024-02-01)"),
    "c_bit": ("1010", "1010"),
    "c_varbit": ("101", "101"),
    "c_xml": ('<a x="1">é</a>', '<a x="1">é</a>'),
    "c_tsvector": ("a fat cat", "'a' 'cat' 'fat'"),
    "c_oid": ("4294967295", 4294967295),
}
ORDINARY["c_text"] = (ORDINARY["c_text"][0], ORDINARY["c_text"][0])

ALL_NULL: Row = {}

SPECIAL: Row = {
    "c_numeric": ("NaN", Decimal("NaN")),
    "c_numeric_free": ("Infinity", Decimal("Infinity")),
    "c_money": ("-92233720368547758.08", Decimal("-92233720368547758.08")),
    "c_int2": ("32767", 32767),
    "c_int4": ("-2147483648", -(2**31)),
    "c_int8": ("9223372036854775807", 2**63 - 1),
    "c_float4": ("NaN", math.nan),
    "c_float8": ("-Infinity", -math.inf),
    "c_bool": ("false", False),
    "c_text": ("", ""),
    "c_varchar": ("", ""),
    "c_char": ("", "     "),
    "c_name": ("", ""),
    "c_citext": ("", ""),
    "c_timestamp": ("infinity", "infinity"),
    "c_timestamptz": ("-infinity", "-infinity"),
    "c_date": ("infinity", "infinity"),
    "c_time": ("24:00:00", "24:00:00"),
    "c_timetz": ("00:00:00-15:59", time(0, 0, tzinfo=tz(-15, 59))),
    "c_interval": ("1 year 2 months 3 days 04:05:06", "1 year 2 mons 3 days 04:05:06"),
    "c_uuid": ("00000000-0000-0000-0000-000000000000", uuid.UUID(int=0)),
    "c_json": ("[]", []),
    "c_jsonb": ("null", None),  # JSON null, not SQL NULL: the text "null"
    "c_bytea": ("\\x", b""),
    "c_int_array": ("{}", []),
    "c_int_matrix": ("{}", []),
    "c_text_array": ("{}", []),
    "c_numeric_array": ("{NaN}", [Decimal("NaN")]),
    "c_tstz_array": ("{}", []),
    "c_jsonb_array": ("{NULL,null}", [None, None]),
    "c_mood": ("very happy", "very happy"),
    "c_mood_array": ("{}", []),
    "c_posint": ("1", "1"),
    "c_inet": ("::1", ipaddress.ip_interface("::1/128")),
    "c_cidr": ("2001:db8::/32", ipaddress.ip_network("2001:db8::/32")),
    "c_macaddr": ("ff:ff:ff:ff:ff:ff", "ff:ff:ff:ff:ff:ff"),
    "c_int4range": ("empty", "empty"),
    "c_daterange": ("(,)", "(,)"),
    "c_bit": ("0000", "0000"),
    "c_varbit": ("", ""),
    "c_xml": ("plain text", "plain text"),
    "c_tsvector": ("", ""),
    "c_oid": ("0", 0),
}

UNICODE_LONG: Row = {
    "c_numeric": ("-0.0000000001", Decimal("-1E-10")),
    "c_numeric_free": ("1" + "0" * 130 + ".5", Decimal("1" + "0" * 130 + ".5")),
    "c_text": (LONG_TEXT, LONG_TEXT),
    "c_varchar": ("漢字🙂", "漢字🙂"),
    "c_char": ("ü", "ü    "),
    "c_name": ("naïve_名前", "naïve_名前"),
    "c_citext": ("ÄÖÜ", "ÄÖÜ"),
    "c_timestamp": ("0044-03-15 12:00:00 BC", "0044-03-15 12:00:00 BC"),
    # Local mean time: printed with a seconds offset in most zones.
    "c_timestamptz": (
        "1900-01-01 00:00:00+05:53:28",
        datetime(1899, 12, 31, 18, 6, 32, tzinfo=UTC),
    ),
    "c_date": ("5874897-12-31", "5874897-12-31"),
    "c_time": ("23:59:59.999999", time(23, 59, 59, 999999)),
    "c_timetz": ("23:59:59.999999+15:59", time(23, 59, 59, 999999, tzinfo=tz(15, 59))),
    "c_interval": ("-178000000 years", "-178000000 years"),
    "c_json": ('{"emoji": "🙂", "dup": 1, "dup": 2}', {"emoji": "🙂", "dup": 2}),
    "c_jsonb": (json.dumps(LONG_JSON, ensure_ascii=False), LONG_JSON),
    "c_bytea": ("\\x" + LONG_BYTES.hex(), LONG_BYTES),
    "c_text_array": (_array_literal(LONG_ARRAY), LONG_ARRAY),
    "c_mood_array": ('{"very happy",sad,ok}', ["very happy", "sad", "ok"]),
    "c_inet": ("2001:db8::1/64", ipaddress.ip_interface("2001:db8::1/64")),
    "c_xml": ("<t>漢字🙂</t>", "<t>漢字🙂</t>"),
}

ROWS: tuple[Row, ...] = (ORDINARY, ALL_NULL, SPECIAL, UNICODE_LONG)
SNAPSHOT_IDS = (1, 2, 3, 4)  # inserted before the pipeline starts
STREAM_IDS = (101, 102, 103, 104)  # inserted while it streams
TOAST_IDS = (4, 104)  # their TOASTed columns are left alone by an update
DELETED_IDS = (2, 102)


def _row(row_id: int) -> Row:
    row = ROWS[(row_id % 100) - 1]
    return {name: value for name, value in row.items() if name not in _OMITTED}


# Columns whose values the server cannot take (xml without libxml): left NULL in every row.
_OMITTED: set[str] = set()


def omit_unsupported(conn: psycopg.Connection[Any]) -> None:
    _OMITTED.clear()
    try:
        with conn.transaction():
            conn.execute("SELECT '<a/>'::xml")
    except psycopg.errors.FeatureNotSupported:  # built without libxml: xml input fails
        _OMITTED.add("c_xml")


def expected_row(row_id: int) -> dict[str, Any]:
    row = _row(row_id)
    return {"id": row_id, **{name: row[name][1] if name in row else None for name in NAMES}}


def insert_row(conn: psycopg.Connection[Any], row_id: int) -> None:
    row = _row(row_id)
    names = ["id", *row]
    casts = ["%s::integer", *(f"%s::{dict(COLUMNS)[name]}" for name in row)]
    conn.execute(
        f"INSERT INTO {TABLE} ({', '.join(names)}) VALUES ({', '.join(casts)})",
        [row_id, *(value for value, _ in row.values())],
    )


def same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN (float and Decimal), recursively."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, Decimal) and isinstance(b, Decimal) and a.is_nan() and b.is_nan():
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def assert_values(where: str, actual: dict[str, Any], expected: dict[str, Any]) -> None:
    wrong = [
        f"{name}: got {_short(actual[name])}, expected {_short(expected[name])}"
        for name in expected
        if not same(actual[name], expected[name])
    ]
    assert not wrong, f"{where}:\n  " + "\n  ".join(wrong)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 200 else text[:200] + f"... ({len(text)} chars)"


def rows_as_text(dsn: str) -> list[tuple[Any, ...]]:
    """Every column as text (in UTC), by id: an exact comparison of stored values."""
    columns = ", ".join(f"{name}::text" for name in NAMES)
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        try:
            return conn.execute(f"SELECT id, {columns} FROM {TABLE} ORDER BY id").fetchall()
        except psycopg.errors.UndefinedTable:
            return []


def column_types(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (TABLE,),
        ).fetchall()
    return dict(rows)


def _id(ev: SourceEvent) -> int:
    assert ev.after is not None and ev.after[0] is not None
    return int(ev.after[0])


def sync_describe(conn: psycopg.Connection[Any]) -> Callable[[int, list[Any]], list[Any]]:
    """What catalog.describe_relation does for the WAL reader, on a plain connection."""

    def describe(oid: int, raw: list[tuple[bool, str, int, int]]) -> list[tuple[str, bool]]:
        names = conn.execute(
            "SELECT format_type(t, m) FROM unnest(%s::oid[], %s::int[]) WITH ORDINALITY"
            " AS u(t, m, n) ORDER BY n",
            ([r[2] for r in raw], [r[3] for r in raw]),
        ).fetchall()
        return [(n[0], is_key) for n, (is_key, *_) in zip(names, raw, strict=True)]

    return describe


def source_schema(dsn: str) -> TableSchema:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT attname, atttypid, format_type(atttypid, atttypmod), attname = 'id'"
            " FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
            (TABLE,),
        ).fetchall()
    schema, table = TABLE.split(".")
    return TableSchema(schema, table, tuple(Column(r[0], int(r[1]), r[2], r[3]) for r in rows))


def copy_rows(dsn: str) -> dict[int, tuple[str | None, ...]]:
    """The sink table in COPY text format: the same output functions pgoutput uses."""
    out: dict[int, tuple[str | None, ...]] = {}
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        query = f"COPY (SELECT id, {', '.join(NAMES)} FROM {TABLE} ORDER BY id) TO STDOUT"
        with cur.copy(query) as copy:
            for row in copy.rows():
                out[int(row[0])] = tuple(row)
    return out


class Pipeline:
    """The source and target databases and the two `cdc` stages between them."""

    def __init__(self, pg: Any, tmp_path: Path, identity: str, target_has_types: bool) -> None:
        source_db, replica_db = pg.new_database("types_src"), pg.new_database("types_dst")
        self.source_dsn, self.replica_dsn = pg.dsn(source_db), pg.dsn(replica_db)
        with psycopg.connect(self.source_dsn, autocommit=True) as conn:
            omit_unsupported(conn)
            conn.execute(SOURCE_DDL)
            conn.execute(f"ALTER TABLE {TABLE} REPLICA IDENTITY {identity}")
            # Sessions of the source and the sink print timestamptz in other offsets than
            # UTC: the values must still be the same instants.
            conn.execute(f"ALTER DATABASE \"{source_db}\" SET timezone TO 'America/St_Johns'")
            for row_id in SNAPSHOT_IDS:
                insert_row(conn, row_id)
        with psycopg.connect(self.replica_dsn, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE \"{replica_db}\" SET timezone TO 'Asia/Kathmandu'")
            if target_has_types:
                conn.execute(TARGET_TYPES_DDL)
        self.files: PipelineFiles = write_configs(
            tmp_path,
            host=pg.host,
            port=pg.port,
            source_db=source_db,
            replica_db=replica_db,
            tables=[TABLE],
            pipeline_id=f"types-{uuid.uuid4().hex[:8]}",
        )
        with psycopg.connect(self.source_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE PUBLICATION {self.files.publication} FOR TABLE {TABLE}")
        self.audit_slot = self.files.slot + "_types"
        self.stages: list[Stage] = []

    def start(self, tmp_path: Path) -> None:
        port = free_port()
        self.stages = [
            sink_stage(self.files, tmp_path, port).start(),
            ingest_stage(self.files, tmp_path, {"replica": port}).start(),
        ]
        wait_until(
            lambda: http_status(self.files.health_port, "/readyz") == 200,
            90,
            "pipeline ready\n" + self.logs(),
        )

    def stop(self) -> None:
        for stage in reversed(self.stages):
            if stage.alive():
                stage.terminate()

    def logs(self) -> str:
        return "\n".join(f"--- {s.name} ---\n{s.log_tail(60)}" for s in self.stages)

    def wait_in_sync(self, what: str) -> None:
        wait_until(
            lambda: rows_as_text(self.source_dsn) == rows_as_text(self.replica_dsn),
            120,
            what + "\n" + self.logs(),
        )
        source, sink = rows_as_text(self.source_dsn), rows_as_text(self.replica_dsn)
        assert len(source) == len(sink)
        for a, b in zip(source, sink, strict=True):
            assert a == b, f"source row {a[0]} differs from the sink's"

    def create_audit_slot(self) -> None:
        with psycopg.connect(self.source_dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.audit_slot,)
            )

    def audit_events(self) -> list[SourceEvent]:
        """Every change since create_audit_slot(), decoded as the WAL reader decodes them."""
        with psycopg.connect(self.source_dsn, autocommit=True) as conn:
            messages = conn.execute(
                "SELECT data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL,"
                " 'proto_version', '1', 'publication_names', %s)",
                (self.audit_slot, self.files.publication),
            ).fetchall()
            conn.execute("SELECT pg_drop_replication_slot(%s)", (self.audit_slot,))
            decoder = PgOutputDecoder("types", describe=sync_describe(conn))
            events: list[SourceEvent] = []
            for (data,) in messages:
                decoder.decode(bytes(data), events)
        return events


@pytest.mark.parametrize(
    ("identity", "target_has_types"),
    [("DEFAULT", False), ("FULL", True)],
    ids=["identity-default/plain-target", "identity-full/target-with-types"],
)
def test_every_type_survives_the_pipeline_and_decodes(
    pg: Any, tmp_path: Path, identity: str, target_has_types: bool
) -> None:
    pipe = Pipeline(pg, tmp_path, identity, target_has_types)
    try:
        pipe.start(tmp_path)
        pipe.wait_in_sync("initial snapshot in the sink")

        # Snapshot rows as the sink stores them decode to the expected values.
        schema = source_schema(pipe.source_dsn)
        stored = copy_rows(pipe.replica_dsn)
        assert sorted(stored) == list(SNAPSHOT_IDS)
        for row_id, text_row in stored.items():
            assert_values(
                f"snapshot row {row_id} in the sink",
                row_to_python(schema, text_row),
                expected_row(row_id),
            )

        pipe.create_audit_slot()
        with psycopg.connect(pipe.source_dsn, autocommit=True) as conn:
            for row_id in STREAM_IDS:
                insert_row(conn, row_id)
            for row_id in TOAST_IDS:  # leaves the TOASTed columns alone
                conn.execute(f"UPDATE {TABLE} SET c_int4 = 7 WHERE id = %s", (row_id,))
            conn.execute(f"UPDATE {TABLE} SET c_text = 'changed', c_mood = 'sad' WHERE id = 1")
            conn.execute(f"DELETE FROM {TABLE} WHERE id = ANY(%s)", (list(DELETED_IDS),))
        pipe.wait_in_sync("streamed inserts, updates and deletes in the sink")
        events = pipe.audit_events()
    finally:
        pipe.stop()

    # The sink kept every TOASTed value the updates did not send (compared above as text;
    # spelled out here because it is the point of the UNCHANGED marker).
    kept = rows_as_text(pipe.replica_dsn)
    by_id = {row[0]: row for row in kept}
    text_at = NAMES.index("c_text") + 1
    for row_id in TOAST_IDS:
        assert by_id[row_id][text_at] == LONG_TEXT
        assert by_id[row_id][NAMES.index("c_int4") + 1] == "7"
    assert not set(DELETED_IDS) & set(by_id)

    # The sink's column types: the source's, except types the target database lacks.
    source_types, sink_types = column_types(pipe.source_dsn), column_types(pipe.replica_dsn)
    for name in ("id", *NAMES):
        if name in USER_TYPES and not target_has_types:
            assert sink_types[name] == "text", (name, sink_types[name])
        else:
            assert sink_types[name] == source_types[name], (name, sink_types[name])
    if target_has_types:
        # Same types: the rows are equal as JSON too, not only as text.
        def as_json(dsn: str) -> list[Any]:
            with psycopg.connect(dsn) as conn:
                conn.execute("SET TIME ZONE 'UTC'")
                return [
                    r[0] for r in conn.execute(f"SELECT to_jsonb(t) FROM {TABLE} t ORDER BY id")
                ]

        assert as_json(pipe.source_dsn) == as_json(pipe.replica_dsn)

    # What pgoutput sent, decoded: inserts carry every value...
    inserts = {_id(ev): ev for ev in events if ev.operation is Operation.CREATE}
    assert sorted(inserts) == list(STREAM_IDS)
    for row_id, ev in inserts.items():
        assert ev.after is not None
        assert_values(
            f"streamed insert {row_id}", row_to_python(ev.table, ev.after), expected_row(row_id)
        )
    # ...the enum array is typed by its name, since its OID is the database's own.
    mood_array = inserts[STREAM_IDS[0]].table.columns[NAMES.index("c_mood_array") + 1]
    assert mood_array.type_name == "mood[]" and mood_array.type_oid >= 16384

    # An update that leaves TOASTed values alone sends them as UNCHANGED, never NULL, with
    # either replica identity; FULL adds the complete old row.
    updates = {_id(ev): ev for ev in events if ev.operation is Operation.UPDATE}
    for row_id in TOAST_IDS:
        ev = updates[row_id]
        assert ev.after is not None
        after = row_to_python(ev.table, ev.after)
        for name in TOASTED:
            assert after[name] is UNCHANGED, (row_id, name)
        expected_after = expected_row(row_id) | {"c_int4": 7}
        assert_values(
            f"update {row_id}",
            {k: v for k, v in after.items() if k not in TOASTED},
            {k: v for k, v in expected_after.items() if k not in TOASTED},
        )
        if identity == "FULL":
            assert ev.before is not None
            assert_values(
                f"old row of update {row_id}",
                row_to_python(ev.table, ev.before),
                expected_row(row_id),
            )
        else:
            assert ev.before is None  # the key did not change: no old row at all
    deletes = [ev for ev in events if ev.operation is Operation.DELETE]
    assert len(deletes) == len(DELETED_IDS)
    for ev in deletes:
        assert ev.before is not None
        old = row_to_python(ev.table, ev.before)
        if identity == "FULL":
            assert_values("old row of delete", old, expected_row(old["id"]))
        else:  # only the key; the other columns come as NULL
            assert old["id"] in DELETED_IDS
            assert all(old[name] is None for name in NAMES)


def test_pgtypes_oids_and_names_match_the_servers_catalog(pg: Any) -> None:
    """The OIDs and names pgtypes relies on, checked against a real pg_type."""
    with pg.connect() as conn:
        for name, oid in pgtypes.TYPE_NAMES.items():
            row = conn.execute("SELECT to_regtype(%s)::oid", (name,)).fetchone()
            assert row is not None and row[0] == oid, (name, oid, row)
        for array_oid, element_oid in pgtypes.ARRAY_ELEMENT.items():
            row = conn.execute(
                "SELECT typarray FROM pg_type WHERE oid = %s", (element_oid,)
            ).fetchone()
            assert row is not None and row[0] == array_oid, (element_oid, array_oid, row)
        constants = {
            name: value
            for name, value in vars(pgtypes).items()
            if name.isupper() and isinstance(value, int) and name != "FIRST_NORMAL_OBJECT_ID"
        }
        for name, oid in constants.items():
            row = conn.execute("SELECT typname FROM pg_type WHERE oid = %s", (oid,)).fetchone()
            assert row is not None, (name, oid)
            typname = {"BOX_ARRAY": "_box", "PG_LSN": "pg_lsn"}.get(name, name.lower())
            assert row[0] == typname, (name, oid, row[0])


# Values straight from the server's output functions (SELECT ... in text format), for the
# types and edge cases the table above does not hold.
SERVER_OUTPUT = [
    ("'1 day -1 second'::interval", timedelta(days=1, seconds=-1)),
    ("'-1 day +1 second'::interval", timedelta(days=-1, seconds=1)),
    ("'-1.5 seconds'::interval", timedelta(seconds=-1.5)),
    ("'100 hours'::interval", timedelta(hours=100)),
    ("'-1 year -2 mons'::interval", "-1 years -2 mons"),
    ("'infinity'::interval", "infinity"),
    ("'24:00:00'::time", "24:00:00"),
    ("'-infinity'::date", "-infinity"),
    ("'10000-01-01'::date", "10000-01-01"),
    ("'294276-12-31 23:59:59'::timestamp", "294276-12-31 23:59:59"),
    ("'4713-01-01 BC'::date", "4713-01-01 BC"),
    ("'{{{1}},{{NULL}}}'::int[]", [[[1]], [[None]]]),
    ("'[0:1]={5,6}'::int[]", [5, 6]),
    ("ARRAY['\\x0102'::bytea, '\\x']", [b"\x01\x02", b""]),
    ("ARRAY['1 day'::interval, '1 mon']", [timedelta(days=1), "1 mon"]),
    (
        "ARRAY['10.0.0.1'::inet, '::1']",
        [ipaddress.ip_interface("10.0.0.1"), ipaddress.ip_interface("::1")],
    ),
    ("ARRAY['12:00+02'::timetz]", [time(12, tzinfo=tz(2))]),
    ("ARRAY['1.5'::money, '-2000']", [Decimal("1.50"), Decimal("-2000.00")]),
    ("ARRAY['(1,1),(0,0)'::box, '(2,2),(1,1)']", ["(1,1),(0,0)", "(2,2),(1,1)"]),
    ("ARRAY['[1,2)'::int4range, 'empty']", ["[1,2)", "empty"]),
    ("ARRAY[true, NULL]", [True, None]),
    ("ARRAY[1.5::float4, 'NaN', '-Infinity']", [1.5, math.nan, -math.inf]),
    ("'NaN'::numeric", Decimal("NaN")),
    ("'-Infinity'::numeric", Decimal("-Infinity")),
    ("'2001:db8::/32'::cidr", ipaddress.ip_network("2001:db8::/32")),
    ("'08:00:2b:01:02:03:04:05'::macaddr8", "08:00:2b:01:02:03:04:05"),
    ("'0/16B3748'::pg_lsn", "0/16B3748"),
    ("'fat & rat'::tsquery", "'fat' & 'rat'"),
    ("'a'::\"char\"", "a"),
]


def test_to_python_on_the_servers_own_output(pg: Any) -> None:
    expressions = [expr for expr, _ in SERVER_OUTPUT]
    with pg.connect() as conn:
        conn.execute("SET TIME ZONE 'Asia/Kathmandu'")
        with conn.cursor() as cur:
            # Text values with their type OIDs, exactly as the output functions print them.
            cur.execute("SELECT " + ", ".join(f"({e})::text" for e in expressions))
            texts = cur.fetchone()
            cur.execute("SELECT " + ", ".join(f"pg_typeof({e})::oid" for e in expressions))
            oids = cur.fetchone()
            cur.execute(
                "SELECT " + ", ".join(f"format_type(pg_typeof({e}), NULL)" for e in expressions)
            )
            names = cur.fetchone()
    assert texts is not None and oids is not None and names is not None
    for (expr, expected), text, oid, name in zip(SERVER_OUTPUT, texts, oids, names, strict=True):
        assert same(to_python(oid, text, name), expected), (expr, text, expected)


def test_source_session_settings_do_not_change_values(pg: Any, tmp_path: Path) -> None:
    source_db, replica_db = pg.new_database("styles_src"), pg.new_database("styles_dst")
    source_dsn, replica_dsn = pg.dsn(source_db), pg.dsn(replica_db)
    table = "public.styled"
    insert = f"INSERT INTO {table} VALUES (%s, '2024-04-03', '2024-04-03 12:00', 0.1::float8 + 0.2)"
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, d date, ts timestamp, f float8)")
        # Settings a DBA may well have on a database; every new session, the walsender
        # included, starts with them.
        conn.execute(f"ALTER DATABASE \"{source_db}\" SET datestyle TO 'SQL, DMY'")
        conn.execute(f'ALTER DATABASE "{source_db}" SET extra_float_digits TO 0')
        conn.execute(insert, (1,))
    files = write_configs(
        tmp_path,
        host=pg.host,
        port=pg.port,
        source_db=source_db,
        replica_db=replica_db,
        tables=[table],
        pipeline_id=f"styles-{uuid.uuid4().hex[:8]}",
    )
    port = free_port()
    stages = [
        sink_stage(files, tmp_path, port).start(),
        ingest_stage(files, tmp_path, {"replica": port}).start(),
    ]

    def rows(dsn: str) -> list[tuple[Any, ...]]:
        # This reading session must not be subject to the settings under test either.
        with psycopg.connect(dsn, options="-c extra_float_digits=3 -c datestyle=ISO") as conn:
            try:
                return conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
            except psycopg.errors.UndefinedTable:
                return []

    try:
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 90, "ready")
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute(insert, (2,))
        wait_until(lambda: len(rows(replica_dsn)) == 2, 60, "both rows in the sink")
    finally:
        for stage in reversed(stages):
            if stage.alive():
                stage.terminate()
    source, sink = rows(source_dsn), rows(replica_dsn)
    assert source[0][1] == date(2024, 4, 3) and source[0][3] == 0.30000000000000004
    assert sink == source
