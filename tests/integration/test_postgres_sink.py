"""The PostgreSQL sink writer against a real PostgreSQL server.

Every test builds TableSchema/SourceEvent objects by hand, writes them through
``PostgresSinkWriter`` and reads the target database back with a plain connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import psycopg
import pytest

from adapters.config.pipeline import PostgresSinkConfig
from adapters.postgres.sink.writer import PostgresSinkWriter
from domain.blocks import BlockError, build_blocks
from domain.errors import SinkUnavailableError
from domain.events import UNCHANGED, Column, Operation, Position, SourceEvent, TableSchema, TextRow
from domain.health import Status
from domain.ports import SinkBatch, WriteResult
from services.stack.postgres import PostgresServer
from tests.support.postgres import PgTestContext

pytestmark = pytest.mark.integration

T = TypeVar("T")
TARGET = "sink"
PIPELINE = "pipe1"

ORDERS = TableSchema(
    "shop",
    "orders",
    (
        Column("id", 20, "bigint", is_key=True),
        Column("amount", 1700, "numeric(12,2)"),
        Column("placed_at", 1184, "timestamp with time zone"),
        Column("meta", 3802, "jsonb"),
        Column("payload", 17, "bytea"),
        Column("ref", 2950, "uuid"),
        Column("paid", 16, "boolean"),
        Column("note", 25, "text"),
    ),
)
CUSTOMERS = TableSchema(
    "shop",
    "customers",
    (
        Column("tenant", 25, "text", is_key=True),
        Column("id", 23, "integer", is_key=True),
        Column("name", 1043, "character varying(40)"),
        Column("tags", 1009, "text[]"),
    ),
)
ITEMS = TableSchema(
    "shop",
    "items",
    (
        Column("id", 23, "integer", is_key=True),
        Column("qty", 23, "integer"),
        Column("label", 25, "text"),
    ),
)
REF = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Stream:
    """Hands out increasing positions: one `major` per source transaction, `minor` inside."""

    def __init__(self, major: int = 1000, partition: str = "0") -> None:
        self.major = major
        self.minor = 0
        self.partition = partition

    def tx(self) -> Stream:
        self.major += 100
        self.minor = 0
        return self

    def event(
        self,
        op: Operation,
        table: TableSchema,
        after: TextRow | None = None,
        before: TextRow | None = None,
    ) -> SourceEvent:
        position = Position(self.major, self.minor)
        self.minor += 1
        return SourceEvent(
            operation=op,
            table=table,
            position=position,
            before=before,
            after=after,
            commit_time_us=1_714_557_600_000_000 + self.major,
        )

    def ins(self, table: TableSchema, *values: str | None) -> SourceEvent:
        return self.event(Operation.CREATE, table, after=tuple(values))

    def snap(self, table: TableSchema, *values: str | None) -> SourceEvent:
        return self.event(Operation.READ, table, after=tuple(values))

    def upd(
        self, table: TableSchema, *values: str | None, before: TextRow | None = None
    ) -> SourceEvent:
        return self.event(Operation.UPDATE, table, after=tuple(values), before=before)

    def delete(self, table: TableSchema, *key: str) -> SourceEvent:
        """A delete as pgoutput sends it with REPLICA IDENTITY DEFAULT: key columns only."""
        return self.event(Operation.DELETE, table, before=key_row(table, *key))

    def truncate(self, table: TableSchema) -> SourceEvent:
        return self.event(Operation.TRUNCATE, table)


def key_row(table: TableSchema, *key: str) -> TextRow:
    values = iter(key)
    return tuple(next(values) if c.is_key else None for c in table.columns)


def order(
    id_: int,
    amount: str = "1.00",
    note: str | None = "n",
    *,
    placed_at: str | None = "2024-05-01 10:00:00+02",
    meta: str | None = '{"a": 1}',
    payload: str | None = "\\x0102ff",
    ref: str | None = REF,
    paid: str | None = "t",
) -> tuple[str | None, ...]:
    return (str(id_), amount, placed_at, meta, payload, ref, paid, note)


def batch(events: Sequence[SourceEvent], partition: str = "0", batch_id: int = 1) -> SinkBatch:
    """A batch as the sink service receives it: columnar blocks (the writer takes its
    columnar path where it applies, else the rows); rows that do not fit their table cannot
    be blocks and come as events."""
    try:
        blocks = build_blocks(list(events))
    except BlockError:
        return SinkBatch(PIPELINE, partition, batch_id, list(events))
    return SinkBatch(PIPELINE, partition, batch_id, blocks=blocks, lanes=[partition])


def settings(dsn: str, **overrides: Any) -> PostgresSinkConfig:
    return PostgresSinkConfig(dsn=dsn, target_schema=TARGET, **overrides)


@contextlib.asynccontextmanager
async def open_writer(
    dsn: str, *, sink_id: str = "replica", **overrides: Any
) -> AsyncIterator[PostgresSinkWriter]:
    writer = PostgresSinkWriter(settings(dsn, **overrides), PIPELINE, sink_id)
    await writer.start()
    try:
        yield writer
    finally:
        await writer.stop()


def rows(conn: psycopg.Connection[Any], query: str, *params: Any) -> list[tuple[Any, ...]]:
    return conn.execute(query, params).fetchall()


ORDER_COLUMNS = "amount, placed_at, meta, payload, ref, paid, note"


def orders_by_id(
    conn: psycopg.Connection[Any], columns: str = ORDER_COLUMNS
) -> dict[int, tuple[Any, ...]]:
    return {r[0]: r for r in rows(conn, f"SELECT id, {columns} FROM sink.orders ORDER BY id")}


def notes(conn: psycopg.Connection[Any]) -> dict[int, str | None]:
    return {r[0]: r[1] for r in rows(conn, "SELECT id, note FROM sink.orders ORDER BY id")}


def applied_position(
    conn: psycopg.Connection[Any], partition: str = "0", sink_id: str = "replica"
) -> tuple[int, int]:
    found = rows(
        conn,
        "SELECT major, minor FROM sink._cdc_offsets"
        " WHERE pipeline_id = %s AND sink_id = %s AND partition = %s",
        PIPELINE,
        sink_id,
        partition,
    )
    assert len(found) == 1
    return int(found[0][0]), int(found[0][1])


@pytest.fixture
def target(pg: PgTestContext) -> tuple[str, psycopg.Connection[Any]]:
    """(dsn of a fresh target database, an autocommit connection to it)."""
    db = pg.new_database("sink")
    return pg.dsn(db), pg.connect(db)


Target = tuple[str, psycopg.Connection[Any]]


# --------------------------------------------------------------------------- upserts


def test_round_trip_across_two_tables_with_types_and_nulls(target: Target) -> None:
    dsn, conn = target
    s = Stream()
    first = [
        s.ins(ORDERS, *order(1, "12.50", "first")),
        s.ins(ORDERS, *order(2, "0.10", None, placed_at=None, meta=None, payload=None, ref=None)),
        s.ins(CUSTOMERS, "acme", "1", "Ann", '{vip,"x y"}'),
        s.ins(CUSTOMERS, "acme", "2", "Bob", None),
        s.tx().upd(ORDERS, *order(1, "99.99", "second", meta='{"a": 2, "b": [1, 2]}', paid="f")),
        s.delete(CUSTOMERS, "acme", "2"),
        s.ins(ORDERS, *order(3)),
        s.delete(ORDERS, "3"),
    ]
    second = [s.tx().upd(ORDERS, *order(2, "0.20", None, paid=None)), s.delete(ORDERS, "1")]

    async def scenario() -> tuple[WriteResult, WriteResult, dict[int, tuple[Any, ...]]]:
        async with open_writer(dsn) as writer:
            r1 = await writer.write(batch(first))
            after_first = orders_by_id(conn)
            r2 = await writer.write(batch(second, batch_id=2))
            health = await writer.health()
            assert health.status is Status.OK, health
            assert health.detail["applied"] == {"0": str(second[-1].position)}
            return r1, r2, after_first

    r1, r2, after_first = run(scenario())
    assert (r1.written, r1.skipped, r1.dead_lettered) == (8, 0, 0)
    assert (r2.written, r2.skipped, r2.dead_lettered) == (2, 0, 0)

    assert after_first == {
        1: (
            1,
            Decimal("99.99"),
            datetime(2024, 5, 1, 8, 0, tzinfo=UTC),
            {"a": 2, "b": [1, 2]},
            b"\x01\x02\xff",
            uuid.UUID(REF),
            False,
            "second",
        ),
        2: (2, Decimal("0.10"), None, None, None, None, True, None),
    }
    assert orders_by_id(conn, "amount, paid, note") == {2: (2, Decimal("0.20"), None, None)}
    assert rows(conn, "SELECT tenant, id, name, tags FROM sink.customers") == [
        ("acme", 1, "Ann", ["vip", "x y"])
    ]
    types = dict(
        rows(
            conn,
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
            " WHERE a.attrelid = 'sink.orders'::regclass AND a.attnum > 0",
        )
    )
    assert types == {
        "id": "bigint",
        "amount": "numeric(12,2)",
        "placed_at": "timestamp with time zone",
        "meta": "jsonb",
        "payload": "bytea",
        "ref": "uuid",
        "paid": "boolean",
        "note": "text",
    }
    pk = rows(
        conn,
        "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = 'sink.customers'::regclass AND i.indisprimary",
    )
    assert pk == [(["id", "tenant"],)]
    assert applied_position(conn) == (second[-1].position.major, second[-1].position.minor)


def test_many_changes_to_one_key_in_a_batch_last_wins(target: Target) -> None:
    dsn, conn = target
    s = Stream()
    setup = [s.ins(ORDERS, *order(1, note="stored-1")), s.ins(ORDERS, *order(2, note="stored-2"))]
    s.tx()
    churn = [
        s.ins(ORDERS, *order(10, note="a")),
        s.upd(ORDERS, *order(10, note="b")),
        s.ins(ORDERS, *order(11, note="x")),
        s.upd(ORDERS, *order(10, note="c")),
        s.delete(ORDERS, "10"),
        s.delete(ORDERS, "11"),
        s.ins(ORDERS, *order(10, "10.10", note="d")),
        s.ins(ORDERS, *order(12, note="y")),
        s.delete(ORDERS, "1"),
        s.delete(ORDERS, "12"),
        s.ins(ORDERS, *order(1, "7.00", note="reborn")),
        s.upd(ORDERS, *order(10, "10.20", note="e")),
        s.ins(ORDERS, *order(12, note="z")),
        s.snap(ORDERS, *order(2, note="snapshot-2")),
        s.upd(ORDERS, *order(2, note="updated-2")),
        s.delete(ORDERS, "2"),
    ]

    async def scenario() -> WriteResult:
        async with open_writer(dsn) as writer:
            await writer.write(batch(setup))
            return await writer.write(batch(churn, batch_id=2))

    result = run(scenario())
    assert (result.written, result.skipped, result.dead_lettered) == (len(churn), 0, 0)
    assert notes(conn) == {1: "reborn", 10: "e", 12: "z"}
    assert orders_by_id(conn, "amount") == {
        1: (1, Decimal("7.00")),
        10: (10, Decimal("10.20")),
        12: (12, Decimal("1.00")),
    }


def test_primary_key_change_moves_the_row_and_keeps_unchanged_toast(target: Target) -> None:
    dsn, conn = target
    big = "toast-" + "x" * 5000
    s = Stream()
    setup = [
        s.ins(ORDERS, *order(1, note=big + "-1")),
        s.ins(ORDERS, *order(5, note="five")),
        s.ins(ORDERS, *order(21, note="twenty-one")),
        s.ins(ORDERS, *order(22, note="twenty-two")),
    ]
    s.tx()
    moves = [
        # 1 -> 2, the TOASTed note unchanged: it must come from the stored row 1.
        s.upd(ORDERS, *order(2, "2.00", UNCHANGED), before=key_row(ORDERS, "1")),
        # 5 -> 6 with full values, then a new row 5.
        s.upd(ORDERS, *order(6, note="six"), before=key_row(ORDERS, "5")),
        s.ins(ORDERS, *order(5, note="new five")),
        # A row born in this batch moves twice.
        s.ins(ORDERS, *order(7, note="seven")),
        s.upd(ORDERS, *order(8, "8.00", UNCHANGED), before=key_row(ORDERS, "7")),
        s.upd(ORDERS, *order(9, "9.00", UNCHANGED), before=key_row(ORDERS, "8")),
        # Swap keys 21 and 22 through a temporary key, notes unchanged all along.
        s.upd(ORDERS, *order(100, "0.21", UNCHANGED), before=key_row(ORDERS, "21")),
        s.upd(ORDERS, *order(21, "0.22", UNCHANGED), before=key_row(ORDERS, "22")),
        s.upd(ORDERS, *order(22, "0.21", UNCHANGED), before=key_row(ORDERS, "100")),
    ]

    async def scenario() -> WriteResult:
        async with open_writer(dsn) as writer:
            await writer.write(batch(setup))
            return await writer.write(batch(moves, batch_id=2))

    result = run(scenario())
    assert (result.written, result.dead_lettered) == (len(moves), 0)
    assert notes(conn) == {
        2: big + "-1",
        5: "new five",
        6: "six",
        9: "seven",
        21: "twenty-two",
        22: "twenty-one",
    }
    assert orders_by_id(conn, "amount")[2] == (2, Decimal("2.00"))
    assert orders_by_id(conn, "amount")[21] == (21, Decimal("0.22"))


def test_unchanged_toast_values_keep_what_is_stored(target: Target) -> None:
    dsn, conn = target
    big = "y" * 20000
    s = Stream()
    b1 = [s.ins(ORDERS, *order(1, "1.00", big, meta='{"big": true}'))]
    # The note and meta are TOASTed and unchanged: only amount changes.
    b2 = [s.tx().upd(ORDERS, *order(1, "2.00", UNCHANGED, meta=UNCHANGED))]
    # Changed in the batch, then unchanged in a later change of the same batch.
    b3 = [
        s.tx().upd(ORDERS, *order(1, "3.00", "v2", meta=UNCHANGED)),
        s.upd(ORDERS, *order(1, "4.00", UNCHANGED, meta=UNCHANGED)),
        s.ins(ORDERS, *order(2, "5.00", "inserted here")),
        s.upd(ORDERS, *order(2, "6.00", UNCHANGED, payload=UNCHANGED)),
    ]

    async def scenario() -> list[dict[int, tuple[Any, ...]]]:
        seen = []
        async with open_writer(dsn) as writer:
            for i, events in enumerate((b1, b2, b3)):
                await writer.write(batch(events, batch_id=i))
                seen.append(orders_by_id(conn, "amount, note, meta, payload"))
        return seen

    after1, after2, after3 = run(scenario())
    assert after1[1] == (1, Decimal("1.00"), big, {"big": True}, b"\x01\x02\xff")
    assert after2[1] == (1, Decimal("2.00"), big, {"big": True}, b"\x01\x02\xff")
    assert after3 == {
        1: (1, Decimal("4.00"), "v2", {"big": True}, b"\x01\x02\xff"),
        2: (2, Decimal("6.00"), "inserted here", {"a": 1}, b"\x01\x02\xff"),
    }


def test_truncate_in_the_middle_of_a_batch(target: Target) -> None:
    dsn, conn = target
    s = Stream()
    setup = [
        s.ins(ORDERS, *order(1)),
        s.ins(ORDERS, *order(2)),
        s.ins(CUSTOMERS, "acme", "1", "Ann", None),
    ]
    s.tx()
    mixed = [
        s.ins(ORDERS, *order(3)),
        s.upd(ORDERS, *order(1, note="before truncate")),
        s.ins(CUSTOMERS, "acme", "2", "Bob", None),
        s.truncate(ORDERS),
        s.ins(ORDERS, *order(4, note="after")),
        s.upd(ORDERS, *order(4, "4.40", note="after, updated")),
        s.ins(ORDERS, *order(5, note="five")),
        s.delete(ORDERS, "5"),
    ]

    async def scenario() -> WriteResult:
        async with open_writer(dsn) as writer:
            await writer.write(batch(setup))
            return await writer.write(batch(mixed, batch_id=2))

    result = run(scenario())
    assert result.written == len(mixed)
    assert orders_by_id(conn, "amount, note") == {4: (4, Decimal("4.40"), "after, updated")}
    assert rows(conn, "SELECT id, name FROM sink.customers ORDER BY id") == [(1, "Ann"), (2, "Bob")]


def test_schema_evolution_adds_columns(target: Target) -> None:
    dsn, conn = target
    v2 = TableSchema(ITEMS.schema, ITEMS.table, (*ITEMS.columns, Column("color", 25, "text")))
    s = Stream()
    events = [
        s.ins(ITEMS, "1", "10", "one"),
        s.ins(v2, "2", "20", "two", "red"),
        s.upd(ITEMS, "1", "11", "one"),
        s.upd(v2, "1", "12", "one", "blue"),
    ]

    async def scenario() -> WriteResult:
        async with open_writer(dsn) as writer:
            first = await writer.write(batch(events[:1]))
            assert first.written == 1
            return await writer.write(batch(events[1:], batch_id=2))

    assert run(scenario()).written == 3
    assert rows(conn, "SELECT id, qty, label, color FROM sink.items ORDER BY id") == [
        (1, 12, "one", "blue"),
        (2, 20, "two", "red"),
    ]


def _shape(*columns: tuple[str, int, str]) -> TableSchema:
    """shop.items with `columns` after the key."""
    return TableSchema(
        "shop", "items", (Column("id", 23, "integer", is_key=True), *(Column(*c) for c in columns))
    )


def column_types(conn: psycopg.Connection[Any], table: str = "items") -> dict[str, str]:
    return dict(
        rows(
            conn,
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            f"sink.{table}",
        )
    )


def test_retyped_source_columns_are_altered_and_replays_do_not_turn_them_back(
    target: Target,
) -> None:
    dsn, conn = target
    v1 = _shape(("qty", 23, "integer"), ("label", 1043, "character varying(10)"))
    wider = _shape(("qty", 23, "integer"), ("label", 1043, "character varying(20)"))
    v2 = _shape(("qty", 20, "bigint"), ("label", 25, "text"))
    s = Stream()
    first = [s.ins(v1, "1", "10", "short"), s.ins(v1, "2", "20", "two")]
    second = [
        s.tx().upd(v1, "2", "21", "two"),  # older shape first in the batch
        s.ins(wider, "3", "30", "fifteen chars!!"),
    ]
    third = [
        s.tx().ins(v2, "4", str(2**40), "a label far longer than ten characters"),
        s.upd(v2, "1", str(-(2**35)), "short"),
    ]

    async def scenario() -> list[WriteResult]:
        results = []
        async with open_writer(dsn) as writer:
            for n, events in enumerate((first, second, third), start=1):
                results.append(await writer.write(batch(events, batch_id=n)))
                if n == 2:
                    assert column_types(conn)["label"] == "character varying(20)"
            # A replay of everything (the slot resends after a restart): old shapes first.
            results.append(await writer.write(batch([*first, *second, *third], batch_id=4)))
        # A new process (nothing in memory) that sees the old shapes replayed again.
        async with open_writer(dsn) as writer:
            results.append(await writer.write(batch([*first, *second], batch_id=5)))
        return results

    results = run(scenario())
    assert [(r.written, r.skipped, r.dead_lettered) for r in results] == [
        (2, 0, 0),
        (2, 0, 0),
        (2, 0, 0),
        (0, 6, 0),
        (0, 4, 0),
    ]
    assert column_types(conn) == {"id": "integer", "qty": "bigint", "label": "text"}
    assert rows(conn, "SELECT id, qty, label FROM sink.items ORDER BY id") == [
        (1, -(2**35), "short"),
        (2, 21, "two"),
        (3, 30, "fifteen chars!!"),
        (4, 2**40, "a label far longer than ten characters"),
    ]
    assert rows(conn, "SELECT count(*) FROM sink._cdc_dead_letters") == [(0,)]
    assert rows(
        conn, "SELECT column_name, source_type FROM sink._cdc_columns ORDER BY column_name"
    ) == [("id", "integer"), ("label", "text"), ("qty", "bigint")]


def test_retype_seen_first_by_a_new_process_is_applied(target: Target) -> None:
    """The source changed while the sink was down: the new process sees only the new shape
    and learns from the recorded source types that the column must change."""
    dsn, conn = target
    v1 = _shape(("qty", 23, "integer"), ("label", 25, "text"))
    v2 = _shape(("qty", 1700, "numeric(14,3)"), ("label", 25, "text"))
    s = Stream()

    async def write(events: list[SourceEvent], batch_id: int) -> WriteResult:
        async with open_writer(dsn) as writer:
            return await writer.write(batch(events, batch_id=batch_id))

    assert run(write([s.ins(v1, "1", "7", "a")], 1)).written == 1
    assert run(write([s.tx().ins(v2, "2", "2.125", "b")], 2)).written == 1
    assert column_types(conn)["qty"] == "numeric(14,3)"
    assert rows(conn, "SELECT id, qty FROM sink.items ORDER BY id") == [
        (1, Decimal("7.000")),
        (2, Decimal("2.125")),
    ]


def test_column_types_chosen_by_an_operator_are_left_alone(target: Target) -> None:
    """A target column the sink did not create, of another type than the source's, is the
    operator's choice: never altered (values that do not fit it are dead-lettered)."""
    dsn, conn = target
    conn.execute("CREATE SCHEMA sink")
    conn.execute("CREATE TABLE sink.items (id integer PRIMARY KEY, qty bigint, label varchar(5))")
    v1 = _shape(("qty", 23, "integer"), ("label", 25, "text"))
    v2 = _shape(("qty", 20, "bigint"), ("label", 25, "text"))
    s = Stream()
    events = [s.ins(v1, "1", "1", "ok"), s.tx().ins(v2, "2", "2", "much too long")]

    async def scenario() -> WriteResult:
        async with open_writer(dsn) as writer:
            return await writer.write(batch(events))

    assert (run(scenario()).written, run(scenario()).skipped) == (1, 2)
    assert column_types(conn) == {"id": "integer", "qty": "bigint", "label": "character varying(5)"}
    assert rows(conn, "SELECT id, qty, label FROM sink.items") == [(1, 1, "ok")]
    assert rows(conn, "SELECT minor, error LIKE '%%too long%%' FROM sink._cdc_dead_letters") == [
        (0, True)
    ]
    # id and qty matched the source's types: adopted, so they follow later changes.
    assert rows(
        conn, "SELECT column_name, source_type FROM sink._cdc_columns ORDER BY column_name"
    ) == [("id", "integer"), ("qty", "bigint")]


def test_refused_retype_is_logged_once_and_the_rest_is_written(
    target: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, conn = target
    v1 = _shape(("qty", 25, "text"), ("label", 25, "text"))
    v2 = _shape(("qty", 23, "integer"), ("label", 25, "text"))
    s = Stream()
    first = [s.ins(v1, "1", "not a number", "a"), s.ins(v1, "2", "2", "b")]
    second = [s.tx().ins(v2, "3", "3", "c"), s.upd(v2, "2", "22", "b")]
    third = [s.tx().ins(v2, "4", "4", "d")]

    async def scenario() -> list[WriteResult]:
        async with open_writer(dsn) as writer:
            out = [await writer.write(batch(first))]
            out.append(await asyncio.wait_for(writer.write(batch(second, batch_id=2)), 30))
            out.append(await asyncio.wait_for(writer.write(batch(third, batch_id=3)), 30))
            return out

    results = run(scenario())
    assert [(r.written, r.dead_lettered) for r in results] == [(2, 0), (2, 0), (1, 0)]
    # 'not a number' cannot become an integer: the column stays text and keeps every value.
    assert column_types(conn)["qty"] == "text"
    assert rows(conn, "SELECT id, qty FROM sink.items ORDER BY id") == [
        (1, "not a number"),
        (2, "22"),
        (3, "3"),
        (4, "4"),
    ]
    captured = capsys.readouterr()
    refused = [
        line for line in (captured.out + captured.err).splitlines() if "retype_failed" in line
    ]
    assert len(refused) == 1, captured
    assert "column=qty" in refused[0] and "to_type=integer" in refused[0], refused


def test_dropped_source_column_is_kept_and_null_for_new_rows(target: Target) -> None:
    dsn, conn = target
    v1 = _shape(("qty", 23, "integer"), ("label", 25, "text"))
    v2 = _shape(("qty", 23, "integer"))  # ALTER TABLE ... DROP COLUMN label
    s = Stream()
    events = [
        s.ins(v1, "1", "1", "one"),
        s.ins(v1, "2", "2", "two"),
        s.tx().upd(v2, "1", "11"),
        s.ins(v2, "3", "3"),
        s.delete(v2, "2"),
    ]

    async def scenario() -> WriteResult:
        async with open_writer(dsn) as writer:
            await writer.write(batch(events[:2]))
            return await writer.write(batch(events[2:], batch_id=2))

    assert run(scenario()).written == 3
    assert column_types(conn) == {"id": "integer", "qty": "integer", "label": "text"}
    assert rows(conn, "SELECT id, qty, label FROM sink.items ORDER BY id") == [
        (1, 11, "one"),
        (3, 3, None),
    ]


def test_unknown_source_type_becomes_text(target: Target) -> None:
    dsn, conn = target
    moods = TableSchema(
        "shop", "moods", (Column("id", 23, "integer", True), Column("mood", 99999, "shop.mood"))
    )
    s = Stream()

    async def scenario() -> WriteResult:
        async with open_writer(dsn) as writer:
            return await writer.write(batch([s.ins(moods, "1", "happy")]))

    assert run(scenario()).written == 1
    assert rows(conn, "SELECT id, mood, pg_typeof(mood)::text FROM sink.moods") == [
        (1, "happy", "text")
    ]


# --------------------------------------------------------------------------- positions


def test_replayed_batch_is_skipped_and_changes_nothing(target: Target) -> None:
    dsn, conn = target
    s = Stream()
    first = [s.ins(ORDERS, *order(1, note="one")), s.ins(ORDERS, *order(2, note="two"))]
    second = [s.tx().delete(ORDERS, "1"), s.upd(ORDERS, *order(2, note="two, updated"))]

    async def scenario() -> list[WriteResult]:
        async with open_writer(dsn) as writer:
            results = [await writer.write(batch(first)), await writer.write(batch(second))]
            # The transport redelivers both: the first must not bring row 1 back.
            results.append(await writer.write(batch(first)))
            results.append(await writer.write(batch(second)))
        async with open_writer(dsn) as restarted:  # a new process: positions are in the table
            results.append(await restarted.write(batch(first + second)))
        return results

    results = run(scenario())
    assert [(r.written, r.skipped) for r in results] == [(2, 0), (2, 0), (0, 2), (0, 2), (0, 4)]
    assert notes(conn) == {2: "two, updated"}
    assert applied_position(conn) == (second[-1].position.major, second[-1].position.minor)


def test_partially_overlapping_batches_apply_only_the_new_part(target: Target) -> None:
    dsn, conn = target
    s = Stream()
    a = [s.ins(ITEMS, str(i), str(i), "a") for i in range(1, 11)]
    positions = [ev.position for ev in a]
    # Batch b restarts at a[5]. Its first five events carry other values than a's: had they
    # been applied, the rows would show it.
    b = [
        SourceEvent(Operation.CREATE, ITEMS, positions[i], after=(str(i + 1), "-1", "b"))
        for i in range(5, 10)
    ] + [s.ins(ITEMS, str(i), str(i), "b") for i in range(11, 16)]

    async def scenario() -> list[WriteResult]:
        async with open_writer(dsn, batch_size=4) as writer:
            ra = await writer.write(batch(a))
            rb = await writer.write(batch(b, batch_id=2))
            # Partitions are independent: the same positions in partition 1 are new there.
            other = [
                SourceEvent(Operation.UPDATE, ITEMS, positions[i], after=("1", "0", "p1"))
                for i in range(3)
            ]
            rc = await writer.write(batch(other, partition="1", batch_id=3))
        # Another sink writing into the same database keeps its own positions.
        async with open_writer(dsn, sink_id="audit") as writer:
            rd = await writer.write(batch(b[:1], batch_id=1))
        return [ra, rb, rc, rd]

    ra, rb, rc, rd = run(scenario())
    assert (ra.written, ra.skipped) == (10, 0)
    assert (rb.written, rb.skipped) == (5, 5)
    assert (rc.written, rc.skipped) == (3, 0)
    assert (rd.written, rd.skipped) == (1, 0)
    got = dict(rows(conn, "SELECT id, label FROM sink.items WHERE id > 1"))
    assert got == {
        **{i: "a" for i in range(2, 6)},
        6: "b",
        **{i: "a" for i in range(7, 11)},
        **{i: "b" for i in range(11, 16)},
    }
    assert rows(conn, "SELECT qty, label FROM sink.items WHERE id = 1") == [(0, "p1")]
    assert applied_position(conn, "0") == (b[-1].position.major, b[-1].position.minor)
    assert applied_position(conn, "1") == (positions[2].major, positions[2].minor)


def test_concurrent_writes_are_serialized_in_order(target: Target) -> None:
    dsn, conn = target
    s = Stream()
    batches = [
        batch([s.tx().ins(ORDERS, *order(1, note="v0"))], batch_id=0),
        *[batch([s.tx().upd(ORDERS, *order(1, note=f"v{i}"))], batch_id=i) for i in range(1, 20)],
    ]

    async def scenario() -> list[WriteResult]:
        async with open_writer(dsn, pool_max_size=4) as writer:
            return list(await asyncio.gather(*(writer.write(b) for b in batches)))

    results = run(scenario())
    assert all(r.written == 1 and r.skipped == 0 for r in results)
    assert notes(conn) == {1: "v19"}


# --------------------------------------------------------------------------- append mode


def test_append_mode_writes_a_change_log(target: Target) -> None:
    dsn, conn = target
    s = Stream()
    events = [
        s.ins(ORDERS, *order(1, "1.10", "one")),
        s.upd(ORDERS, *order(1, "1.20", UNCHANGED)),
        s.tx().delete(ORDERS, "1"),
        s.truncate(ORDERS),
        s.ins(ORDERS, *order(2, "2.00", None)),
    ]

    async def scenario() -> tuple[WriteResult, WriteResult]:
        async with open_writer(dsn, write_mode="append") as writer:
            first = await writer.write(batch(events))
            return first, await writer.write(batch(events))

    first, replay = run(scenario())
    assert (first.written, first.skipped) == (5, 0)
    assert (replay.written, replay.skipped) == (0, 5)
    log = rows(
        conn,
        "SELECT _op, _partition, _position_major, _position_minor, _commit_time, _unchanged,"
        " id, amount, note FROM sink.orders_changes ORDER BY _position_major, _position_minor",
    )
    when = [datetime.fromtimestamp(ev.commit_time_us / 1e6, UTC) for ev in events]
    assert log == [
        ("c", "0", 1000, 0, when[0], None, 1, Decimal("1.10"), "one"),
        ("u", "0", 1000, 1, when[1], ["note"], 1, Decimal("1.20"), None),
        ("d", "0", 1100, 0, when[2], None, 1, None, None),
        ("t", "0", 1100, 1, when[3], None, None, None, None),
        ("c", "0", 1100, 2, when[4], None, 2, Decimal("2.00"), None),
    ]
    assert rows(conn, "SELECT to_regclass('sink.orders')") == [(None,)]


def test_table_without_key_is_appended_in_upsert_mode(target: Target) -> None:
    dsn, conn = target
    events_table = TableSchema(
        "shop",
        "clicks",
        (Column("at", 1184, "timestamp with time zone"), Column("url", 25, "text")),
    )
    s = Stream()
    events = [
        s.ins(events_table, "2024-01-01 00:00:00+00", "/a"),
        s.ins(events_table, "2024-01-01 00:00:01+00", "/a"),
        s.ins(ORDERS, *order(1)),
    ]

    async def scenario() -> WriteResult:
        async with open_writer(dsn) as writer:
            return await writer.write(batch(events))

    assert run(scenario()).written == 3
    assert rows(conn, "SELECT _op, url FROM sink.clicks_changes ORDER BY _position_minor") == [
        ("c", "/a"),
        ("c", "/a"),
    ]
    assert list(orders_by_id(conn)) == [1]


KEYLESS = TableSchema("shop", "t", (Column("a", 23, "integer"), Column("b", 25, "text")))


def test_keyless_full_identity_change_log_keeps_duplicates_and_before_images(
    target: Target,
) -> None:
    """A table without a key under REPLICA IDENTITY FULL, as the WAL reader delivers it:
    snapshot rows, an update and a delete carrying the complete old row, a duplicate
    insert. Every change is one row of the change log; an update keeps its old row."""
    dsn, conn = target
    s = Stream()
    events = [
        s.snap(KEYLESS, "1", "a"),
        s.snap(KEYLESS, "1", "a"),
        s.snap(KEYLESS, "2", "b"),
        s.tx().upd(KEYLESS, "2", "upd", before=("2", "b")),
        s.tx().event(Operation.DELETE, KEYLESS, before=("1", "a")),
        s.tx().ins(KEYLESS, "7", "dup"),
        s.tx().ins(KEYLESS, "7", "dup"),
        # A TOASTed value the update did not change: not sent in the new row.
        s.tx().upd(KEYLESS, "7", UNCHANGED, before=("7", "dup")),
        s.tx().upd(KEYLESS, "8", None, before=("7", None)),
    ]

    async def scenario() -> tuple[WriteResult, WriteResult]:
        async with open_writer(dsn) as writer:
            first = await writer.write(batch(events))
            return first, await writer.write(batch(events))

    first, replay = run(scenario())
    assert (first.written, first.skipped, first.dead_lettered) == (9, 0, 0)
    assert (replay.written, replay.skipped) == (0, 9)
    log = rows(
        conn,
        "SELECT _op, a, b, _unchanged, _before FROM sink.t_changes"
        " ORDER BY _position_major, _position_minor",
    )
    assert log == [
        ("r", 1, "a", None, None),
        ("r", 1, "a", None, None),
        ("r", 2, "b", None, None),
        ("u", 2, "upd", None, {"a": "2", "b": "b"}),
        ("d", 1, "a", None, None),
        ("c", 7, "dup", None, None),
        ("c", 7, "dup", None, None),
        ("u", 7, None, ["b"], {"a": "7", "b": "dup"}),
        ("u", 8, None, None, {"a": "7", "b": None}),
    ]
    # No upsert table beside the change log.
    assert rows(conn, "SELECT to_regclass('sink.t')") == [(None,)]


def test_change_log_of_an_older_release_gets_the_before_column(target: Target) -> None:
    dsn, conn = target
    conn.execute("CREATE SCHEMA sink")
    conn.execute(
        "CREATE TABLE sink.t_changes (_op text, _partition text, _position_major numeric(20,0),"
        " _position_minor bigint, _commit_time timestamptz, _unchanged text[], a integer, b text)"
    )
    conn.execute("INSERT INTO sink.t_changes (_op, a, b) VALUES ('c', 1, 'old')")
    s = Stream()

    async def scenario() -> WriteResult:
        async with open_writer(dsn) as writer:
            return await writer.write(batch([s.upd(KEYLESS, "1", "new", before=("1", "old"))]))

    assert run(scenario()).written == 1
    assert rows(conn, "SELECT _op, a, b, _before FROM sink.t_changes ORDER BY _op") == [
        ("c", 1, "old", None),
        ("u", 1, "new", {"a": "1", "b": "old"}),
    ]


def test_table_name_template_keeps_same_named_tables_apart(target: Target) -> None:
    dsn, conn = target
    other_orders = TableSchema("archive", "orders", ORDERS.columns)
    other_keyless = TableSchema("archive", "t", KEYLESS.columns)
    s = Stream()
    events = [
        s.ins(ORDERS, *order(1, "1.00", "shop")),
        s.ins(other_orders, *order(1, "2.00", "archive")),
        s.ins(KEYLESS, "1", "shop"),
        s.ins(other_keyless, "1", "archive"),
    ]

    async def scenario() -> WriteResult:
        async with open_writer(dsn, table_name_template="{schema}_{table}") as writer:
            return await writer.write(batch(events))

    assert run(scenario()).written == 4
    assert rows(conn, "SELECT id, note FROM sink.shop_orders") == [(1, "shop")]
    assert rows(conn, "SELECT id, note FROM sink.archive_orders") == [(1, "archive")]
    assert rows(conn, "SELECT b FROM sink.shop_t_changes") == [("shop",)]
    assert rows(conn, "SELECT b FROM sink.archive_t_changes") == [("archive",)]
    assert rows(conn, "SELECT to_regclass('sink.orders'), to_regclass('sink.t_changes')") == [
        (None, None)
    ]


# --------------------------------------------------------------------------- bad data


def test_bad_values_are_dead_lettered_and_the_rest_is_written(target: Target) -> None:
    dsn, conn = target
    conn.execute("CREATE SCHEMA sink")
    conn.execute("CREATE TABLE sink.items (id integer PRIMARY KEY, qty integer, label varchar(3))")
    conn.execute("CREATE TABLE sink.customers (tenant text, id integer, name text, tags text[])")
    s = Stream()
    events = [
        s.ins(ITEMS, "1", "5", "ok"),
        s.ins(ITEMS, "2", "abc", "bad"),  # not an integer
        s.ins(ORDERS, *order(1)),
        s.ins(ITEMS, "3", "7", "too long"),  # varchar(3): must fail, not be cut
        s.ins(CUSTOMERS, "acme", "1", "Ann", None),  # target has no primary key
        s.upd(ITEMS, "1", "6", "ok"),
        s.ins(ITEMS, "4", "8", "new"),
    ]

    async def scenario() -> tuple[WriteResult, WriteResult, Status]:
        async with open_writer(dsn) as writer:
            result = await writer.write(batch(events))
            replay = await writer.write(batch(events))
            return result, replay, (await writer.health()).status

    result, replay, status = run(scenario())
    assert (result.written, result.skipped, result.dead_lettered) == (4, 0, 3)
    assert (replay.written, replay.skipped, replay.dead_lettered) == (0, 7, 0)
    assert status is Status.OK
    assert rows(conn, "SELECT id, qty, label FROM sink.items ORDER BY id") == [
        (1, 6, "ok"),
        (4, 8, "new"),
    ]
    assert list(orders_by_id(conn)) == [1]
    assert rows(conn, "SELECT count(*) FROM sink.customers") == [(0,)]
    letters = rows(
        conn,
        "SELECT pipeline_id, sink_id, partition, major, minor, table_name, operation, row, error"
        " FROM sink._cdc_dead_letters ORDER BY id",
    )
    assert [letter[:8] for letter in letters] == [
        (
            PIPELINE,
            "replica",
            "0",
            1000,
            1,
            "shop.items",
            "c",
            {"id": "2", "qty": "abc", "label": "bad"},
        ),
        (
            PIPELINE,
            "replica",
            "0",
            1000,
            3,
            "shop.items",
            "c",
            {"id": "3", "qty": "7", "label": "too long"},
        ),
        (
            PIPELINE,
            "replica",
            "0",
            1000,
            4,
            "shop.customers",
            "c",
            {"tenant": "acme", "id": "1", "name": "Ann", "tags": None},
        ),
    ]
    assert "invalid input syntax for type integer" in letters[0][8]
    assert "too long" in letters[1][8]
    assert "primary key" in letters[2][8]
    assert applied_position(conn) == (1000, 6)


def test_malformed_events_are_dead_lettered(target: Target) -> None:
    dsn, conn = target
    s = Stream()
    events = [
        s.ins(ITEMS, "1", "1", "ok"),
        s.ins(ITEMS, None, "1", "null key"),
        s.ins(ITEMS, "2", "2"),  # one value short
        s.event(Operation.DELETE, ITEMS),  # no row at all
        s.ins(ITEMS, "3", "3", "nul\x00byte"),
    ]

    async def scenario() -> WriteResult:
        async with open_writer(dsn) as writer:
            return await writer.write(batch(events))

    result = run(scenario())
    assert (result.written, result.dead_lettered) == (1, 4)
    assert rows(conn, "SELECT id FROM sink.items") == [(1,)]
    errors = [r[0] for r in rows(conn, "SELECT error FROM sink._cdc_dead_letters ORDER BY minor")]
    assert "key column 'id' has no value" in errors[0]
    assert "2 values" in errors[1]
    assert "delete without a before row" in errors[2]
    assert "NUL" in errors[3]


# --------------------------------------------------------------------------- outages


def test_database_down_write_retries_until_it_is_back(fresh_pg_server: PostgresServer) -> None:
    server = fresh_pg_server
    server.create_database("sinkdown")
    dsn = server.dsn("sinkdown")
    s = Stream()
    before = [s.ins(ORDERS, *order(1, note="before the outage"))]
    during = [s.tx().upd(ORDERS, *order(1, note="during")), s.ins(ORDERS, *order(2))]
    after_stop = [s.tx().ins(ORDERS, *order(3))]

    async def scenario() -> None:
        async with open_writer(dsn, connect_timeout_seconds=2) as writer:
            assert (await writer.write(batch(before))).written == 1
            assert (await writer.health()).status is Status.OK

            await asyncio.to_thread(server.stop)
            health = await writer.health()
            assert health.status is Status.ERROR and health.detail["error"], health

            pending = asyncio.create_task(writer.write(batch(during, batch_id=2)))
            await asyncio.sleep(4)
            assert not pending.done(), "write returned while the database was down"
            health = await writer.health()
            assert health.status is Status.ERROR, health

            await asyncio.to_thread(server.start)
            result = await asyncio.wait_for(pending, 90)
            assert (result.written, result.skipped) == (2, 0)
            assert (await writer.health()).status is Status.OK

            # stop() while a write is retrying: the write gives up with SinkUnavailableError.
            await asyncio.to_thread(server.stop)
            stuck = asyncio.create_task(writer.write(batch(after_stop, batch_id=3)))
            await asyncio.sleep(1)
            started = time.monotonic()
            await writer.stop()
            with pytest.raises(SinkUnavailableError):
                await stuck
            assert time.monotonic() - started < 10

    run(scenario())
    server.start()
    with server.connect("sinkdown") as conn:
        assert notes(conn) == {1: "during", 2: "n"}


def test_start_does_not_need_the_database(fresh_pg_server: PostgresServer) -> None:
    server = fresh_pg_server
    server.create_database("sinklate")
    dsn = server.dsn("sinklate")
    server.stop()
    s = Stream()

    async def scenario() -> WriteResult:
        async with open_writer(dsn, connect_timeout_seconds=2) as writer:
            assert (await writer.health()).status is Status.ERROR
            pending = asyncio.create_task(writer.write(batch([s.ins(ORDERS, *order(1))])))
            await asyncio.sleep(1)
            await asyncio.to_thread(server.start)
            return await asyncio.wait_for(pending, 90)

    assert run(scenario()).written == 1


# --------------------------------------------------------------------------- volume


def test_ten_thousand_rows_throughput(target: Target, capsys: pytest.CaptureFixture[str]) -> None:
    dsn, conn = target
    n = 10_000
    s = Stream()
    warm_up = [s.ins(ORDERS, *order(-1))]  # creates the table outside the measurement
    s.tx()
    inserts = [s.ins(ORDERS, *order(i, f"{i}.25", f"note {i}")) for i in range(n)]
    s.tx()
    updates = [
        s.upd(ORDERS, *order(i, f"{i}.50", UNCHANGED if i % 10 == 1 else f"changed {i}"))
        for i in range(n)
    ]
    s.tx()
    deletes = [s.delete(ORDERS, str(i)) for i in range(0, n, 2)]
    timings: dict[str, float] = {}

    async def timed(writer: PostgresSinkWriter, name: str, events: list[SourceEvent]) -> None:
        started = time.perf_counter()
        result = await writer.write(batch(events))
        timings[name] = time.perf_counter() - started
        assert result.written + result.skipped == len(events)

    async def scenario() -> None:
        async with open_writer(dsn, batch_size=n) as writer:
            await writer.write(batch(warm_up))
            await timed(writer, "insert", inserts)
            await timed(writer, "update", updates)
            await timed(writer, "delete", deletes)
            await timed(writer, "replay", inserts)

    run(scenario())
    assert rows(conn, "SELECT count(*) FROM sink.orders WHERE id >= 0") == [(n // 2,)]
    assert notes(conn)[11] == "note 11" and notes(conn)[13] == "changed 13"
    with capsys.disabled():
        for name, seconds in timings.items():
            count = len(deletes) if name == "delete" else n
            print(
                f"\npostgres sink {name}: {count} rows in {seconds:.3f}s = "
                f"{count / seconds:,.0f} rows/s",
                end="",
            )
        print()


def test_health_reports_applied_positions(target: Target) -> None:
    dsn, _ = target
    s = Stream()

    async def scenario() -> None:
        writer = PostgresSinkWriter(settings(dsn), PIPELINE, "replica")
        assert (await writer.health()).status is Status.ERROR  # not started
        await writer.start()
        try:
            health = await writer.health()
            assert health.name == "sink:replica"
            assert health.status is Status.OK and health.detail["applied"] == {}
            await writer.write(batch([s.ins(ITEMS, "1", "1", "x")], partition="7"))
            health = await writer.health()
            assert health.detail["applied"] == {"7": "1000:0"}
        finally:
            await writer.stop()

    run(scenario())


def test_missing_privilege_is_retried_not_dead_lettered(pg: PgTestContext) -> None:
    db = pg.new_database("sinkpriv")
    role = f"sink_writer_{uuid.uuid4().hex[:8]}"
    admin = pg.connect(db)
    admin.execute(f"CREATE ROLE {role} LOGIN")
    admin.execute(f"GRANT CREATE ON DATABASE {db} TO {role}")
    s = Stream()
    first = [s.ins(ITEMS, "1", "1", "one")]
    second = [s.tx().upd(ITEMS, "1", "2", "two"), s.ins(ITEMS, "2", "2", "two")]

    async def scenario() -> WriteResult:
        async with open_writer(pg.dsn(db, user=role)) as writer:
            assert (await writer.write(batch(first))).written == 1
            admin.execute("ALTER TABLE sink.items OWNER TO postgres")  # the role loses INSERT
            pending = asyncio.create_task(writer.write(batch(second, batch_id=2)))
            await asyncio.sleep(2)
            assert not pending.done()
            health = await writer.health()
            assert health.status is Status.DEGRADED, health
            assert "InsufficientPrivilege" in health.detail["error"]
            admin.execute(f"GRANT ALL ON sink.items TO {role}")
            return await asyncio.wait_for(pending, 30)

    try:
        result = run(scenario())
        assert (result.written, result.dead_lettered) == (2, 0)
        assert rows(admin, "SELECT id, qty FROM sink.items ORDER BY id") == [(1, 2), (2, 2)]
        assert rows(admin, "SELECT count(*) FROM sink._cdc_dead_letters") == [(0,)]
    finally:
        admin.execute("DROP SCHEMA sink CASCADE")
        admin.execute(f"REVOKE ALL ON DATABASE {db} FROM {role}")
        admin.execute(f"DROP ROLE {role}")


def test_plain_batches_take_the_columnar_path_and_store_what_the_row_path_stores(
    pg: PgTestContext,
) -> None:
    """Blocks of plain changes (no truncate, unchanged value or key change) are collapsed
    and COPYed column-wise; the same changes given as rows give the same tables."""
    s = Stream()
    changes = [
        s.ins(ITEMS, "1", "10", "tab\there"),
        s.ins(ITEMS, "2", "20", "back\\slash"),
        s.upd(ITEMS, "1", "11", "new\nline"),
        s.ins(ITEMS, "3", "30", None),
        s.delete(ITEMS, "2"),
        s.ins(ORDERS, *order(1, "12.50", "é ü")),
        s.upd(ITEMS, "3", "31", ""),
    ]
    stored = []
    for columnar in (True, False):
        db = pg.new_database("columnar" if columnar else "rows")
        dsn, conn = pg.dsn(db), pg.connect(db)

        async def scenario(dsn: str = dsn, columnar: bool = columnar) -> int:
            async with open_writer(dsn) as writer:
                given = batch(changes) if columnar else SinkBatch(PIPELINE, "0", 1, changes)
                result = await writer.write(given)
                assert (result.written, result.dead_lettered) == (len(changes), 0)
                return writer.columnar_batches

        assert run(scenario()) == (1 if columnar else 0)
        stored.append(
            (
                rows(conn, "SELECT id, qty, label FROM sink.items ORDER BY id"),
                orders_by_id(conn),
            )
        )
    assert stored[0] == stored[1]
    assert stored[0][0] == [(1, 11, "new\nline"), (3, 31, "")]


def test_a_batch_of_several_lanes_is_one_transaction_with_a_position_per_lane(
    target: Target,
) -> None:
    """Plain changes of three lanes (keys never cross lanes) go in one columnar transaction
    that saves each lane's position; a replay of some lanes next to new changes of another
    skips exactly the replayed ones. A batch whose blocks need the row path (a truncate)
    is written lane by lane."""
    dsn, conn = target
    a, b, c = Stream(major=5000), Stream(major=7), Stream(major=300)
    lane_a = [a.ins(ITEMS, "1", "10", "a"), a.upd(ITEMS, "1", "11", "a2")]
    lane_b = [b.ins(ITEMS, "2", "20", "b"), b.delete(ITEMS, "2"), b.ins(ITEMS, "4", "40", "b")]
    lane_c = [c.ins(ITEMS, "3", "30", "c")]

    def multi(parts: Sequence[tuple[str, Sequence[SourceEvent]]], batch_id: int) -> SinkBatch:
        events = [ev for _, evs in parts for ev in evs]
        counts = [len(evs) for _, evs in parts]
        lanes = [lane for lane, _ in parts]
        blocks = build_blocks(events, [i for i, n in enumerate(counts) for _ in range(n)])
        return SinkBatch(PIPELINE, lanes[0], batch_id, blocks=blocks, lanes=lanes)

    async def scenario() -> tuple[WriteResult, WriteResult, WriteResult, int]:
        async with open_writer(dsn) as writer:
            first = await writer.write(multi([("a", lane_a), ("b", lane_b), ("c", lane_c)], 1))
            more_c = [c.tx().upd(ITEMS, "3", "31", "c2")]
            again = await writer.write(multi([("a", lane_a), ("c", more_c)], 2))
            mixed = [b.tx().truncate(ITEMS), b.ins(ITEMS, "9", "90", "b")]
            rowwise = await writer.write(
                multi([("b", mixed), ("c", [c.ins(ITEMS, "5", "50", "c")])], 3)
            )
            return first, again, rowwise, writer.columnar_batches

    first, again, rowwise, columnar = run(scenario())
    assert (first.written, first.skipped) == (6, 0)
    assert (again.written, again.skipped) == (1, 2)
    assert (rowwise.written, rowwise.skipped) == (3, 0)
    assert columnar == 3  # two batches of several lanes at once, then lane c's own part
    assert rows(conn, "SELECT id, qty FROM sink.items ORDER BY id") == [(5, 50), (9, 90)]
    assert applied_position(conn, "a") == (5000, 1)
    assert applied_position(conn, "b") == (107, 1)
    assert applied_position(conn, "c") == (400, 1)


def test_a_bad_value_in_one_lane_of_a_batch_dead_letters_only_that_change(
    target: Target,
) -> None:
    dsn, conn = target
    a, b = Stream(major=10), Stream(major=20)
    good = [a.ins(ITEMS, "1", "10", "a"), a.ins(ITEMS, "2", "20", "a")]
    bad = [b.ins(ITEMS, "3", "not a number", "b"), b.ins(ITEMS, "4", "40", "b")]
    events = good + bad
    blocks = build_blocks(events, [0, 0, 1, 1])
    given = SinkBatch(PIPELINE, "a", 1, blocks=blocks, lanes=["a", "b"])

    async def scenario() -> WriteResult:
        async with open_writer(dsn) as writer:
            return await writer.write(given)

    result = run(scenario())
    assert (result.written, result.dead_lettered) == (3, 1)
    assert rows(conn, "SELECT id FROM sink.items ORDER BY id") == [(1,), (2,), (4,)]
    assert rows(conn, "SELECT partition FROM sink._cdc_dead_letters") == [("b",)]
    assert applied_position(conn, "a") == (10, 1)
    assert applied_position(conn, "b") == (20, 1)
