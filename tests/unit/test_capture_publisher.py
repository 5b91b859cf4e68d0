"""The capture stage's pump + publisher Outlet (services/capture/publisher.py) with the
broker replaced at its port (`MessageTransport`) by an in-memory one the test controls:
the slot's handle (the LSN) is released only after the broker acknowledged every message
carrying the batch's changes; changes are spread over lanes by key and keep their order
per lane; a failed publish is resumed and retried from the first failed message, in order;
a publisher that gives up never lets the LSN pass the failed data."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from domain.capture import lane_index, lane_name
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import DeliveryAck, OutboundBatch, SourceChunk
from domain.routing import Router, RoutingRule
from services.capture.payload import ArrowBatchCodec, PayloadError
from services.capture.publisher import LanePublisher, OutMessage, PublishFailedError, RetrySettings
from services.ingest.service import IngestService
from tests.support.arrow_chunks import Change, block_chunk
from tests.support.fakes import FakeEventSource

T = TableSchema("public", "t", (Column("id", 20, "bigint", True), Column("v", 25, "text")))
LANES = 4


def change(lsn: int, key: int, minor: int = 0) -> SourceEvent:
    return SourceEvent(Operation.CREATE, T, Position(lsn, minor), after=(str(key), f"v{lsn}"))


class MemoryBroker:
    """A MessageTransport: keeps what was published per lane; `hold()` keeps the broker's
    answers back until `release()`; `fail_next(n)` makes the next n publishes of a lane
    fail (and, like a paused Pub/Sub ordering key, every later one until `resume`)."""

    name = "memory"
    max_message_bytes = 10_000_000

    def __init__(self) -> None:
        self.published: dict[str, list[OutMessage]] = {}
        self.resumed: list[str] = []
        self.failures_left = 0
        self.paused: set[str] = set()
        self._gate = asyncio.Event()
        self._gate.set()
        self.closed = False

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def publish(
        self, lane: str, messages: Sequence[OutMessage]
    ) -> list[BaseException | None]:
        await self._gate.wait()
        results: list[BaseException | None] = []
        for message in messages:
            if lane in self.paused:
                results.append(RuntimeError("ordering key paused"))
            elif self.failures_left:
                self.failures_left -= 1
                self.paused.add(lane)
                results.append(RuntimeError("publish error"))
            else:
                self.published.setdefault(lane, []).append(message)
                results.append(None)
        return results

    async def resume(self, lane: str) -> None:
        self.resumed.append(lane)
        self.paused.discard(lane)

    async def close(self) -> None:
        self.closed = True

    def events(self, lane: str) -> list[SourceEvent]:
        codec = ArrowBatchCodec()
        return [ev for m in self.published.get(lane, []) for ev in codec.decode(m.data)]


def pipeline(
    chunks: list[SourceChunk],
    broker: MemoryBroker,
    retry: RetrySettings | None = None,
    per_message: int = 3,
) -> tuple[IngestService, FakeEventSource, LanePublisher]:
    source = FakeEventSource(chunks, follow=True)
    holder: list[IngestService] = []

    async def on_ack(outlet: str, ack: DeliveryAck) -> None:
        await holder[0].on_ack(outlet, ack)

    outlet = LanePublisher(
        broker,
        ArrowBatchCodec(),
        "p1",
        lanes=LANES,
        max_changes_per_message=per_message,
        max_in_flight_batches=4,
        on_ack=on_ack,
        retry=retry or RetrySettings(max_attempts=3, initial_wait_seconds=0.01, jitter=False),
    )
    service = IngestService(
        "p1", source, Router([RoutingRule(outlet.name)]), {outlet.name: outlet}, batch_max_events=5
    )
    holder.append(service)
    return service, source, outlet


async def until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def transactions(count: int, per_tx: int = 4) -> list[SourceChunk]:
    out = []
    for tx in range(count):
        lsn = 100 + tx
        out.append(
            SourceChunk("slot", [change(lsn, tx * per_tx + i, i) for i in range(per_tx)], lsn)
        )
    return out


def test_lsn_released_only_after_the_broker_acknowledged() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        broker.hold()
        service, source, _ = pipeline(transactions(3), broker)
        runner = asyncio.create_task(service.run())
        await asyncio.sleep(0.3)
        assert source.commits == []  # read and sent, not acknowledged by the broker
        broker.release()
        await until(lambda: source.committed.get("slot") == 102)
        service.request_stop()
        await runner
        assert broker.closed

    asyncio.run(scenario())


def test_changes_spread_over_lanes_by_key_in_order_with_positions() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        chunks = transactions(10)
        service, source, outlet = pipeline(chunks, broker)
        runner = asyncio.create_task(service.run())
        await until(lambda: source.committed.get("slot") == 109)
        service.request_stop()
        await runner
        every = [ev for c in chunks for ev in c.events]
        assert len(broker.published) > 1  # spread, not one lane
        for index in range(LANES):
            lane = lane_name(index)
            expected = [ev for ev in every if lane_index(ev, LANES) == index]
            got = broker.events(lane)
            assert [(e.key, e.position) for e in got] == [(e.key, e.position) for e in expected]
            assert all(m.events <= 3 for m in broker.published.get(lane, []))
            for m in broker.published.get(lane, []):
                assert m.attributes["cdc_lane"] == lane
                assert all(len(v.encode()) <= 1024 for v in m.attributes.values())
        assert outlet.health().detail["messages_published"] == sum(
            len(v) for v in broker.published.values()
        )

    asyncio.run(scenario())


def test_a_failed_publish_is_resumed_and_retried_in_order() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        broker.failures_left = 1
        chunks = transactions(6)
        service, source, _ = pipeline(chunks, broker)
        runner = asyncio.create_task(service.run())
        await until(lambda: source.committed.get("slot") == 105)
        service.request_stop()
        await runner
        assert broker.resumed  # resume_publish before the retry
        every = [ev for c in chunks for ev in c.events]
        for index in range(LANES):
            expected = [ev.position for ev in every if lane_index(ev, LANES) == index]
            got = [ev.position for ev in broker.events(lane_name(index))]
            assert got == expected  # nothing lost, nothing out of order

    asyncio.run(scenario())


def test_a_publisher_that_gives_up_never_releases_the_failed_data() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        service, source, outlet = pipeline(transactions(2), broker)
        runner = asyncio.create_task(service.run())
        await until(lambda: source.committed.get("slot") == 101)
        broker.failures_left = 10**6
        source.append(SourceChunk("slot", [change(200, k) for k in range(4)], 200))
        source.append(SourceChunk("slot", [change(201, k) for k in range(4)], 201))
        # `cdc capture` watches the outlet's health and stops the pump (services/capture/main)
        await until(lambda: outlet.health().status.value == "error")
        service.request_stop()
        await asyncio.wait_for(runner, 10)
        assert source.committed["slot"] == 101
        assert service.unacked_at_stop == 2
        with pytest.raises(PublishFailedError):  # and nothing more is taken
            await outlet.send(OutboundBatch(1, "p1", ("slot",), [change(300, 1)]))

    asyncio.run(scenario())


def test_a_change_over_the_message_limit_is_refused_not_dropped() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        broker.max_message_bytes = 2100  # one change fits (~1.9 kB of Arrow), four do not
        chunks = [SourceChunk("slot", [change(100, 1, i) for i in range(4)], 100)]
        service, source, _ = pipeline(chunks, broker, per_message=10)
        runner = asyncio.create_task(service.run())
        await until(lambda: source.committed.get("slot") == 100)
        service.request_stop()
        await runner
        # all of one key: one lane, split into several messages, in order
        lane = lane_name(lane_index(chunks[0].events[0], LANES))
        assert len(broker.published[lane]) > 1
        assert [e.position for e in broker.events(lane)] == [Position(100, i) for i in range(4)]

    asyncio.run(scenario())


def test_a_message_that_is_not_a_batch_is_a_payload_error() -> None:
    codec = ArrowBatchCodec()
    with pytest.raises(PayloadError):
        codec.decode(b"\xff\x00 not protobuf")
    data = codec.encode("p1", "k0", [change(5, 1)])
    assert [e.position for e in codec.decode(data)] == [Position(5, 0)]


def test_decoded_messages_share_their_table_shape() -> None:
    """So that the ingest builds one block per table for a chunk of many messages."""
    from domain.blocks import build_blocks

    codec = ArrowBatchCodec()
    events = [
        ev
        for lsn in range(5)
        for ev in codec.decode(codec.encode("p1", "k0", [change(100 + lsn, lsn)]))
    ]
    assert len({id(ev.table) for ev in events}) == 1
    assert len(build_blocks(events)) == 1


def test_a_batch_of_change_blocks_is_refused_not_acked_as_published() -> None:
    """The publisher is fed by the WAL reader (events); a batch of blocks has no events, and
    acking it as published would lose its changes."""
    table = TableSchema("s", "t", (Column("id", 0, "bigint", True, "int64"),))
    blocks = block_chunk("a", [Change(table, Operation.CREATE, Position(1), (1,))], 1).blocks
    acks: list[DeliveryAck] = []

    async def on_ack(outlet: str, ack: DeliveryAck) -> None:
        acks.append(ack)

    async def scenario() -> None:
        outlet = LanePublisher(
            MemoryBroker(),
            ArrowBatchCodec(),
            "p1",
            lanes=LANES,
            max_changes_per_message=3,
            max_in_flight_batches=4,
            on_ack=on_ack,
        )
        with pytest.raises(ValueError, match="carries change blocks"):
            await outlet.send(OutboundBatch(1, "p1", ("a",), [], blocks=blocks))

    asyncio.run(scenario())
    assert acks == []
