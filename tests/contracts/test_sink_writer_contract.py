"""The contract every sink writer passes, parametrized by factory: the PostgreSQL sink
writer (on a real database), the Iceberg sink, the webhook sink (into a real HTTP receiver)
and the shared fake (tests/support/fakes.py). A new sink adds its factory here
(docs/adding-adapters.md).

A sink declares its guarantee: an exactly-once-effect sink must skip a replayed change
(written 0, skipped n); an at-least-once sink sends it again with the same idempotency key,
and the receiver's state (each key applied once) must come out the same.

Batches reach the writer as the sink service receives them: through the wire (columnar
blocks, `services.wire`), as postgres_text blocks (a PostgreSQL source) or arrow blocks
(typed columns, a Kafka source decoding Avro): the same changes in either encoding must
leave the same rows."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pytest

from adapters.config.pipeline import PostgresSinkConfig, WebhookSinkConfig
from adapters.postgres.sink.writer import PostgresSinkWriter
from adapters.postgres.source.dead_letters import PostgresErrorRouter
from adapters.webhook.sink import WebhookSinkWriter
from domain.blocks import ChangeBlock
from domain.events import UNCHANGED, Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import Guarantee, OutboundBatch, SinkBatch, SinkWriter, WriteResult
from services.wire import decode_batch, encode_batch, encode_blocks, encode_outbound
from tests.support.arrow_blocks import TypedChange, arrow_block, kafka_column
from tests.support.fakes import FakeSinkWriter
from tests.support.postgres import PgTestContext
from tests.support.webhook_receiver import Faults, WebhookReceiver

ITEMS = TableSchema(
    "public",
    "items",
    (
        Column("id", 20, "bigint", is_key=True),
        Column("name", 25, "text"),
        Column("doc", 25, "text"),
    ),
)
ITEMS_V2 = TableSchema("public", "items", (*ITEMS.columns, Column("color", 25, "text")))
LANE = "slot_a"

Rows = dict[tuple[str, ...], dict[str, str | None]]


@dataclass
class Harness:
    writer: SinkWriter
    rows: Callable[[TableSchema], Rows]
    dead_letters: Callable[[], int]
    # At-least-once sinks: whether every change delivered twice came with the same id.
    same_ids: Callable[[], bool] | None = None

    def write(self, events: Sequence[SourceEvent], batch_id: int = 1) -> WriteResult:
        message = encode_batch(batch_id, "contract", LANE, list(events))
        batch: SinkBatch = decode_batch(message)
        return run(self.writer.write(batch))

    def write_blocks(
        self, blocks: Sequence[ChangeBlock], batch_id: int = 1, lane: str = LANE
    ) -> WriteResult:
        """Blocks as a source hands them out (e.g. arrow-encoded ones), through the wire."""
        message = encode_blocks(batch_id, "contract", [lane], blocks)
        return run(self.writer.write(decode_batch(message)))

    def write_lanes(
        self, lanes: Sequence[tuple[str, Sequence[SourceEvent]]], batch_id: int = 1
    ) -> WriteResult:
        """One batch carrying several lanes, as the pump sends chunks of several lanes."""
        outbound = OutboundBatch(
            batch_id,
            "contract",
            tuple(lane for lane, _ in lanes),
            [ev for _, evs in lanes for ev in evs],
            lane_counts=tuple(len(evs) for _, evs in lanes),
        )
        return run(self.writer.write(decode_batch(encode_outbound(outbound))))

    def flush(self) -> dict[str, Position]:
        return dict(run(self.writer.flush()))


def run(coro: Any) -> Any:
    return asyncio.get_event_loop_policy().get_event_loop().run_until_complete(coro)


@pytest.fixture
def loop() -> Iterator[None]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def _postgres(pg: PgTestContext) -> Iterator[Harness]:
    db = pg.new_database("contract")
    conn = pg.connect(db)
    settings = PostgresSinkConfig(dsn=pg.dsn(db), target_schema="sink")
    writer = PostgresSinkWriter(settings, "contract", "replica")
    run(writer.start())

    def rows(table: TableSchema) -> Rows:
        names = [c.name for c in table.columns]
        have = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = 'sink' AND table_name = %s",
                (table.table,),
            ).fetchall()
        }
        if not have:
            return {}
        names = [n for n in names if n in have]
        select = ", ".join(f'"{n}"::text' for n in names)
        out: Rows = {}
        for r in conn.execute(f'SELECT {select} FROM sink."{table.table}"').fetchall():
            row = dict(zip(names, r, strict=True))
            key = tuple(str(row[c.name]) for c in table.columns if c.is_key)
            out[key] = row
        return out

    def dead() -> int:
        return int(conn.execute("SELECT count(*) FROM sink._cdc_dead_letters").fetchone()[0])

    try:
        yield Harness(writer, rows, dead)
    finally:
        run(writer.stop())


def _webhook(pg: PgTestContext) -> Iterator[Harness]:
    """The webhook sink into a real HTTP receiver that applies each change id once (the
    receiver's side of the at-least-once contract) and refuses a change without a key;
    dead letters in the direct transport's PostgreSQL table."""
    db = pg.new_database("contract_hook")
    conn = pg.connect(db)
    receiver = WebhookReceiver("s3cret", Faults(refuse_null_keys=True)).start()
    settings = WebhookSinkConfig.model_validate(
        {"url": receiver.url, "hmac_secret": "s3cret", "linger_ms": 0, "batch_size": 2}
    )
    router = PostgresErrorRouter(pg.dsn(db), "contract")
    writer = WebhookSinkWriter(settings, "contract", "hook", router=router)
    run(writer.start())

    def rows(table: TableSchema) -> Rows:
        state = receiver.state().get(table.qualified_name, {})
        out: Rows = {}
        for row in state.values():
            plain = {
                c.name: None if row.get(c.name) is None else str(row[c.name]) for c in table.columns
            }
            out[tuple(str(plain[c.name]) for c in table.columns if c.is_key)] = plain
        return out

    def dead() -> int:
        if conn.execute("SELECT to_regclass('cdc_platform.dead_letters')").fetchone() == (None,):
            return 0  # created with the first dead letter
        found = conn.execute(
            "SELECT count(*) FROM cdc_platform.dead_letters WHERE pipeline_id = 'contract'"
        ).fetchone()
        return int(found[0]) if found else 0

    def same_ids() -> bool:
        seen: dict[tuple[str, str], str] = {}
        for e in receiver.events:
            if seen.setdefault((e["table"], e["position"]), e["id"]) != e["id"]:
                return False
        return len(receiver.events) > len(receiver.unique_events())

    try:
        yield Harness(writer, rows, dead, same_ids)
    finally:
        run(writer.stop())
        receiver.stop()


def _iceberg(tmp_path: Any) -> Iterator[Harness]:
    """A SQLite SQL catalog and a local-file warehouse (real files, real commits). Rows are
    read after a flush: the Iceberg sink buffers until its commit."""
    from adapters.config.pipeline import IcebergSinkConfig
    from adapters.iceberg.writer import IcebergSinkWriter

    settings = IcebergSinkConfig(
        catalog_uri=f"sqlite:///{tmp_path}/catalog.db",
        warehouse=str(tmp_path / "warehouse"),
        table_name="{schema}_{table}",
        write_mode="upsert",
        batch_size=100_000,
        flush_interval_seconds=3600,
    )
    writer = IcebergSinkWriter(settings, "contract", "lake")
    run(writer.start())

    def rows(table: TableSchema) -> Rows:
        run(writer.flush())
        assert writer.catalog is not None
        try:
            t = writer.catalog.load_table(("cdc", f"{table.schema}_{table.table}"))
        except Exception:
            return {}
        data = t.scan().to_arrow()
        names = [c.name for c in table.columns if c.name in data.column_names]
        out: Rows = {}
        for r in data.select(names).to_pylist():
            row = {n: None if r[n] is None else str(r[n]) for n in names}
            out[tuple(str(row[c.name]) for c in table.columns if c.is_key)] = row
        return out

    def dead() -> int:
        run(writer.flush())
        assert writer.dead_letters is not None
        return writer.dead_letters.count()

    try:
        yield Harness(writer, rows, dead)
    finally:
        run(writer.stop())


def _fake() -> Iterator[Harness]:
    writer = FakeSinkWriter()

    def rows(table: TableSchema) -> Rows:
        return {k: dict(v) for k, v in writer.rows(table).items()}

    yield Harness(writer, rows, lambda: len(writer.dead_letters))


@pytest.fixture(params=["postgres", "iceberg", "webhook", "fake"])
def sink(request: pytest.FixtureRequest, loop: None) -> Iterator[Harness]:
    if request.param == "postgres":
        yield from _postgres(request.getfixturevalue("pg"))
    elif request.param == "iceberg":
        yield from _iceberg(request.getfixturevalue("tmp_path"))
    elif request.param == "webhook":
        yield from _webhook(request.getfixturevalue("pg"))
    else:
        yield from _fake()


class Changes:
    """Events with increasing positions."""

    def __init__(self, major: int = 100) -> None:
        self.major = major
        self.minor = 0

    def _next(self) -> Position:
        self.minor += 1
        return Position(self.major, self.minor)

    def ins(self, *row: str | None, table: TableSchema = ITEMS) -> SourceEvent:
        return SourceEvent(Operation.CREATE, table, self._next(), after=tuple(row))

    def upd(self, *row: Any, table: TableSchema = ITEMS) -> SourceEvent:
        return SourceEvent(Operation.UPDATE, table, self._next(), after=tuple(row))

    def dele(self, key: str, table: TableSchema = ITEMS) -> SourceEvent:
        before = (key,) + (None,) * (len(table.columns) - 1)
        return SourceEvent(Operation.DELETE, table, self._next(), before=before)


def _plain(rows: Rows) -> dict[str, tuple[str | None, ...]]:
    return {k[0]: tuple(v.values()) for k, v in rows.items()}


def test_every_sink_declares_its_guarantee(sink: Harness) -> None:
    assert isinstance(sink.writer.guarantee, Guarantee)


def test_replay_changes_nothing(sink: Harness) -> None:
    c = Changes()
    events = [c.ins("1", "a", "x"), c.ins("2", "b", "y"), c.upd("1", "a2", "x"), c.dele("2")]
    first = sink.write(events, batch_id=1)
    assert (first.written, first.skipped) == (4, 0)
    before = sink.rows(ITEMS)
    again = sink.write(events, batch_id=2)  # the ingest resent it (a reconnect, a restart)
    more = [*events[2:], c.ins("3", "c", "z")]
    if sink.writer.guarantee is Guarantee.EXACTLY_ONCE_EFFECT:
        assert (again.written, again.skipped) == (0, 4)
        # A partly replayed batch applies only what is new.
        partly = sink.write(more, batch_id=3)
        assert (partly.written, partly.skipped) == (1, 2)
    else:
        # Sent again, each change with the id it had: the receiver's dedup makes it a no-op.
        assert (again.written, again.skipped) == (4, 0)
        partly = sink.write(more, batch_id=3)
        assert (partly.written, partly.skipped) == (3, 0)
        assert sink.same_ids is not None and sink.same_ids()
    assert sink.rows(ITEMS) == {**before, ("3",): {"id": "3", "name": "c", "doc": "z"}}


def test_order_per_key_is_kept_within_and_across_batches(sink: Harness) -> None:
    c = Changes()
    sink.write(
        [
            c.ins("1", "a", None),
            c.upd("1", "b", None),
            c.ins("2", "x", None),
            c.dele("2"),
            c.ins("2", "y", None),
            c.ins("3", "z", None),
            c.dele("3"),
        ],
        batch_id=1,
    )
    sink.write([c.upd("1", "c", None), c.dele("1"), c.ins("1", "d", "doc")], batch_id=2)
    assert _plain(sink.rows(ITEMS)) == {"1": ("1", "d", "doc"), "2": ("2", "y", None)}


def test_unchanged_toasted_values_are_kept_not_nulled(sink: Harness) -> None:
    c = Changes()
    sink.write([c.ins("1", "a", "big value"), c.ins("2", "b", "other")], batch_id=1)
    sink.write([c.upd("1", "a2", UNCHANGED)], batch_id=2)  # stored value supplies it
    sink.write([c.ins("3", "c", "in batch"), c.upd("3", "c2", UNCHANGED)], batch_id=3)
    sink.write([c.upd("2", "b2", None)], batch_id=4)  # NULL is NULL
    assert _plain(sink.rows(ITEMS)) == {
        "1": ("1", "a2", "big value"),
        "2": ("2", "b2", None),
        "3": ("3", "c2", "in batch"),
    }


def test_a_schema_change_adds_the_column(sink: Harness) -> None:
    c = Changes()
    sink.write([c.ins("1", "a", None)], batch_id=1)
    sink.write([c.ins("2", "b", None, "red", table=ITEMS_V2)], batch_id=2)
    rows = sink.rows(ITEMS_V2)
    assert rows[("2",)]["color"] == "red"
    assert rows[("1",)].get("color") is None
    assert rows[("1",)]["name"] == "a"


def test_a_change_that_cannot_be_applied_is_dead_lettered_and_the_rest_written(
    sink: Harness,
) -> None:
    c = Changes()
    result = sink.write([c.ins("1", "a", None), c.ins(None, "no key", None), c.ins("2", "b", None)])
    assert (result.written, result.dead_lettered) == (2, 1)
    assert sink.dead_letters() == 1
    assert sorted(_plain(sink.rows(ITEMS))) == ["1", "2"]


def test_flush_returns_the_durable_position_per_lane(sink: Harness) -> None:
    c = Changes(major=7)
    sink.write([c.ins("1", "a", None), c.ins("2", "b", None)], batch_id=1)
    sink.write([c.upd("2", "c", None)], batch_id=2)
    assert sink.flush() == {LANE: Position(7, 3)}


def test_a_batch_of_several_lanes_keeps_a_position_per_lane(sink: Harness) -> None:
    # Positions are ordered within a lane only: lane b's are lower than lane a's. Keys do
    # not cross lanes (a key-hash lane, a Kafka partition).
    a, b = Changes(major=900), Changes(major=5)
    first_a = [a.ins("1", "one", "x"), a.upd("1", "one v2", "x")]
    first_b = [b.ins("2", "two", "y")]
    result = sink.write_lanes([("lane_a", first_a), ("lane_b", first_b)])
    assert (result.written, result.skipped) == (3, 0)
    assert sink.flush() == {"lane_a": Position(900, 2), "lane_b": Position(5, 1)}
    # The next batch replays lane a (skipped) and brings lane b on; a new lane c too.
    c = Changes(major=1)
    more_b = [b.upd("2", "two v2", "y")]
    new_c = [c.ins("3", "three", "z")]
    result = sink.write_lanes(
        [("lane_a", first_a), ("lane_b", more_b), ("lane_c", new_c)], batch_id=2
    )
    if sink.writer.guarantee is Guarantee.EXACTLY_ONCE_EFFECT:
        assert (result.written, result.skipped) == (2, 2)
    else:  # lane a sent again with its ids; the receiver's state below is unchanged by it
        assert (result.written, result.skipped) == (4, 0)
        assert sink.same_ids is not None and sink.same_ids()
    rows = sink.rows(ITEMS)
    assert {k: r["name"] for k, r in rows.items()} == {
        ("1",): "one v2",
        ("2",): "two v2",
        ("3",): "three",
    }
    assert sink.flush() == {
        "lane_a": Position(900, 2),
        "lane_b": Position(5, 2),
        "lane_c": Position(1, 1),
    }


# A Kafka source's table (no type OID; `type_name` is the PostgreSQL type of the logical
# type), once as text blocks and once as arrow blocks, under two names.
TYPED_COLUMNS = (
    kafka_column("id", "int64", "bigint", key=True),
    kafka_column("flag", "bool", "boolean"),
    kafka_column("small", "int16", "smallint"),
    kafka_column("amount", "decimal(12,2)", "numeric(12,2)"),
    kafka_column("ratio", "float64", "double precision"),
    kafka_column("approx", "float32", "real"),
    kafka_column("note", "string", "text"),
    kafka_column("raw", "bytes", "bytea"),
    kafka_column("day", "date", "date"),
    kafka_column("clock", "time", "time"),
    kafka_column("at", "timestamp", "timestamp"),
    kafka_column("at_tz", "timestamptz", "timestamp with time zone"),
    kafka_column("span", "interval", "interval"),
    kafka_column("tags", "list<string>", "text[]"),
    kafka_column("counts", "list<int64>", "bigint[]"),
    kafka_column("ident", "uuid", "uuid"),
    kafka_column("doc", "json", "jsonb"),
)
TYPED_TEXT = TableSchema("public", "typed_text", TYPED_COLUMNS)
TYPED_ARROW = TableSchema("public", "typed_arrow", TYPED_COLUMNS)
_UUID = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
_INT64_MAX, _INT64_MIN = 2**63 - 1, -(2**63)

# (typed row, the same row as a PostgreSQL source sends it)
_ROW_1 = (
    (
        1,
        True,
        -32768,
        Decimal("12.50"),
        1.5,
        0.1,
        "plain",
        b"\x00\xff",
        date(2024, 2, 29),
        time(13, 45, 7, 250000),
        datetime(2024, 2, 29, 13, 45, 7, 500000),
        datetime(2024, 2, 29, 13, 45, 7, 500000, tzinfo=UTC),
        timedelta(days=3, hours=4, minutes=5, seconds=6, microseconds=789000),
        ["a b", None, 'c"d', "", "NULL"],
        [1, None, 3],
        _UUID,
        '{"k": [1, 2.5, null]}',
    ),
    (
        "1",
        "t",
        "-32768",
        "12.50",
        "1.5",
        "0.1",
        "plain",
        "\\x00ff",
        "2024-02-29",
        "13:45:07.25",
        "2024-02-29 13:45:07.5",
        "2024-02-29 13:45:07.5+00",
        "3 days 04:05:06.789",
        '{"a b",NULL,"c\\"d","","NULL"}',
        "{1,NULL,3}",
        _UUID,
        '{"k": [1, 2.5, null]}',
    ),
)
_ROW_2 = (
    (
        2,
        False,
        0,
        Decimal("-0.01"),
        math.nan,
        -0.0,
        "tab\there\nnew line \\ back",
        b"",
        date(1999, 12, 31),
        time(0, 0),
        datetime(2000, 1, 1),
        datetime(1999, 12, 31, 23, 0, tzinfo=UTC),
        timedelta(days=-1, hours=-2),
        [],
        [],
        None,
        "[]",
    ),
    (
        "2",
        "f",
        "0",
        "-0.01",
        "NaN",
        "-0",
        "tab\there\nnew line \\ back",
        "\\x",
        "1999-12-31",
        "00:00:00",
        "2000-01-01 00:00:00",
        "1999-12-31 23:00:00+00",
        "-1 days -02:00:00",
        "{}",
        "{}",
        None,
        "[]",
    ),
)
_ROW_3 = (  # PostgreSQL's infinities (Iceberg cannot store them: a dead letter either way)
    (
        3,
        None,
        None,
        None,
        -math.inf,
        math.inf,
        None,
        None,
        None,
        None,
        _INT64_MAX,
        _INT64_MIN,
        timedelta(seconds=-1),
        None,
        None,
        None,
        None,
    ),
    (
        "3",
        None,
        None,
        None,
        "-Infinity",
        "Infinity",
        None,
        None,
        None,
        None,
        "infinity",
        "-infinity",
        "-00:00:01",
        None,
        None,
        None,
        None,
    ),
)
# Texts their types refuse: a dead letter in PostgreSQL (uuid, jsonb) and for webhooks (no
# JSON value); Iceberg stores both as strings.
_ROW_5 = (
    (5, *(None,) * 14, "not-a-uuid", "{not json"),
    ("5", *(None,) * 14, "not-a-uuid", "{not json"),
)
_ROW_4: tuple[tuple[Any, ...], tuple[Any, ...]] = ((4, *(None,) * 16), ("4", *(None,) * 16))


def _typed_changes() -> list[list[tuple[TypedChange, SourceEvent]]]:
    """Batches of changes, each as (typed change, the event of TYPED_TEXT in text)."""
    c = Changes(major=40)

    def pair(
        op: Operation, row: tuple[Any, ...], text: tuple[Any, ...], **extra: Any
    ) -> tuple[TypedChange, SourceEvent]:
        before_text = extra.pop("before_text", None)
        p = c._next()
        typed = TypedChange(op, p, row, **extra)
        if op is Operation.DELETE:
            return typed, SourceEvent(op, TYPED_TEXT, p, before=text)
        return typed, SourceEvent(op, TYPED_TEXT, p, before=before_text, after=text)

    first = [
        pair(Operation.CREATE, *_ROW_1),
        pair(Operation.CREATE, *_ROW_2),
        pair(Operation.CREATE, *_ROW_3),
        pair(Operation.CREATE, *_ROW_4),
        pair(Operation.DELETE, *_ROW_4),
        pair(Operation.CREATE, *_ROW_5),
    ]
    # An update whose jsonb value the source did not send (unchanged TOAST) and one that
    # carries the old row too (REPLICA IDENTITY FULL).
    typed_1, text_1 = _ROW_1
    new_1 = (*typed_1[:6], "changed", *typed_1[7:16], None)
    new_1_text = (*text_1[:6], "changed", *text_1[7:16], UNCHANGED)
    typed_2, text_2 = _ROW_2
    new_2 = (*typed_2[:1], True, *typed_2[2:])
    new_2_text = (*text_2[:1], "t", *text_2[2:])
    second = [
        pair(Operation.UPDATE, new_1, new_1_text, unchanged=(16,)),
        pair(Operation.UPDATE, new_2, new_2_text, before=typed_2, before_text=text_2),
    ]
    return [first, second]


def test_a_batch_of_arrow_encoded_blocks_writes_what_its_text_form_writes(
    sink: Harness,
) -> None:
    """The same changes as postgres_text blocks (a PostgreSQL source) into one table and as
    arrow blocks (typed columns, a Kafka source) into another: row by row the same result,
    the same dead letters; a replayed arrow batch changes nothing."""
    batches = _typed_changes()
    for batch_id, changes in enumerate(batches, start=1):
        text = sink.write([text for _, text in changes], batch_id=batch_id)
        assert text.written + text.dead_lettered == len(changes)
    text_dead = sink.dead_letters()
    for batch_id, changes in enumerate(batches, start=len(batches) + 1):
        block = arrow_block(TYPED_ARROW, [typed for typed, _ in changes])
        # Another lane: the positions are the text changes' (each lane has its own).
        typed = sink.write_blocks([block], batch_id=batch_id, lane="typed_lane")
        assert typed.written + typed.dead_lettered == len(changes)
    assert sink.dead_letters() == 2 * text_dead
    from_text = sink.rows(TYPED_TEXT)
    assert {("1",), ("2",)} <= set(from_text)
    assert from_text[("1",)]["note"] == "changed"
    assert sink.rows(TYPED_ARROW) == from_text
    first = arrow_block(TYPED_ARROW, [typed for typed, _ in batches[0]])
    again = sink.write_blocks([first], batch_id=9, lane="typed_lane")
    if sink.writer.guarantee is Guarantee.EXACTLY_ONCE_EFFECT:
        assert (again.written, again.skipped) == (0, len(batches[0]))
    else:  # sent again with the ids it had: the receiver applies nothing twice
        assert sink.same_ids is not None and sink.same_ids()
    assert sink.rows(TYPED_ARROW) == from_text


def test_an_arrow_block_of_a_new_table_shape_adds_the_column(sink: Harness) -> None:
    v1 = TableSchema("public", "shapes", TYPED_COLUMNS[:3])
    v2 = TableSchema("public", "shapes", (*v1.columns, kafka_column("at", "date", "date")))
    c = Changes(major=60)
    old = arrow_block(v1, [TypedChange(Operation.CREATE, c._next(), (1, True, 5))])
    new = arrow_block(
        v2, [TypedChange(Operation.CREATE, c._next(), (2, False, 6, date(2024, 2, 29)))]
    )
    sink.write_blocks([old], batch_id=1)
    sink.write_blocks([new], batch_id=2)
    rows = sink.rows(v2)
    assert rows[("2",)]["at"] == "2024-02-29"
    assert rows[("1",)].get("at") is None
    assert rows[("1",)]["small"] == "5"
