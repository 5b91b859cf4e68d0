"""The ingest pump (services/ingest/service.py) with in-memory ports: source -> routed batches
-> sinks -> acks -> ordered acks of the source's handles per lane. The gRPC stream is
replaced by an in-memory Outlet that encodes each batch to the wire (cdc.v2) and decodes it
again, and writes it to a FakeSinkWriter, acking (durable) when the test (or the writer)
says so; services/ingest/sink_channel.py has its own tests (test_sink_channel.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.health import ComponentHealth, Status
from domain.ports import DeliveryAck, OutboundBatch, SinkBatch, SourceChunk
from domain.routing import Router, RoutingRule
from services.ingest.service import IngestService
from services.wire import decode_batch, encode_batch
from tests.support.fakes import FakeEventSource, FakeSinkWriter

ORDERS = TableSchema(
    "shop", "orders", (Column("id", 20, "bigint", is_key=True), Column("n", 25, "text"))
)
ITEMS = TableSchema("shop", "items", (Column("id", 20, "bigint", is_key=True),))


def change(table: TableSchema, lsn: int, key: int, minor: int = 0) -> SourceEvent:
    row = (str(key), f"v{lsn}") if table is ORDERS else (str(key),)
    return SourceEvent(Operation.CREATE, table, Position(lsn, minor), after=row)


def chunk(lsn: int, *events: SourceEvent, handle: int | None = -1) -> SourceChunk:
    """A transaction committed at `lsn` (its ack handle, unless given), on lane "slot"."""
    return SourceChunk("slot", list(events), lsn if handle == -1 else handle)


class MemoryChannel:
    """Stands in for SinkChannel (an Outlet): keeps what was sent, unacked, until `ack_next()`
    (or at once with `auto_ack`) writes it to the writer and acks it to the service (accepted
    and durable), in order. What is sent goes through the wire encoding and back."""

    def __init__(self, sink_id: str, writer: FakeSinkWriter, auto_ack: bool = True) -> None:
        self.sink_id = sink_id
        self.writer = writer
        self.auto_ack = auto_ack
        self.sent: list[SinkBatch] = []
        self.pending: list[SinkBatch] = []
        self.on_ack: Callable[[str, DeliveryAck], Awaitable[None]] | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.sink_id

    @property
    def unacked(self) -> int:
        return len(self.pending)

    def start(self) -> None:
        if self.auto_ack:
            self._pump = asyncio.create_task(self._auto())

    async def send(self, batch: OutboundBatch) -> None:
        message = decode_batch(
            encode_batch(
                batch.batch_id, batch.pipeline_id, batch.lanes[0], batch.events, batch.trace_context
            )
        )
        self.sent.append(message)
        self.pending.append(message)

    async def ack(self, batch_id: int) -> None:
        """Write and ack one sent batch (any of them: acks may come out of order across
        sinks; the tracker must still release the handles in order)."""
        [message] = [m for m in self.pending if m.batch_id == batch_id]
        result = await self.writer.write(message)
        self.pending.remove(message)
        assert self.on_ack is not None
        await self.on_ack(
            self.sink_id,
            DeliveryAck(
                batch_id,
                accepted=True,
                durable=result.durable,
                written=result.written,
                skipped=result.skipped,
            ),
        )

    async def ack_next(self) -> None:
        await self.ack(self.pending[0].batch_id)

    async def _auto(self) -> None:
        while True:
            if self.pending:
                await self.ack_next()
            else:
                await asyncio.sleep(0.001)

    async def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.pending

    async def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()

    def health(self) -> ComponentHealth:
        return ComponentHealth(f"sink:{self.sink_id}", Status.OK, {})


def pump(
    source: FakeEventSource,
    channels: dict[str, MemoryChannel],
    rules: list[RoutingRule] | None = None,
    batch_max_events: int = 100,
    drain_timeout: float = 5.0,
) -> IngestService:
    router = Router(rules if rules is not None else [RoutingRule(s) for s in channels])
    service = IngestService(
        "p1",
        source,
        router,
        channels,
        batch_max_events,
        drain_timeout,  # type: ignore[arg-type]
    )
    for channel in channels.values():
        channel.on_ack = service.on_ack
    return service


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_every_change_reaches_its_sinks_and_every_handle_is_acked_in_order() -> None:
    source = FakeEventSource(
        [
            chunk(10, change(ORDERS, 10, 1), change(ITEMS, 10, 1, 1)),
            chunk(20, change(ORDERS, 20, 2)),
            chunk(30, change(ITEMS, 30, 3)),
        ]
    )
    everything, orders = FakeSinkWriter(), FakeSinkWriter()
    channels = {"all": MemoryChannel("all", everything), "orders": MemoryChannel("orders", orders)}
    rules = [RoutingRule("all"), RoutingRule("orders", tables=("shop.orders",))]
    asyncio.run(pump(source, channels, rules).run())  # the source ends: drain and stop
    assert set(everything.table("shop.orders")) == {("1",), ("2",)}
    assert set(everything.table("shop.items")) == {("1",), ("3",)}
    assert set(orders.table("shop.orders")) == {("1",), ("2",)}
    assert "shop.items" not in orders.tables
    # chunk 30 had nothing for `orders`: it was sent to `all` only
    assert [len(m.events) for m in channels["orders"].sent] == [1, 1]
    assert source.commits == [("slot", 10), ("slot", 20), ("slot", 30)]


def test_a_big_chunk_is_split_and_only_its_last_batch_carries_the_handle() -> None:
    async def scenario() -> None:
        events = [change(ORDERS, 50, k, k) for k in range(5)]
        source = FakeEventSource([chunk(50, *events)], follow=True)
        channel = MemoryChannel("s", FakeSinkWriter(), auto_ack=False)
        service = pump(source, {"s": channel}, batch_max_events=2)
        running = asyncio.create_task(service.run())
        await until(lambda: len(channel.sent) == 3)
        assert [len(m.events) for m in channel.sent] == [2, 2, 1]
        await channel.ack_next()
        await channel.ack_next()
        assert source.commits == []  # the transaction is not all written yet
        await channel.ack_next()
        assert source.commits == [("slot", 50)]
        service.request_stop()
        await running

    asyncio.run(scenario())


def test_commits_wait_for_every_sink_and_never_pass_an_unacked_batch() -> None:
    async def scenario() -> None:
        source = FakeEventSource(
            [chunk(lsn, change(ORDERS, lsn, lsn)) for lsn in (1, 2, 3)], follow=True
        )
        a = MemoryChannel("a", FakeSinkWriter(), auto_ack=False)
        b = MemoryChannel("b", FakeSinkWriter(), auto_ack=False)
        service = pump(source, {"a": a, "b": b})
        running = asyncio.create_task(service.run())
        await until(lambda: len(a.sent) == 3 and len(b.sent) == 3)
        first, second, third = (m.batch_id for m in a.sent)
        await a.ack(third)
        await b.ack(third)
        await a.ack(first)
        assert source.commits == []  # batch 1 still waits for b; batch 3 must not pass it
        await b.ack(first)
        assert source.commits == [("slot", 1)]
        await b.ack(second)
        assert source.commits == [("slot", 1)]
        await a.ack(second)
        # 2 and 3 are released together, in order, in one ack of the lane
        assert source.commits == [("slot", 1), ("slot", 2), ("slot", 3)]
        assert source.acks == [("slot", [1]), ("slot", [2, 3])]
        service.request_stop()
        await running
        assert service.unacked_at_stop == 0

    asyncio.run(scenario())


def test_a_chunk_for_no_sink_commits_at_once_but_not_past_an_earlier_batch() -> None:
    async def scenario() -> None:
        keepalive = SourceChunk("slot", [], 5)  # e.g. a heartbeat: no changes, a position
        source = FakeEventSource([keepalive], follow=True)
        channel = MemoryChannel("s", FakeSinkWriter(), auto_ack=False)
        rules = [RoutingRule("s", tables=("shop.orders",))]
        service = pump(source, {"s": channel}, rules)
        running = asyncio.create_task(service.run())
        await until(lambda: source.commits == [("slot", 5)])
        source.append(chunk(6, change(ORDERS, 6, 1)))
        source.append(chunk(7, change(ITEMS, 7, 1)))  # routed nowhere
        await until(lambda: len(channel.sent) == 1)
        await asyncio.sleep(0.05)
        assert source.commits == [("slot", 5)]  # 7 waits for 6
        await channel.ack_next()
        await until(lambda: source.commits[-1] == ("slot", 7))
        service.request_stop()
        await running

    asyncio.run(scenario())


def test_stop_drains_what_is_in_flight_and_commits_it() -> None:
    async def scenario() -> None:
        source = FakeEventSource([chunk(1, change(ORDERS, 1, 1))], follow=True)
        channel = MemoryChannel("s", FakeSinkWriter(), auto_ack=False)
        service = pump(source, {"s": channel}, drain_timeout=5)
        running = asyncio.create_task(service.run())
        await until(lambda: channel.unacked == 1)
        service.request_stop()
        await asyncio.sleep(0.05)
        assert not running.done()  # draining
        await channel.ack_next()
        await running
        assert service.unacked_at_stop == 0
        assert source.commits == [("slot", 1)] and source.stopped

    asyncio.run(scenario())


def test_a_drain_that_times_out_commits_nothing_unacked_and_reports_it() -> None:
    async def scenario() -> None:
        source = FakeEventSource(
            [chunk(1, change(ORDERS, 1, 1)), chunk(2, change(ORDERS, 2, 2))], follow=True
        )
        channel = MemoryChannel("s", FakeSinkWriter(), auto_ack=False)
        service = pump(source, {"s": channel}, drain_timeout=0.2)
        running = asyncio.create_task(service.run())
        await until(lambda: channel.unacked == 2)
        await channel.ack_next()
        service.request_stop()
        await running
        assert service.unacked_at_stop == 1
        assert source.commits == [("slot", 1)]

    asyncio.run(scenario())


def test_after_a_crash_the_uncommitted_changes_are_redelivered_and_applied_once() -> None:
    """The pump stops before acks come back (a crash); a new pump over the restarted source
    gets everything after the acked handle again, and the idempotent writer keeps
    one copy of each change."""
    transactions = [chunk(lsn, change(ORDERS, lsn, lsn)) for lsn in range(1, 7)]
    source = FakeEventSource(transactions, follow=True)
    writer = FakeSinkWriter()

    async def first_life() -> None:
        channel = MemoryChannel("s", writer, auto_ack=False)
        service = pump(source, {"s": channel}, drain_timeout=0)
        running = asyncio.create_task(service.run())
        await until(lambda: len(channel.sent) == 6)
        for _ in range(4):  # all four written, only the first two acked: then the crash
            message = channel.pending[0]
            await writer.write(message)
            if len(channel.sent) - channel.unacked < 2:
                await channel.ack(message.batch_id)
            else:
                channel.pending.pop(0)
        service.request_stop()
        await running

    asyncio.run(first_life())
    assert source.commits == [("slot", 1), ("slot", 2)]
    source.restart()
    source.follow = False
    channel = MemoryChannel("s", writer)
    asyncio.run(pump(source, {"s": channel}).run())
    redelivered = [m.events[0].position.major for m in channel.sent]
    assert redelivered == [3, 4, 5, 6]
    assert sorted(writer.table("shop.orders")) == [(str(k),) for k in range(1, 7)]
    assert source.committed == {"slot": 6}
