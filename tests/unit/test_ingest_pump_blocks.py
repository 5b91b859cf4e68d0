"""The ingest pump (services/ingest/service.py) with a source that hands out ``arrow`` change
blocks (`SourceChunk.blocks`) instead of events: the blocks reach the outlets as blocks
(`OutboundBatch.blocks`), cut to the batch size, joined across lanes with `@lane` and
`@index` set, routed per table and operation, and the source's handles are released in
order per lane."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from decimal import Decimal

import pyarrow as pa

from domain.blocks import ENCODING_ARROW
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import OutboundBatch, SourceChunk
from domain.routing import Router, RoutingRule
from services.ingest.service import IngestService
from services.wire import decode_batch, encode_outbound
from tests.support.arrow_chunks import Change, block_chunk, changes_in_order
from tests.support.fakes import FakeEventSource, FakeOutlet

ORDERS = TableSchema(
    "shop",
    "orders",
    (
        Column("id", 0, "bigint", True, "int64"),
        Column("amount", 0, "numeric(12,2)", False, "decimal(12,2)"),
        Column("at", 0, "timestamptz", False, "timestamptz"),
    ),
)
ITEMS = TableSchema(
    "shop",
    "items",
    (Column("id", 0, "bigint", True, "int64"), Column("tags", 0, "text[]", False, "list<string>")),
)
AT = datetime(2026, 12, 1, 11, 0, tzinfo=UTC)
AT_US = int(AT.timestamp() * 1_000_000)


def order(lsn: int, minor: int, key: int, op: Operation = Operation.CREATE) -> Change:
    row = (key, Decimal("12.50") + key, AT)
    return Change(ORDERS, op, Position(lsn, minor), row, commit_us=AT_US + lsn)


def item(lsn: int, minor: int, key: int) -> Change:
    return Change(ITEMS, Operation.CREATE, Position(lsn, minor), (key, ["a", str(key)]))


def _pump(
    chunks: list[SourceChunk], limit: int, router: Router | None = None
) -> tuple[IngestService, dict[str, FakeOutlet], FakeEventSource]:
    service: IngestService
    source = FakeEventSource(chunks)
    router = router or Router([RoutingRule("s")])
    outlets = {
        n: FakeOutlet(n, lambda name, ack: service.on_ack(name, ack), False)
        for n in router.sink_ids
    }
    service = IngestService("p", source, router, outlets, limit)
    return service, outlets, source


def test_blocks_of_several_tables_and_lanes_leave_in_one_batch_of_blocks_in_order() -> None:
    chunks = [
        block_chunk("a", [order(1, 0, 1), item(1, 1, 7), order(1, 2, 2)], "a1"),
        block_chunk("b", [item(5, 0, 8), order(5, 1, 3, Operation.DELETE)], "b1"),
    ]
    service, outlets, source = _pump(chunks, limit=20)

    async def scenario() -> None:
        await service._read_loop()
        (batch,) = outlets["s"].sent
        assert batch.events == [] and batch.blocks is not None and len(batch) == 5
        assert batch.lanes == ("a", "b")
        assert all(b.encoding == ENCODING_ARROW for b in batch.blocks)
        assert changes_in_order(batch.blocks) == [
            (0, 0, "shop.orders", Position(1, 0)),
            (1, 0, "shop.items", Position(1, 1)),
            (2, 0, "shop.orders", Position(1, 2)),
            (3, 1, "shop.items", Position(5, 0)),
            (4, 1, "shop.orders", Position(5, 1)),
        ]
        assert batch.last_positions() == {"a": Position(1, 2), "b": Position(5, 1)}
        assert service.events_read == 5
        await outlets["s"].release(batch.batch_id)
        assert source.acked == {"a": ["a1"], "b": ["b1"]}

    asyncio.run(scenario())
    # Per table from the blocks' lengths; the newest commit time is the batch's latency mark.
    registry = service.metrics.registry
    read = "cdc_ingest_events_read_total"
    assert registry.get_sample_value(read, {"pipeline": "p", "table": "shop.orders"}) == 3
    assert registry.get_sample_value(read, {"pipeline": "p", "table": "shop.items"}) == 2
    sent = {"pipeline": "p", "sink": "s", "table": "shop.items"}
    assert registry.get_sample_value("cdc_ingest_events_sent_total", sent) == 2


def test_a_chunk_bigger_than_a_batch_is_cut_in_change_order_and_its_handle_goes_last() -> None:
    changes = [order(9, 0, 1), item(9, 1, 1), item(9, 2, 2), order(9, 3, 2), item(9, 4, 3)]
    chunks = [block_chunk("a", changes, "a1"), block_chunk("b", [order(3, 0, 9)], "b1")]
    service, outlets, source = _pump(chunks, limit=2)
    outlet = outlets["s"]

    async def scenario() -> None:
        await service._read_loop()
        sent = outlet.sent
        assert [(b.lanes, len(b)) for b in sent] == [
            (("a",), 2),
            (("a",), 2),
            (("a",), 1),
            (("b",), 1),
        ]
        parts = [changes_in_order(b.blocks or []) for b in sent[:3]]
        assert [[(i, p.minor) for i, _, _, p in part] for part in parts] == [
            [(0, 0), (1, 1)],
            [(0, 2), (1, 3)],
            [(0, 4)],
        ]
        await outlet.release(sent[2].batch_id)
        await outlet.release(sent[0].batch_id)
        assert source.acked == {}  # the chunk's middle part is not durable yet
        await outlet.release(sent[1].batch_id)
        assert source.acked == {"a": ["a1"]}
        await outlet.release(sent[3].batch_id)
        assert source.acked == {"a": ["a1"], "b": ["b1"]}

    asyncio.run(scenario())


def test_a_revoked_lane_of_a_batch_of_blocks_is_never_acked() -> None:
    chunks = [
        block_chunk("a", [order(1, 0, 1)], "a1"),
        block_chunk("b", [item(2, 0, 1)], "b1"),
        block_chunk("b", [item(3, 0, 2)], "b2", revoked=frozenset({"a"})),
    ]
    service, outlets, source = _pump(chunks, limit=20)
    outlet = outlets["s"]

    async def scenario() -> None:
        await service._read_loop()
        assert [b.lanes for b in outlet.sent] == [("a", "b"), ("b",)]
        for batch in list(outlet.sent):
            await outlet.release(batch.batch_id)
        assert source.acked == {"b": ["b1", "b2"]}
        assert service.tracker.lanes() == ("b",)

    asyncio.run(scenario())


def test_chunks_of_events_and_of_blocks_never_share_a_batch() -> None:
    event = SourceEvent(Operation.CREATE, ITEMS, Position(4, 0), after=("1", "{a}"))
    chunks = [
        block_chunk("a", [order(1, 0, 1)], "a1"),
        SourceChunk("b", [event], "b1"),
        block_chunk("c", [order(2, 0, 2)], "c1"),
        block_chunk("d", [order(2, 0, 3)], "d1"),
    ]
    service, outlets, source = _pump(chunks, limit=20)

    async def scenario() -> None:
        await service._read_loop()
        sent = outlets["s"].sent
        assert [(b.lanes, b.blocks is not None) for b in sent] == [
            (("a",), True),
            (("b",), False),
            (("c", "d"), True),
        ]
        assert sent[1].events == [event]
        for batch in sent:
            await outlets["s"].release(batch.batch_id)
        assert source.acked == {"a": ["a1"], "b": ["b1"], "c": ["c1"], "d": ["d1"]}

    asyncio.run(scenario())


def test_blocks_are_routed_per_table_and_operation() -> None:
    router = Router(
        [
            RoutingRule("all"),
            RoutingRule("order_deletes", ("shop.orders",), frozenset({Operation.DELETE})),
            RoutingRule("items", ("shop.i*",)),
            RoutingRule("nothing", ("shop.none",)),
        ]
    )
    chunks = [
        block_chunk(
            "a",
            [order(1, 0, 1), item(1, 1, 1), order(1, 2, 1, Operation.DELETE), order(1, 3, 2)],
            "a1",
        ),
        block_chunk("b", [order(2, 0, 5, Operation.DELETE)], "b1"),
    ]
    service, outlets, source = _pump(chunks, limit=20, router=router)

    async def scenario() -> None:
        await service._read_loop()
        (to_all,) = outlets["all"].sent
        (deletes,) = outlets["order_deletes"].sent
        (items,) = outlets["items"].sent
        assert outlets["nothing"].sent == []
        assert len(to_all) == 5
        assert [(i, lane, p) for i, lane, _, p in changes_in_order(deletes.blocks or [])] == [
            (2, 0, Position(1, 2)),
            (4, 1, Position(2, 0)),
        ]
        assert [t for _, _, t, _ in changes_in_order(items.blocks or [])] == ["shop.items"]
        # each sink gets only the lanes routed to it, as with events
        assert (to_all.lanes, deletes.lanes, items.lanes) == (("a", "b"), ("a", "b"), ("a",))
        assert deletes.last_positions() == {"a": Position(1, 2), "b": Position(2, 0)}
        assert items.last_positions() == {"a": Position(1, 1)}
        for name in ("all", "order_deletes", "items"):
            await outlets[name].release(to_all.batch_id)
        assert source.acked == {"a": ["a1"], "b": ["b1"]}

    asyncio.run(scenario())


def test_a_routed_batch_of_blocks_crosses_the_wire_with_its_lanes_and_types() -> None:
    chunks = [
        block_chunk("a", [order(1, 0, 1), item(1, 1, 7)], "a1"),
        block_chunk("b", [order(5, 0, 3)], "b1"),
    ]
    service, outlets, _ = _pump(chunks, limit=20)
    asyncio.run(service._read_loop())
    (outbound,) = outlets["s"].sent
    batch = decode_batch(encode_outbound(outbound))
    assert batch.has_blocks and batch.lanes == ("a", "b") and len(batch) == 3
    assert {b.encoding for b in batch.blocks} == {ENCODING_ARROW}
    orders = next(b for b in batch.blocks if b.schema.table == "orders")
    assert [str(c.logical) for c in orders.schema.columns] == [
        "int64",
        "decimal(12,2)",
        "timestamptz",
    ]
    assert orders.column(1).type == pa.decimal128(12, 2)
    # the lanes' blocks of one table are joined: one block per table
    assert [b.schema.table for b in batch.blocks] == ["orders", "items"]
    assert orders.column(1).to_pylist() == [Decimal("13.50"), Decimal("15.50")]
    assert orders.records.column("@lane").to_pylist() == [0, 1]
    assert orders.column(2).type == pa.timestamp("us", tz="UTC")
    lanes = batch.by_lane()
    assert [(b.partition, len(b)) for b in lanes] == [("a", 2), ("b", 1)]


def test_the_source_is_read_ahead_by_about_one_batch_of_changes_when_outlets_stall() -> None:
    class StalledOutlet(FakeOutlet):
        async def send(self, batch: OutboundBatch) -> None:
            self.sent.append(batch)
            await asyncio.Event().wait()  # no credit comes back

    chunks = [block_chunk("a", [order(n, i, i) for i in range(10)], n) for n in range(1, 11)]
    source = FakeEventSource(chunks, follow=True)
    service: IngestService
    outlet = StalledOutlet("s", lambda name, ack: service.on_ack(name, ack), False)
    service = IngestService("p", source, Router([RoutingRule("s")]), {"s": outlet}, 10)

    async def scenario() -> None:
        reading = asyncio.create_task(service._read_loop())
        await asyncio.sleep(0.2)
        # one chunk in the stalled batch, one read ahead, one waiting to be let in
        assert (len(outlet.sent), source.reads) == (1, 3)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading

    asyncio.run(scenario())


def test_a_sink_given_only_a_later_lane_gets_that_lane_alone() -> None:
    router = Router([RoutingRule("all"), RoutingRule("items", ("shop.items",))])
    chunks = [
        block_chunk("a", [order(1, 0, 1), order(1, 1, 2)], "a1"),
        block_chunk("b", [order(2, 0, 3), item(2, 1, 4)], "b1"),
        block_chunk("c", [item(3, 0, 5)], "c1"),
    ]
    service, outlets, source = _pump(chunks, limit=20, router=router)

    async def scenario() -> None:
        await service._read_loop()
        (items,) = outlets["items"].sent
        assert items.lanes == ("b", "c")
        assert [(i, lane, p) for i, lane, _, p in changes_in_order(items.blocks or [])] == [
            (3, 0, Position(2, 1)),
            (4, 1, Position(3, 0)),
        ]
        assert items.last_positions() == {"b": Position(2, 1), "c": Position(3, 0)}
        for name in ("all", "items"):
            await outlets[name].release(items.batch_id)
        assert source.acked == {"a": ["a1"], "b": ["b1"], "c": ["c1"]}

    asyncio.run(scenario())
