"""domain.block_text against a real PostgreSQL: typed Arrow columns written as text (COPY, as
the PostgreSQL sink writes them) into columns of the matching PostgreSQL types read back as
the same values, in a session whose TimeZone is not UTC; and the sink creates a Kafka
source's table with the PostgreSQL types of its logical types."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
from psycopg import sql

from adapters.config.pipeline import PostgresSinkConfig
from adapters.postgres.sink.copy_text import copy_buffer, copy_escape
from adapters.postgres.sink.writer import PostgresSinkWriter
from domain.block_text import column_text
from domain.events import Operation, Position, TableSchema
from domain.ports import SinkBatch
from tests.support.arrow_blocks import TypedChange, arrow_block, kafka_column
from tests.support.postgres import PgTestContext

_AT = datetime(2024, 2, 29, 13, 45, 7, 500001)
_INT64_MAX, _INT64_MIN = 2**63 - 1, -(2**63)

# column: PostgreSQL type, Arrow type, values read back as Python values (2 rows), and values
# compared as PostgreSQL's own text (1 row: infinities, NaN, 24:00)
COLUMNS: dict[str, tuple[str, pa.DataType, list[Any], tuple[Any, str]]] = {
    "b": ("boolean", pa.bool_(), [True, None], (False, "false")),
    "i2": ("smallint", pa.int16(), [-32768, 32767], (0, "0")),
    "i8": ("bigint", pa.int64(), [_INT64_MIN, _INT64_MAX], (1, "1")),
    "u8": ("numeric(20,0)", pa.uint64(), [2**64 - 1, 0], (7, "7")),
    "f4": ("real", pa.float32(), [0.1, -3.4e38], (math.inf, "Infinity")),
    "f8": ("double precision", pa.float64(), [0.1 + 0.2, 5e-324], (math.nan, "NaN")),
    "d": ("numeric(12,2)", pa.decimal128(12, 2), [Decimal("-12.50"), Decimal("0.01")], (None, "")),
    "dd": ("numeric(60,3)", pa.decimal256(60, 3), [Decimal("9" * 57 + ".125"), None], (None, "")),
    "s": ("text", pa.string(), ['tab\t"q" \\ {x}\n', ""], ("é", "é")),
    "by": ("bytea", pa.binary(), [b"\x00\xff\\\n", b""], (None, "")),
    "dt": ("date", pa.date32(), [date(1, 1, 1), date(9999, 12, 31)], (3_000_000, "infinity")),
    "tm": (
        "time",
        pa.time64("us"),
        [time(23, 59, 59, 999999), time(0, 0)],
        (86_400_000_000, "24:00:00"),
    ),
    "ts": ("timestamp", pa.timestamp("us"), [_AT, datetime(1, 1, 1)], (_INT64_MAX, "infinity")),
    "tz": (
        "timestamptz",
        pa.timestamp("us", tz="UTC"),
        [_AT.replace(tzinfo=UTC), datetime(9999, 12, 30, 23, 59, 59, tzinfo=UTC)],
        (_INT64_MIN, "-infinity"),
    ),
    "iv": (
        "interval",
        pa.duration("us"),
        [timedelta(days=-3, microseconds=-7), timedelta(days=40, hours=25, seconds=0.5)],
        (timedelta(0), "00:00:00"),
    ),
    "ta": (
        "text[]",
        pa.list_(pa.string()),
        [["a b", None, 'c"d', "", "NULL", "{}", "x\\y", "é"], []],
        (None, ""),
    ),
    "ia": ("bigint[]", pa.list_(pa.int64()), [[1, None, -3], None], (None, "")),
    "nested": (
        "bigint[]",
        pa.list_(pa.list_(pa.int64())),
        [[[1, 2], [3, None]], [[5]]],
        (None, ""),
    ),
    "tsa": (
        "timestamptz[]",
        pa.list_(pa.timestamp("us", tz="UTC")),
        [[_AT.replace(tzinfo=UTC), None], []],
        ([_INT64_MAX], "{infinity}"),
    ),
    "iva": (
        "interval[]",
        pa.list_(pa.duration("us")),
        [[timedelta(days=1, seconds=1)], []],
        (None, ""),
    ),
}


def _same(have: Any, want: Any) -> bool:
    if isinstance(have, float) and isinstance(want, float) and have != want:
        # psycopg reads a real as the double of its shortest text; Arrow widens the float32
        return bool(pa.scalar(have, pa.float32()).as_py() == want)
    return bool(have == want)


def _copy(conn: Any, rows: list[list[Any]]) -> None:
    arrays = [
        pa.array(values, COLUMNS[name][1]) for name, values in zip(COLUMNS, rows, strict=True)
    ]
    data = bytes(copy_buffer([copy_escape(column_text(a)) for a in arrays]))
    with conn.cursor().copy(sql.SQL("COPY typed FROM STDIN")) as copy:
        copy.write(data)


def test_typed_columns_as_text_read_back_as_the_same_values(pg: PgTestContext) -> None:
    conn = pg.connect(pg.new_database("block_text"))
    conn.execute("SET TimeZone = 'Asia/Kolkata'")  # +05:30: an instant must not move
    conn.execute(
        "CREATE TABLE typed ("
        + ", ".join(f'"{name}" {spec[0]}' for name, spec in COLUMNS.items())
        + ")"
    )
    _copy(conn, [spec[2] for spec in COLUMNS.values()])
    got = conn.execute("SELECT * FROM typed").fetchall()
    want = list(zip(*[pa.array(s[2], s[1]).to_pylist() for s in COLUMNS.values()], strict=True))
    for got_row, want_row in zip(got, want, strict=True):
        for name, have, value in zip(COLUMNS, got_row, want_row, strict=True):
            assert _same(have, value), (name, have, value)

    conn.execute("TRUNCATE typed")
    _copy(conn, [[spec[3][0]] for spec in COLUMNS.values()])
    select = ", ".join(f'"{name}"::text' for name in COLUMNS)
    texts = conn.execute(f"SELECT {select} FROM typed").fetchone()
    assert texts is not None
    for (name, spec), text in zip(COLUMNS.items(), texts, strict=True):
        if spec[3][1]:
            assert text == spec[3][1], name


KAFKA = TableSchema(
    "public",
    "orders",
    (
        kafka_column("id", "int64", "bigint", key=True),
        kafka_column("amount", "decimal(12,2)", "numeric(12,2)"),
        kafka_column("placed", "timestamptz", "timestamp with time zone"),
        kafka_column("lines", "list<int32>", "integer[]"),
        kafka_column("doc", "json", "jsonb"),
    ),
)


def test_the_sink_creates_a_kafka_sources_table_with_postgres_types(pg: PgTestContext) -> None:
    db = pg.new_database("arrow_sink")
    conn = pg.connect(db)
    writer = PostgresSinkWriter(PostgresSinkConfig(dsn=pg.dsn(db), target_schema="sink"), "p", "s")
    block = arrow_block(
        KAFKA,
        [
            TypedChange(
                Operation.CREATE,
                Position(1, 1),
                (1, Decimal("9.90"), _AT.replace(tzinfo=UTC), [2, 3], '{"a": 1}'),
            )
        ],
    )

    async def write() -> None:
        await writer.start()
        try:
            result = await writer.write(SinkBatch("p", "lane", 1, blocks=[block]))
            assert (result.written, result.dead_lettered) == (1, 0)
        finally:
            await writer.stop()

    asyncio.run(write())
    types = conn.execute(
        "SELECT column_name, format_type(atttypid, atttypmod) FROM information_schema.columns"
        " JOIN pg_attribute ON attrelid = 'sink.orders'::regclass AND attname = column_name"
        " WHERE table_schema = 'sink' AND table_name = 'orders' ORDER BY ordinal_position"
    ).fetchall()
    assert types == [
        ("id", "bigint"),
        ("amount", "numeric(12,2)"),
        ("placed", "timestamp with time zone"),
        ("lines", "integer[]"),
        ("doc", "jsonb"),
    ]
    row = conn.execute("SELECT amount, placed, lines, doc FROM sink.orders").fetchone()
    assert row == (Decimal("9.90"), _AT.replace(tzinfo=UTC), [2, 3], {"a": 1})
    assert writer.columnar_batches == 1
