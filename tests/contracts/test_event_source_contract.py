"""The contract every event source passes, parametrized by factory: the PostgreSQL WAL
reader (a real slot) and the shared fake log source (tests/support/fakes.py). A new
transport adds its factory here (docs/adding-adapters.md).

- order per lane: a lane's changes come in the order they were made, positions increasing;
- ack semantics: what was acked is not delivered again after a restart;
- redelivery after a crash: what was not acked is, with the same positions (which is what
  lets sinks skip replays);
- revocation: a revoked lane is announced, nothing of it follows, and it is never acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from adapters.postgres.source.reader import PostgresWalSource, WalReaderSettings
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import EventSource, SourceChunk
from tests.support.fakes import FakeLog, LogSource
from tests.support.postgres import PgTestContext

TIMEOUT = 20.0


@dataclass
class Harness:
    """`produce(keys)` commits one transaction inserting rows with those keys on `lane`;
    `open()` starts a new reader (a restart)."""

    produce: Callable[[list[int], str], None]
    open: Callable[[], EventSource]
    lanes: tuple[str, ...]
    revocable: bool
    opened: list[EventSource] = field(default_factory=list)


@dataclass
class Read:
    events: list[tuple[str, SourceEvent]]
    handles: dict[str, list[Any]]
    revoked: set[str]


async def read(source: EventSource, count: int) -> Read:
    """Read chunks until `count` events came (or the source ended)."""
    out = Read([], {}, set())
    chunks: AsyncIterator[SourceChunk] = source.chunks()
    try:
        while len(out.events) < count:
            try:
                chunk = await asyncio.wait_for(anext(chunks), TIMEOUT)
            except StopAsyncIteration:
                break
            out.revoked |= chunk.revoked
            out.events += [(chunk.lane, ev) for ev in chunk.events]
            if chunk.ack is not None:
                out.handles.setdefault(chunk.lane, []).append(chunk.ack)
    finally:
        with contextlib.suppress(Exception):
            await chunks.aclose()  # type: ignore[attr-defined]
    return out


def _key(event: SourceEvent) -> int:
    assert event.after is not None
    return int(event.after[0] or 0)


def _wal(pg: PgTestContext) -> Iterator[Harness]:
    db = pg.new_database("contract_src")
    conn = pg.connect(db)
    conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, name text)")
    settings = WalReaderSettings(
        conninfo=pg.dsn(db),
        database=db,
        tables=("public.items",),
        slot_name=f"contract_{uuid.uuid4().hex[:10]}",
        publication_name="contract_pub",
        snapshot_mode="never",
        heartbeat_mode="none",
    )

    def produce(keys: list[int], lane: str) -> None:
        with conn.transaction():
            for k in keys:
                conn.execute("INSERT INTO items VALUES (%s, %s)", (k, f"n{k}"))

    harness = Harness(produce, lambda: PostgresWalSource(settings), (settings.slot_name,), False)
    yield harness


ITEMS = TableSchema("public", "items", (Column("id", 20, "bigint", True), Column("n", 25, "text")))


def _fake() -> Iterator[Harness]:
    log = FakeLog()
    lanes = ("p0", "p1")
    for lane in lanes:
        log.lanes[lane] = []
    counter = iter(range(1, 1_000_000))

    def produce(keys: list[int], lane: str) -> None:
        major = next(counter)
        for i, k in enumerate(keys):
            event = SourceEvent(
                Operation.CREATE, ITEMS, Position(major, i), after=(str(k), f"n{k}")
            )
            log.append(lane, event)

    yield Harness(produce, lambda: LogSource(log, chunk_events=3), lanes, True)


def _pubsub(emulator: Any) -> Iterator[Harness]:
    """A subscription of its own on the Pub/Sub emulator; a lane is an ordering key, a
    transaction one message (the capture stage's payload), acked per message."""
    import os

    from adapters.pubsub.naming import PipelineNames
    from adapters.pubsub.provisioner import PubSubProvisioner, SubscriptionSettings
    from adapters.pubsub.source import PubSubEventSource, SourceSettings
    from services.capture.payload import ArrowBatchCodec

    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host_port
    from google.cloud import pubsub_v1

    names = PipelineNames.of("contract", "cdc", f"c{uuid.uuid4().hex[:10]}", "dlq")
    provisioner = PubSubProvisioner(
        names, SubscriptionSettings(ordered=True, ack_deadline_seconds=10)
    )
    asyncio.run(provisioner.provision())
    publisher = pubsub_v1.PublisherClient(
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    )
    codec = ArrowBatchCodec()
    counter = iter(range(1, 1_000_000))

    def produce(keys: list[int], lane: str) -> None:
        major = next(counter)
        events = [
            SourceEvent(Operation.CREATE, ITEMS, Position(major, i), after=(str(k), f"n{k}"))
            for i, k in enumerate(keys)
        ]
        data = codec.encode("contract", lane, events)
        publisher.publish(names.topic_path, data, ordering_key=lane, cdc_lane=lane).result(10)

    def open_source() -> EventSource:
        return PubSubEventSource(
            SourceSettings(names.subscription_path, names.dlq_topic_path), codec
        )

    try:
        yield Harness(produce, open_source, ("k0", "k1"), False)
    finally:
        publisher.stop()
        provisioner.teardown_report()


@pytest.fixture(params=["wal", "fake", "pubsub"])
def transport(request: pytest.FixtureRequest) -> Iterator[Harness]:
    if request.param == "wal":
        yield from _wal(request.getfixturevalue("pg"))
    elif request.param == "pubsub":
        yield from _pubsub(request.getfixturevalue("pubsub_emulator"))
    else:
        yield from _fake()


async def _started(harness: Harness) -> EventSource:
    source = harness.open()
    await source.start()
    harness.opened.append(source)
    return source


def test_order_per_lane(transport: Harness) -> None:
    async def scenario() -> None:
        source = await _started(transport)  # a slot starts where it is created
        try:
            for tx in range(3):
                for n, lane in enumerate(transport.lanes):
                    transport.produce([100 * n + 10 * tx + i for i in range(3)], lane)
            got = await read(source, 9 * len(transport.lanes))
        finally:
            await source.stop()
        for n, lane in enumerate(transport.lanes):
            events = [ev for ln, ev in got.events if ln == lane]
            assert [_key(ev) for ev in events] == [
                100 * n + 10 * tx + i for tx in range(3) for i in range(3)
            ]
            positions = [ev.position for ev in events]
            assert positions == sorted(positions) and len(set(positions)) == len(positions)

    asyncio.run(scenario())


def test_acked_changes_are_not_delivered_again_and_unacked_ones_are(transport: Harness) -> None:
    """Ack semantics and redelivery after a crash: the reader stops with a transaction read
    but not acked; a new reader delivers exactly that one again, at the same positions."""
    lane = transport.lanes[0]

    async def scenario() -> None:
        source = await _started(transport)
        try:
            transport.produce([1, 2, 3], lane)
            first = await read(source, 3)
            await source.ack(lane, first.handles[lane])  # every handle, in order
            transport.produce([4, 5, 6], lane)
            second = await read(source, 3)
            assert [_key(ev) for _, ev in second.events] == [4, 5, 6]
        finally:
            await source.stop()  # without acking the second transaction: a crash
        again = await _started(transport)
        try:
            replay = await read(again, 3)
        finally:
            await again.stop()
        assert [_key(ev) for _, ev in replay.events] == [4, 5, 6]
        assert [ev.position for _, ev in replay.events] == [
            ev.position for _, ev in second.events
        ]

    asyncio.run(scenario())


def test_nothing_acked_means_everything_is_delivered_again(transport: Harness) -> None:
    lane = transport.lanes[0]

    async def scenario() -> None:
        source = await _started(transport)
        try:
            transport.produce([1, 2], lane)
            transport.produce([3], lane)
            first = await read(source, 3)
        finally:
            await source.stop()
        again = await _started(transport)
        try:
            replay = await read(again, 3)
        finally:
            await again.stop()
        assert [(_key(e), e.position) for _, e in replay.events] == [
            (_key(e), e.position) for _, e in first.events
        ]

    asyncio.run(scenario())


def test_a_revoked_lane_is_announced_and_nothing_of_it_follows(transport: Harness) -> None:
    if not transport.revocable:
        pytest.skip("a replication slot is one lane its reader owns alone: never revoked")

    async def scenario() -> None:
        source = await _started(transport)
        assert isinstance(source, LogSource)
        kept, lost = transport.lanes
        transport.produce([1, 2, 3, 4, 5, 6], kept)
        transport.produce([7, 8, 9, 10, 11, 12], lost)
        chunks = source.chunks()
        seen: list[tuple[str, int]] = []
        revoked: set[str] = set()
        async for chunk in chunks:
            revoked |= chunk.revoked
            seen += [(chunk.lane, _key(ev)) for ev in chunk.events]
            if len(seen) == 3:  # after the first chunk (of the kept lane)
                source.revoke([lost])
        assert seen[:3] == [(kept, 1), (kept, 2), (kept, 3)]
        assert revoked == {lost}
        after = seen[3:]
        assert all(lane == kept for lane, _ in after)
        assert [k for lane, k in seen if lane == kept] == [1, 2, 3, 4, 5, 6]
        with pytest.raises(AssertionError):
            await source.ack(lost, [3])

    asyncio.run(scenario())
