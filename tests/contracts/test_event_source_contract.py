"""The contract every event source passes, parametrized by factory: the PostgreSQL WAL
reader (a real slot) and the shared fake log source (tests/support/fakes.py). A new
transport adds its factory here (docs/adding-adapters.md).

- order per lane: a lane's changes come in the order they were made, positions increasing;
- ack semantics: what was acked is not delivered again after a restart;
- redelivery after a crash: what was not acked is, with the same positions (which is what
  lets sinks skip replays);
- revocation: a revoked lane is announced, nothing of it follows, and it is never acked.

The Kafka harness runs the consumer (adapters/kafka/consumer.py) against a real broker
(Tansu) and the schema registry of services/stack, with Debezium-shaped Avro messages; its
revocation is a second member joining the consumer group.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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
    `open()` starts a new reader (a restart). `revoke(source, lanes)` makes the transport
    take lanes away from `source` (it may choose others: the announcement says which);
    `check_ack_ignored(source, lane)` acks a revoked lane and checks that nothing came of it.
    `live`: the reader keeps waiting for new changes (else it ends when it read all)."""

    produce: Callable[[list[int], str], None]
    open: Callable[[], EventSource]
    lanes: tuple[str, ...]
    revoke: Callable[[EventSource, list[str]], None] | None = None
    check_ack_ignored: Callable[[EventSource, str], Awaitable[None]] | None = None
    live: bool = True
    opened: list[EventSource] = field(default_factory=list)
    # Why `revoke` is None: the transport has no lanes that can be taken from a reader.
    no_revocation: str = "a replication slot is one lane its reader owns alone: never revoked"


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
            events = chunk.row_view()
            out.events += [(chunk.lane, ev) for ev in events]
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

    harness = Harness(produce, lambda: PostgresWalSource(settings), (settings.slot_name,))
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

    def revoke(source: EventSource, lost: list[str]) -> None:
        assert isinstance(source, LogSource)
        source.revoke(lost)

    async def check_ack_ignored(source: EventSource, lane: str) -> None:
        with pytest.raises(AssertionError):  # the fake refuses it outright
            await source.ack(lane, [3])

    yield Harness(
        produce,
        lambda: LogSource(log, chunk_events=3),
        lanes,
        revoke,
        check_ack_ignored,
        live=False,
    )


def _kafka(broker: Any, registry_server: Any) -> Iterator[Harness]:
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    from adapters.kafka.avro import SchemaRegistry
    from adapters.kafka.consumer import KafkaEventSource, KafkaSourceSettings, lane_of
    from tests.support.debezium_avro import Writer, change, items_schemas

    bootstrap = broker.bootstrap_servers
    topic = f"cdc.public.items_{uuid.uuid4().hex[:8]}"
    group = f"contract-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, 2, 1)]).values():
        future.result(15)
    registry = SchemaRegistry(registry_server.url)
    key_schema, value_schema = items_schemas(topic)
    write_key = Writer(key_schema, registry.register(f"{topic}-key", key_schema))
    write_value = Writer(value_schema, registry.register(f"{topic}-value", value_schema))
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    lanes = (lane_of(topic, 0), lane_of(topic, 1))
    client = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
    }
    settings = KafkaSourceSettings(
        consumer=client,
        topics={topic: "public.items"},
        registry_url=registry_server.url,
        poll_timeout_seconds=0.2,
    )
    takers: list[Any] = []

    def produce(keys: list[int], lane: str) -> None:
        partition = lanes.index(lane)
        for k in keys:
            row = {"id": k, "name": f"n{k}"}
            producer.produce(
                topic,
                key=write_key({"id": k}),
                value=write_value(change("c", None, row, table="items")),
                partition=partition,
            )
        assert producer.flush(15) == 0

    def revoke(source: EventSource, lost: list[str]) -> None:
        """A second member joins the group; it polls on a thread of its own until the
        cooperative rebalance gave it a partition (the test's reader keeps polling)."""
        import threading

        taker = Consumer(dict(client))
        taker.subscribe([topic])
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                taker.poll(0.2)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        takers.append((taker, stop, thread))

    async def check_ack_ignored(source: EventSource, lane: str) -> None:
        partition = lanes.index(lane)
        await source.ack(lane, [10_000])
        probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        try:
            (committed,) = probe.committed([TopicPartition(topic, partition)], timeout=10)
        finally:
            probe.close()
        assert committed.offset != 10_000

    yield Harness(produce, lambda: KafkaEventSource(settings), lanes, revoke, check_ack_ignored)
    for taker, stop, thread in takers:
        stop.set()
        thread.join(5)
        taker.close()


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
        yield Harness(
            produce,
            open_source,
            ("k0", "k1"),
            no_revocation="Pub/Sub has no lane ownership to revoke: each message is acked on its"
            " own by whichever subscriber pulled it",
        )
    finally:
        publisher.stop()
        provisioner.teardown_report()


@pytest.fixture(params=["wal", "fake", "pubsub", "kafka"])
def transport(request: pytest.FixtureRequest) -> Iterator[Harness]:
    if request.param == "wal":
        yield from _wal(request.getfixturevalue("pg"))
    elif request.param == "pubsub":
        yield from _pubsub(request.getfixturevalue("pubsub_emulator"))
    elif request.param == "kafka":
        yield from _kafka(
            request.getfixturevalue("tansu_broker"), request.getfixturevalue("schema_registry")
        )
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
        assert [ev.position for _, ev in replay.events] == [ev.position for _, ev in second.events]

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
    if transport.revoke is None:
        pytest.skip(transport.no_revocation)
    revoke = transport.revoke
    assert transport.check_ack_ignored is not None

    async def scenario() -> None:
        source = await _started(transport)
        first, second = transport.lanes
        transport.produce([1, 2, 3, 4, 5, 6], first)
        transport.produce([7, 8, 9, 10, 11, 12], second)
        produced = {first: [1, 2, 3, 4, 5, 6], second: [7, 8, 9, 10, 11, 12]}
        chunks = source.chunks()
        seen: list[tuple[str, int]] = []
        revoked: set[str] = set()
        announced_at: int | None = None
        requested = extra = False
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(chunks), TIMEOUT)
                except StopAsyncIteration:
                    break
                if chunk.revoked and announced_at is None:
                    announced_at = len(seen)
                revoked |= chunk.revoked
                events = chunk.row_view()
                seen += [(chunk.lane, _key(ev)) for ev in events]
                if len(seen) >= 3 and not requested:
                    revoke(source, [second])
                    requested = True
                if not transport.live:
                    continue
                if announced_at is not None and not extra:
                    # Changes made after the revocation: only the kept lanes' may follow.
                    for n, lane in enumerate(transport.lanes):
                        keys = [100 + 10 * n + i for i in range(3)]
                        transport.produce(keys, lane)
                        produced[lane] += keys
                    extra = True
                kept = [lane for lane in transport.lanes if lane not in revoked]
                if extra and all(
                    [k for ln, k in seen if ln == lane] == produced[lane] for lane in kept
                ):
                    break
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]
        assert announced_at is not None, "no revocation was announced"
        assert revoked and revoked < set(transport.lanes)
        assert all(lane not in revoked for lane, _ in seen[announced_at:])
        for lane in transport.lanes:
            if lane not in revoked:
                assert [k for ln, k in seen if ln == lane] == produced[lane]
        for lane in revoked:
            assert transport.check_ack_ignored is not None
            await transport.check_ack_ignored(source, lane)
        await source.stop()

    asyncio.run(scenario())
