"""The Kafka event source against a real broker (Tansu) and the schema registry of
services/stack, with Debezium-shaped Avro messages: dead letters, lag, schema stops,
tombstones, commits."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from adapters.kafka.avro import SchemaRegistry
from adapters.kafka.consumer import KafkaEventSource, KafkaSourceSettings, lane_of
from adapters.kafka.dead_letters import DeadLetterProducer
from adapters.kafka.monitor import KafkaSourceMonitor
from domain.blocks import ENCODING_ARROW, IMAGE_AFTER, IMAGE_BEFORE
from domain.health import Status
from domain.ports import SourceChunk
from tests.support.debezium_avro import (
    ITEMS_KEY_FIELDS,
    Writer,
    change,
    envelope,
    field,
    items_schemas,
    key_schema,
)

pytestmark = pytest.mark.integration
TIMEOUT = 30.0


@dataclass
class Topic:
    name: str
    bootstrap: str
    registry_url: str
    key: Writer
    value: Writer
    producer: Producer

    def send(
        self,
        op: str,
        key: int | None,
        row: dict[str, Any] | None,
        partition: int = 0,
        before: dict[str, Any] | None = None,
    ) -> None:
        self.producer.produce(
            self.name,
            key=None if key is None else self.key({"id": key}),
            value=None if op == "tombstone" else self.value(change(op, before, row)),
            partition=partition,
        )
        assert self.producer.flush(10) == 0

    def send_raw(self, value: bytes, partition: int = 0) -> None:
        self.producer.produce(self.name, value=value, partition=partition)
        assert self.producer.flush(10) == 0

    def client(self, group: str) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        }

    def settings(self, group: str, **kw: Any) -> KafkaSourceSettings:
        return KafkaSourceSettings(
            consumer=self.client(group),
            topics={self.name: "public.items"},
            registry_url=self.registry_url,
            source_database="shop",
            poll_timeout_seconds=0.2,
            **kw,
        )

    def committed(self, group: str, partition: int = 0) -> int:
        probe = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group})
        try:
            (tp,) = probe.committed([TopicPartition(self.name, partition)], timeout=10)
        finally:
            probe.close()
        return int(tp.offset)


@pytest.fixture
def topic(tansu_broker: Any, schema_registry: Any) -> Iterator[Topic]:
    name = f"cdc.public.items_{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": tansu_broker.bootstrap_servers})
    for future in admin.create_topics([NewTopic(name, 1, 1)]).values():
        future.result(15)
    registry = SchemaRegistry(schema_registry.url)
    key, value = items_schemas(name)
    producer = Producer({"bootstrap.servers": tansu_broker.bootstrap_servers})
    yield Topic(
        name,
        tansu_broker.bootstrap_servers,
        schema_registry.url,
        Writer(key, registry.register(f"{name}-key", key)),
        Writer(value, registry.register(f"{name}-value", value)),
        producer,
    )


def dead_letters(bootstrap: str, topic: str, **kw: Any) -> Any:
    return lambda: DeadLetterProducer({"bootstrap.servers": bootstrap}, "dlq", **kw)


async def read_chunks(source: KafkaEventSource, events: int) -> list[SourceChunk]:
    out: list[SourceChunk] = []
    chunks = source.chunks()
    seen = 0
    while seen < events:
        chunk = await asyncio.wait_for(anext(chunks), TIMEOUT)
        out.append(chunk)
        seen += len(chunk)
    await chunks.aclose()  # type: ignore[attr-defined]
    return out


def rows(chunks: list[SourceChunk]) -> list[dict[str, Any]]:
    """The changes of `chunks` as rows of their typed blocks, in change order."""
    out: list[dict[str, Any]] = []
    for chunk in chunks:
        assert chunk.events == [] and chunk.blocks is not None
        got = [r for b in chunk.blocks for r in b.records.to_pylist()]
        assert sorted(r["@index"] for r in got) == list(range(len(got)))
        out += sorted(got, key=lambda r: r["@index"])
    return out


def ids(chunks: list[SourceChunk]) -> list[int]:
    """The key of each change with a new row (an insert's or update's)."""
    return [r["id"] for r in rows(chunks) if r["@image"] & IMAGE_AFTER]


async def _committed_by(source: KafkaEventSource, lane: str, offset: int) -> None:
    """Commits follow acks asynchronously: wait until the source committed `offset`."""
    deadline = time.monotonic() + 10
    while source.lag().get(lane, {}).get("committed") != offset:
        assert time.monotonic() < deadline, source.lag()
        await asyncio.sleep(0.05)


def read_topic(bootstrap: str, topic: str, count: int) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"probe-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    got: list[Any] = []
    deadline = time.monotonic() + TIMEOUT
    try:
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append(msg)
    finally:
        consumer.close()
    return got


def test_a_poison_message_goes_to_the_dead_letter_topic_with_its_headers(topic: Topic) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    for k in (1, 2, 3):
        topic.send("c", k, {"id": k, "name": f"n{k}"})
    topic.send_raw(b"\x00\x00\x00\x00\x63not avro at all")  # offset 3: unknown schema id 99
    topic.send("tombstone", 3, None)  # offset 4: skipped
    topic.send("c", 5, {"id": 5, "name": "n5"})

    async def scenario() -> list[SourceChunk]:
        source = KafkaEventSource(
            topic.settings(group, dead_letters=dead_letters(topic.bootstrap, topic.name))
        )
        await source.start()
        try:
            chunks = await read_chunks(source, 4)
            lane = lane_of(topic.name, 0)
            await source.ack(lane, [c.ack for c in chunks if c.ack is not None])
            assert source.dead_lettered == 1
            return chunks
        finally:
            await source.stop()

    chunks = asyncio.run(scenario())
    assert ids(chunks) == [1, 2, 3, 5]
    assert [r["@position"] for r in rows(chunks)] == [0, 1, 2, 5]
    assert chunks[-1].ack == 6
    assert topic.committed(group) == 6  # past the poison, which is in the DLQ now
    (letter,) = read_topic(topic.bootstrap, f"{topic.name}.dlq", 1)
    headers = {k: v.decode() for k, v in letter.headers()}
    assert letter.value() == b"\x00\x00\x00\x00\x63not avro at all"
    assert headers["cdc.source.topic"] == topic.name
    assert headers["cdc.source.partition"] == "0"
    assert headers["cdc.source.offset"] == "3"
    assert headers["cdc.error.class"] == "SchemaNotFoundError"
    assert "schema id 99" in headers["cdc.error.message"]
    assert headers["cdc.sink.id"] == ""
    assert headers["cdc.time"].endswith("Z")


def test_a_failed_dead_letter_write_holds_the_partition_and_its_commit_back(
    topic: Topic, tmp_path: Path
) -> None:
    """The dead-letter producer talks to a second broker that is down: the poison message's
    chunk is not handed out (so nothing past it can be committed) and health says so; once
    that broker is up the write succeeds and the partition moves on."""
    from services.net import find_free_port
    from services.stack import tansu

    port = find_free_port()
    group = f"g-{uuid.uuid4().hex[:8]}"
    topic.send("c", 1, {"id": 1, "name": "n1"})
    topic.send_raw(b"garbage")
    topic.send("c", 2, {"id": 2, "name": "n2"})

    async def scenario() -> None:
        dead = dead_letters(
            f"127.0.0.1:{port}",
            topic.name,
            initial_wait=0.2,
            max_wait=0.5,
            delivery_timeout=1.0,
            error_after=1,
        )
        source = KafkaEventSource(topic.settings(group, dead_letters=dead))
        await source.start()
        broker = None
        try:
            chunks = source.chunks()
            pending = asyncio.ensure_future(anext(chunks))
            await asyncio.sleep(8)
            assert not pending.done(), "a chunk came out while its poison was not dead-lettered"
            health = await source.health()
            assert health.status is Status.ERROR
            assert "dead-letter write failing" in health.detail["error"]
            assert topic.committed(group) < 0  # nothing committed
            broker = tansu.start(tmp_path / "dlq-broker", port=port)
            chunk = await asyncio.wait_for(pending, TIMEOUT)
            assert ids([chunk]) == [1, 2]
            assert chunk.ack == 3
            await source.ack(chunk.lane, [chunk.ack])
            await _committed_by(source, chunk.lane, 3)
            assert topic.committed(group) == 3
            assert (await source.health()).status is Status.OK
            await chunks.aclose()  # type: ignore[attr-defined]
            (letter,) = read_topic(f"127.0.0.1:{port}", f"{topic.name}.dlq", 1)
            assert dict(letter.headers())["cdc.source.offset"] == b"1"
        finally:
            await source.stop()
            if broker is not None:
                broker.stop()

    asyncio.run(scenario())


def test_lag_per_partition_from_fetched_high_watermarks(topic: Topic) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    for k in range(10):
        topic.send("c", k, {"id": k, "name": f"n{k}"})

    async def scenario() -> None:
        source = KafkaEventSource(topic.settings(group))
        monitor = KafkaSourceMonitor(
            source, {topic.name: "public.items"}, topic.registry_url, interval_seconds=60
        )
        await source.start()
        try:
            chunks = await read_chunks(source, 10)
            lane = lane_of(topic.name, 0)
            first = rows(chunks)[3]["@position"] + 1
            await source.ack(lane, [first])
            await _committed_by(source, lane, first)
            lag = await monitor.lag()
            assert lag["partitions"][lane] == {"high_watermark": 10, "committed": 4, "lag": 6}
            assert lag["total_lag"] == 6
            await source.ack(lane, [10])
            await _committed_by(source, lane, 10)
            assert (await monitor.lag())["total_lag"] == 0
            await monitor.poll()
            health = await monitor.health()
            assert health.status is Status.OK
            assert health.detail["schema_versions"] == {f"{topic.name}-value": 1}
        finally:
            await monitor.stop()
            await source.stop()

    asyncio.run(scenario())


def test_an_incompatible_schema_stops_the_source_before_its_first_message(topic: Topic) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    registry = SchemaRegistry(topic.registry_url)
    # The same table without its name column (a dropped column): registered under a subject
    # of its own, as a writer with another compatibility rule would have it.
    narrow = envelope(topic.name, [{"name": "id", "type": "long"}], "postgresql")
    narrow_id = registry.register(f"{topic.name}-narrow", narrow)
    key_id = registry.register(f"{topic.name}-key", key_schema(topic.name, ITEMS_KEY_FIELDS))
    write_narrow = Writer(narrow, narrow_id)
    write_key = Writer(key_schema(topic.name, ITEMS_KEY_FIELDS), key_id)
    topic.send("c", 1, {"id": 1, "name": "n1"})
    topic.send("c", 2, {"id": 2, "name": "n2"})
    topic.producer.produce(
        topic.name,
        key=write_key({"id": 3}),
        value=write_narrow(change("c", None, {"id": 3})),
        partition=0,
    )
    topic.producer.flush(10)
    topic.send("c", 4, {"id": 4, "name": "n4"})

    async def scenario() -> None:
        source = KafkaEventSource(topic.settings(group, stop_on_incompatible_schema=True))
        await source.start()
        try:
            got: list[SourceChunk] = []
            async for chunk in source.chunks():  # ends by itself at the incompatible message
                got.append(chunk)
            assert ids(got) == [1, 2]
            handles = [c.ack for c in got if c.ack is not None]
            assert max(handles) == 2  # the incompatible message (offset 2) is not released
            await source.ack(got[-1].lane, handles)
            health = await source.health()
            assert (
                health.status is Status.ERROR and "columns dropped: name" in health.detail["error"]
            )
        finally:
            await source.stop()
        assert topic.committed(group) == 2

    asyncio.run(scenario())


def test_an_added_column_is_followed_and_announced(topic: Topic) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    registry = SchemaRegistry(topic.registry_url)
    wide = envelope(
        topic.name,
        [
            {"name": "id", "type": {"type": "long", "connect.default": 0}},
            field("name", "string"),
            field("color", "string"),
        ],
        "postgresql",
    )
    write_wide = Writer(wide, registry.register(f"{topic.name}-value", wide))
    topic.send("c", 1, {"id": 1, "name": "n1"})
    topic.producer.produce(
        topic.name,
        key=topic.key({"id": 2}),
        value=write_wide(change("c", None, {"id": 2, "name": "n2", "color": "red"})),
        partition=0,
    )
    topic.producer.flush(10)

    async def scenario() -> None:
        source = KafkaEventSource(topic.settings(group, stop_on_incompatible_schema=True))
        await source.start()
        try:
            chunks = await read_chunks(source, 2)
        finally:
            await source.stop()
        changes = [ch for c in chunks for ch in c.schema_changes]
        assert [ch.added for ch in changes] == [(), ("color",)]
        second = rows(chunks)[1]
        assert (second["id"], second["name"], second["color"]) == (2, "n2", "red")

    asyncio.run(scenario())


def test_dead_letter_topics_are_never_read_as_data(topic: Topic) -> None:
    """Whatever the suffix, the consumer subscribes to the data topics by name (never a
    pattern), so a dead-letter topic full of messages is not read."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    dlq = Producer({"bootstrap.servers": topic.bootstrap})
    dlq.produce(f"{topic.name}.dlq", value=topic.value(change("c", None, {"id": 99, "name": "x"})))
    dlq.flush(10)
    topic.send("c", 1, {"id": 1, "name": "n1"})

    async def scenario() -> None:
        source = KafkaEventSource(topic.settings(group))
        await source.start()
        try:
            chunks = await read_chunks(source, 1)
            await asyncio.sleep(1)
            chunks += (await source._call(source._fetch)).chunks
        finally:
            await source.stop()
        assert ids(chunks) == [1]

    asyncio.run(scenario())


def test_periodic_commits_and_the_final_commit_on_stop(topic: Topic) -> None:
    """commit_interval_seconds > 0: an ack is not committed at once but by the next periodic
    commit; stop() commits what was acked before it closes the consumer."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    for k in range(6):
        topic.send("c", k, {"id": k, "name": f"n{k}"})
    lane = lane_of(topic.name, 0)

    async def scenario() -> None:
        source = KafkaEventSource(topic.settings(group, commit_interval_seconds=60.0))
        await source.start()
        try:
            chunks = await read_chunks(source, 6)
            await source.ack(lane, [rows(chunks)[2]["@position"] + 1])
            await asyncio.sleep(1)
            assert topic.committed(group) < 0  # the next periodic commit is a minute away
        finally:
            await source.stop()
        assert topic.committed(group) == 3  # the final commit, before the consumer closed
        source = KafkaEventSource(topic.settings(group, commit_interval_seconds=0.5))
        await source.start()
        try:
            chunks = await read_chunks(source, 3)  # from the committed offset on
            assert [r["@position"] for r in rows(chunks)] == [3, 4, 5]
            await source.ack(lane, [6])
            deadline = time.monotonic() + 10
            while topic.committed(group) != 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert topic.committed(group) == 6  # by a periodic commit: no stop yet
        finally:
            await source.stop()

    asyncio.run(scenario())


def test_a_change_a_sink_rejects_goes_to_the_dead_letter_topic_with_the_sink_id(
    topic: Topic,
) -> None:
    """The kafka transport's ErrorRouter (what the webhook sink uses): the change as JSON on
    its data topic's DLQ topic, with the headers and the sink's id; raises (so the sink holds
    the offset back) when the broker does not confirm it."""
    import json

    from adapters.kafka.dead_letters import DeadLetterWriteError, KafkaErrorRouter
    from domain.events import Column, Operation, Position, SourceEvent, TableSchema
    from domain.ports import DeadLetter

    table = TableSchema(
        "public",
        "items",
        (Column("id", 0, "bigint", True, "int64"), Column("name", 0, "text", False, "string")),
    )
    event = SourceEvent(Operation.CREATE, table, Position(41, 0), after=("7", "seven"))
    letter = DeadLetter(
        event,
        "HTTP 422: unprocessable",
        "sink",
        sink_id="hook",
        lane=lane_of(topic.name, 0),
        error_class="HTTP 422",
    )
    router = KafkaErrorRouter({"bootstrap.servers": topic.bootstrap}, "dlq", "cdc")
    asyncio.run(router.dead_letter([letter]))
    asyncio.run(router.close())
    (stored,) = read_topic(topic.bootstrap, f"{topic.name}.dlq", 1)
    headers = {k: v.decode() for k, v in stored.headers()}
    assert headers["cdc.sink.id"] == "hook"
    assert headers["cdc.source.topic"] == topic.name
    assert headers["cdc.source.offset"] == "41"
    assert headers["cdc.error.class"] == "HTTP 422"
    body = json.loads(stored.value())
    assert body["after"] == {"id": "7", "name": "seven"} and body["key"] == {"id": "7"}

    from services.net import find_free_port

    down = KafkaErrorRouter(
        {"bootstrap.servers": f"127.0.0.1:{find_free_port()}"},
        "dlq",
        "cdc",
        delivery_timeout=1.0,
    )
    with pytest.raises(DeadLetterWriteError, match="dead-letter write failed"):
        asyncio.run(down.dead_letter([letter]))


def _typed_writer(topic: Topic) -> Writer:
    """The items table with a numeric(12,2) and a timestamp column, registered for `topic`."""
    price = {
        "type": "bytes",
        "scale": 2,
        "precision": 12,
        "connect.parameters": {"scale": "2", "connect.decimal.precision": "12"},
        "connect.name": "org.apache.kafka.connect.data.Decimal",
        "logicalType": "decimal",
    }
    at = {"type": "long", "connect.name": "io.debezium.time.MicroTimestamp"}
    row = [
        {"name": "id", "type": {"type": "long", "connect.default": 0}},
        field("name", "string"),
        field("price", price),
        field("at", at),
    ]
    schema = envelope(topic.name, row, "postgresql")
    return Writer(
        schema, SchemaRegistry(topic.registry_url).register(f"{topic.name}-value", schema)
    )


def test_a_chunk_carries_typed_arrow_blocks(topic: Topic) -> None:
    import datetime as dt
    from decimal import Decimal

    import pyarrow as pa

    group = f"g-{uuid.uuid4().hex[:8]}"
    write = _typed_writer(topic)
    old = {"id": 1, "name": "a", "price": Decimal("1.50"), "at": -1}
    new = {"id": 1, "name": "b", "price": Decimal("-2.25"), "at": 1_709_214_307_500_000}
    for op, before, after in (("c", None, old), ("u", old, new), ("d", new, None)):
        topic.producer.produce(
            topic.name, key=topic.key({"id": 1}), value=write(change(op, before, after))
        )
    topic.producer.flush(10)

    async def scenario() -> list[SourceChunk]:
        source = KafkaEventSource(topic.settings(group))
        await source.start()
        try:
            return await read_chunks(source, 3)
        finally:
            await source.stop()

    chunks = asyncio.run(scenario())
    (block,) = [b for c in chunks for b in c.blocks or []]
    assert block.encoding == ENCODING_ARROW
    types = {f.name: f.type for f in block.records.schema}
    assert types["id"] == pa.int64() and types["name"] == pa.string()
    assert types["price"] == pa.decimal128(12, 2) and types["at"] == pa.timestamp("us")
    got = rows(chunks)
    assert [r["@op"] for r in got] == ["c", "u", "d"]
    assert [r["@image"] for r in got] == [IMAGE_AFTER, IMAGE_AFTER | IMAGE_BEFORE, IMAGE_BEFORE]
    assert [r["price"] for r in got] == [Decimal("1.50"), Decimal("-2.25"), Decimal("-2.25")]
    assert got[0]["at"] == dt.datetime(1969, 12, 31, 23, 59, 59, 999_999)
    assert got[1]["@before"]["name"] == "a" and got[1]["@before"]["price"] == Decimal("1.50")
    assert [r["@xid"] for r in got] == [777] * 3


def test_a_value_its_column_cannot_hold_dead_letters_only_its_message(topic: Topic) -> None:
    """The decimal of the middle message does not fit numeric(12,2): found while the poll's
    block is built, that message goes to the dead-letter topic and the others are handed out."""
    from adapters.kafka.avro import _without_logical_types

    group = f"g-{uuid.uuid4().hex[:8]}"
    write = _typed_writer(topic)
    raw = Writer(_without_logical_types(write.schema), int.from_bytes(write.header[1:5], "big"))
    fine = {"id": 1, "name": "a", "price": (150).to_bytes(2, "big"), "at": 0}
    too_wide = {**fine, "id": 2, "price": (10**12).to_bytes(6, "big")}
    for row in (fine, too_wide, {**fine, "id": 3}):
        topic.producer.produce(
            topic.name, key=topic.key({"id": row["id"]}), value=raw(change("c", None, row))
        )
    topic.producer.flush(10)

    async def scenario() -> list[SourceChunk]:
        source = KafkaEventSource(
            topic.settings(group, dead_letters=dead_letters(topic.bootstrap, topic.name))
        )
        await source.start()
        try:
            chunks = await read_chunks(source, 2)
            assert source.dead_lettered == 1
            return chunks
        finally:
            await source.stop()

    chunks = asyncio.run(scenario())
    assert ids(chunks) == [1, 3]
    assert [r["@position"] for r in rows(chunks)] == [0, 2]
    assert chunks[-1].ack == 3
    (letter,) = read_topic(topic.bootstrap, f"{topic.name}.dlq", 1)
    headers = {k: v.decode() for k, v in letter.headers()}
    assert headers["cdc.source.offset"] == "1"
    assert headers["cdc.error.class"] == "EnvelopeError"
    assert "decimal(12,2)" in headers["cdc.error.message"]
