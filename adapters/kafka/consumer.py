"""The Kafka `EventSource`: Debezium topics read by a confluent-kafka consumer.

- **Lanes** are topic partitions (``<topic>:<partition>``); a change's position is its
  offset. One chunk per partition per poll, in offset order.
- **Ack handles** are the next offset to consume (last offset of the chunk + 1). `ack`
  records the newest released one; it is committed at once (`commit_interval_seconds` 0:
  acks arriving while a commit is in flight go with the next one) or by a periodic commit
  (> 0). Nothing is committed automatically by the client
  (`enable.auto.commit=false`): an offset is committed only once every targeted sink made
  its changes durable (or they were dead-lettered).
- **Polling**: `consume(poll_batch_size)` on one dedicated thread, which is the only
  thread that touches the consumer (commits included), so librdkafka's rebalance callbacks
  run between our calls and never race a commit. Decoding happens on that thread too (off
  the event loop).
- **Revocation**: librdkafka calls `on_revoke` inside a consume call. Fetched messages of
  those partitions are dropped, what was acked for them is committed there and then (the
  last moment this member may), and the next chunk names the lanes in `revoked`: the pump
  abandons their in-flight batches and acks of them are ignored from then on. A new owner
  (or this member, if the partition comes back) resumes from the committed offset.
- **Chunks of typed blocks**: each partition's messages of a poll are decoded one by one
  (fastavro), then built column by column into ``arrow``-encoded change blocks
  (adapters/debezium/block_builder.py): the chunk's `blocks`, its `events` stay empty.
- **Poison**: a message that does not decode, or holds a value its column's Arrow type
  cannot (found while building the blocks), goes to the dead-letter topic
  (adapters/kafka/dead_letters.py) before its chunk is handed out, without it, so its offset
  can be committed only after the dead-letter write succeeded; a failed write is retried and
  holds the partition (and its commit) back. Tombstones are skipped (their offset is
  released with the chunk).
- **Schema changes**: a table's new shape comes in the chunk's `schema_changes`. With
  `stop_on_incompatible_schema`, a change that drops or retypes a column or changes the key
  stops the source cleanly before that message: everything before it is handed out (and
  committed once durable), then `chunks()` ends and the ingest drains and exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, TopicPartition

from adapters.debezium.block_builder import build_blocks
from adapters.debezium.envelope import Change, EnvelopeError, table_of
from adapters.kafka.avro import Decoded, RegistryError, SchemaRegistry, TopicDecoder
from adapters.kafka.dead_letters import DeadLetterProducer, Poison
from domain.events import SchemaChange
from domain.health import ComponentHealth, Status
from domain.ports import SourceChunk

log = structlog.get_logger(__name__)
T = TypeVar("T")


class IncompatibleSchemaError(RuntimeError):
    pass


@dataclass(frozen=True)
class KafkaSourceSettings:
    consumer: Mapping[str, Any]  # librdkafka settings (adapters/kafka/clients.py)
    topics: Mapping[str, str]  # data topic -> source table (schema.table)
    registry_url: str
    registry_auth: tuple[str, str] | None = None  # registry basic auth (user, password)
    source_database: str = ""
    poll_batch_size: int = 500
    poll_timeout_seconds: float = 0.5
    commit_interval_seconds: float = 0.0
    stop_on_incompatible_schema: bool = False
    # None: poison messages are logged and skipped (dlq.enabled: false)
    dead_letters: Callable[[], DeadLetterProducer] | None = None
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 60.0


def lane_of(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def partition_of(lane: str) -> tuple[str, int]:
    topic, _, partition = lane.rpartition(":")
    return topic, int(partition)


def incompatible(change: SchemaChange) -> str | None:
    """Why a table shape change cannot be followed (None: it can): a column dropped or
    retyped, or another key."""
    if change.previous is None:
        return None
    if change.dropped:
        return f"columns dropped: {', '.join(change.dropped)}"
    if change.retyped:
        return f"columns retyped: {', '.join(change.retyped)}"
    if change.previous.key_columns != change.current.key_columns:
        return (
            f"key changed from ({', '.join(change.previous.key_columns)}) to"
            f" ({', '.join(change.current.key_columns)})"
        )
    return None


@dataclass
class _Fetched:
    chunks: list[SourceChunk] = field(default_factory=list)
    halt: str | None = None


@dataclass
class _Lane:
    """A partition's part of a poll: its chunk and the changes and messages read into it."""

    chunk: SourceChunk
    changes: list[Change] = field(default_factory=list)
    messages: dict[int, Any] = field(default_factory=dict)  # offset -> message


class KafkaEventSource:
    def __init__(self, settings: KafkaSourceSettings) -> None:
        self.settings = settings
        self.registry = SchemaRegistry(settings.registry_url, settings.registry_auth)
        self._decoders: dict[str, TopicDecoder] = {}
        for topic, table in settings.topics.items():
            schema, name = table_of(table)
            self._decoders[topic] = TopicDecoder(
                self.registry, schema, name, settings.source_database, topic
            )
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kafka-source")
        self._consumer: Consumer | None = None
        self._dead: DeadLetterProducer | None = None
        # State shared between the consumer thread and the event loop, under _lock.
        self._lock = threading.Lock()
        self._assigned: set[tuple[str, int]] = set()
        self._acked: dict[tuple[str, int], int] = {}  # released by the pump, next offset
        self._committed: dict[tuple[str, int], int] = {}
        self._revoked_pending: set[str] = set()
        self._high: dict[tuple[str, int], int] = {}  # fetched high watermarks
        self._stopping = threading.Event()
        self._commit_task: asyncio.Task[None] | None = None
        self._commit_wanted = asyncio.Event()
        self._error = ""
        self._halted: str | None = None
        self.events_read = 0
        self.dead_lettered = 0
        self.skipped = 0

    # ------------------------------------------------------------------ the thread

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, fn, *args)

    def _open(self) -> None:
        self._consumer = Consumer(dict(self.settings.consumer))
        self._consumer.subscribe(
            list(self.settings.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        if self.settings.dead_letters is not None:
            self._dead = self.settings.dead_letters()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        committed: list[TopicPartition] = []
        if partitions:
            try:  # where this member starts: the lag is measured from it
                committed = consumer.committed(partitions, timeout=10)
            except KafkaException as exc:
                log.warning("kafka.committed_unknown", error=str(exc))
        with self._lock:
            for tp in partitions:
                self._assigned.add((tp.topic, tp.partition))
                self._revoked_pending.discard(lane_of(tp.topic, tp.partition))
            for tp in committed:
                if tp.offset >= 0:
                    self._committed[(tp.topic, tp.partition)] = tp.offset
        log.info(
            "kafka.partitions_assigned", lanes=[lane_of(p.topic, p.partition) for p in partitions]
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The last moment this member may commit these partitions: commit what is durable.
        self._commit_sync([(p.topic, p.partition) for p in partitions])
        self._forget(partitions, "kafka.partitions_revoked")

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget(partitions, "kafka.partitions_lost")  # no commit: not ours any more

    def _forget(self, partitions: list[TopicPartition], event: str) -> None:
        lanes = [lane_of(p.topic, p.partition) for p in partitions]
        with self._lock:
            for p in partitions:
                key = (p.topic, p.partition)
                self._assigned.discard(key)
                self._acked.pop(key, None)
                self._committed.pop(key, None)
                self._high.pop(key, None)
            self._revoked_pending.update(lanes)
        log.info(event, lanes=lanes)

    def _commit_sync(self, keys: Sequence[tuple[str, int]] | None = None) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        with self._lock:
            todo = [
                TopicPartition(t, p, off)
                for (t, p), off in self._acked.items()
                if (keys is None or (t, p) in keys)
                and (t, p) in self._assigned
                and off > self._committed.get((t, p), OFFSET_INVALID)
            ]
        if not todo:
            return
        try:
            consumer.commit(offsets=todo, asynchronous=False)
        except KafkaException as exc:
            # Not lost: the offsets stay acked and are committed by a later attempt, or the
            # partition is redelivered from the last commit (the sinks skip replays).
            self._error = f"commit failed: {exc}"
            log.warning("kafka.commit_failed", error=str(exc))
            return
        with self._lock:
            for tp in todo:
                key = (tp.topic, tp.partition)
                if tp.offset > self._committed.get(key, OFFSET_INVALID):
                    self._committed[key] = tp.offset
        self._error = ""

    def _fetch(self) -> _Fetched:
        consumer = self._consumer
        assert consumer is not None
        messages = consumer.consume(
            self.settings.poll_batch_size, self.settings.poll_timeout_seconds
        )
        out = _Fetched()
        with self._lock:
            revoked = frozenset(self._revoked_pending)
            self._revoked_pending.clear()
            assigned = set(self._assigned)
        lanes: dict[str, _Lane] = {}
        held: set[str] = set()  # lanes stopped at an incompatible schema
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    self._error = str(err)
                    log.warning("kafka.consume_error", error=str(err))
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            if topic is None or partition is None or offset is None:
                continue
            if (topic, partition) not in assigned or topic not in self._decoders:
                continue
            lane = lane_of(topic, partition)
            if lane in held:
                continue
            read = lanes.get(lane)
            if read is None:
                read = lanes[lane] = _Lane(SourceChunk(lane, [], None, blocks=[]))
            chunk = read.chunk
            decoded = self._decode(msg, topic, partition, offset)
            if decoded is None:
                if self._stopping.is_set():
                    break  # a dead-letter write was interrupted: this offset stays unacked
                chunk.ack = offset + 1
                continue
            change = decoded.schema_change
            if change is not None:
                reason = incompatible(change) if self.settings.stop_on_incompatible_schema else None
                if reason is not None:
                    log.error(
                        "schema.incompatible",
                        table=change.current.qualified_name,
                        topic=topic,
                        partition=partition,
                        offset=offset,
                        reason=reason,
                    )
                    out.halt = f"{change.current.qualified_name}: {reason} (offset {offset})"
                    held.add(lane)
                    continue
                chunk.schema_changes.append(change)
            if decoded.change is not None:
                read.changes.append(decoded.change)
                read.messages[offset] = msg
            else:
                self.skipped += 1
            chunk.ack = offset + 1
        for topic, partition in assigned:
            with contextlib.suppress(KafkaException):
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), cached=True
                )
                if high >= 0:
                    with self._lock:
                        self._high[(topic, partition)] = high
        for read in lanes.values():
            self._build(read)
        chunks = [
            r.chunk
            for r in lanes.values()
            if r.changes or r.chunk.ack is not None or r.chunk.schema_changes
        ]
        if revoked:
            if chunks:
                chunks[0].revoked = revoked
            else:
                chunks.append(
                    SourceChunk(next(iter(revoked)), [], None, revoked=revoked, blocks=[])
                )
        out.chunks = chunks
        return out

    def _build(self, read: _Lane) -> None:
        """The lane's changes as blocks into its chunk; a change with a value its column
        cannot hold is dead-lettered and left out. If stopping interrupts that dead-letter
        write, the chunk ends before the message (whose offset then stays unacked)."""
        built = build_blocks(read.changes)
        for change, reason in built.rejected:
            msg = read.messages[change.offset]
            topic, partition = partition_of(read.chunk.lane)
            if not self._poison(msg, topic, partition, change.offset, EnvelopeError(reason)):
                kept = [c for c in read.changes if c.offset < change.offset]
                rejected = {c.offset for c, _ in built.rejected}
                built = build_blocks([c for c in kept if c.offset not in rejected])
                read.chunk.ack = change.offset
                break
        read.chunk.blocks = built.blocks

    def _decode(self, msg: Any, topic: str, partition: int, offset: int) -> Decoded | None:
        """The message's change, or None when it was dead-lettered (or skipped)."""
        wait = self.settings.retry_initial_seconds
        while True:
            try:
                return self._decoders[topic].decode(msg.key(), msg.value(), offset)
            except RegistryError as exc:  # the registry is down: not the message's fault
                self._error = str(exc)
                log.warning("kafka.schema_registry_unavailable", error=str(exc))
                if self._stopping.wait(wait):
                    return None
                wait = min(wait * 2, self.settings.retry_max_seconds)
            except EnvelopeError as exc:
                self._poison(msg, topic, partition, offset, exc)
                return None

    def _poison(self, msg: Any, topic: str, partition: int, offset: int, exc: Exception) -> bool:
        """Dead-letter (or, without a dead-letter topic, skip) the message; False when
        stopping interrupted the dead-letter write."""
        poison = Poison(
            topic, partition, offset, msg.key(), msg.value(), type(exc).__name__, str(exc)
        )
        if self._dead is None:
            self.skipped += 1
            log.error(
                "kafka.poison_skipped",
                topic=topic,
                partition=partition,
                offset=offset,
                error=str(exc),
                reason="dlq.enabled is false",
            )
            return True
        if self._dead.send(poison, self._stopping.is_set):
            self.dead_lettered += 1
            return True
        return False

    def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            self._consumer = consumer
            self._commit_sync()  # the final commit, before the consumer is closed
            self._consumer = None
            consumer.close()
        if self._dead is not None:
            self._dead.close()
            self._dead = None

    # ------------------------------------------------------------------ the port

    async def start(self) -> None:
        await self._call(self._open)
        self._commit_wanted = asyncio.Event()
        if self.settings.commit_interval_seconds > 0:
            self._commit_task = asyncio.create_task(self._commit_periodically())
        else:
            self._commit_task = asyncio.create_task(self._commit_when_acked())

    async def _commit_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.commit_interval_seconds)
            await self._call(self._commit_sync)

    async def _commit_when_acked(self) -> None:
        """commit_interval_seconds 0: commit as soon as something was acked. Acks that come
        while a commit is in flight are taken by the next one (a commit round trip to the
        broker per durable batch would hold the acks, and so the sinks' credits, back)."""
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            await self._call(self._commit_sync)

    async def chunks(self) -> AsyncIterator[SourceChunk]:
        while not self._stopping.is_set():
            fetched = await self._call(self._fetch)
            for chunk in fetched.chunks:
                self.events_read += len(chunk)
                yield chunk
            if fetched.halt is not None:
                self._halted = fetched.halt
                log.error(
                    "kafka.source_stopped",
                    reason=fetched.halt,
                    hint="stop_on_incompatible_schema is set",
                )
                return

    async def ack(self, lane: str, handles: Sequence[Any]) -> None:
        if not handles:
            return
        key = partition_of(lane)
        newest = max(int(h) for h in handles)
        with self._lock:
            if key not in self._assigned:
                return  # revoked meanwhile: what was durable got committed at the revoke
            if newest > self._acked.get(key, OFFSET_INVALID):
                self._acked[key] = newest
        if self.settings.commit_interval_seconds <= 0:
            self._commit_wanted.set()

    async def health(self) -> ComponentHealth:
        with self._lock:
            assigned = sorted(lane_of(t, p) for t, p in self._assigned)
        detail: dict[str, Any] = {
            "assigned": assigned,
            "events_read": self.events_read,
            "dead_lettered": self.dead_lettered,
        }
        if self._halted:
            return ComponentHealth(
                "kafka_source", Status.ERROR, {**detail, "error": f"stopped: {self._halted}"}
            )
        dead = self._dead
        if dead is not None and dead.last_error:
            # It keeps retrying; past dlq.max_retries failed attempts it fails readiness.
            failing = Status.ERROR if dead.attempts > dead.error_after else Status.DEGRADED
            return ComponentHealth(
                "kafka_source",
                failing,
                {**detail, "error": f"dead-letter write failing: {dead.last_error}"},
            )
        if self._error:
            return ComponentHealth(
                "kafka_source", Status.DEGRADED, {**detail, "error": self._error}
            )
        return ComponentHealth("kafka_source", Status.OK, detail)

    def lag(self) -> dict[str, dict[str, int]]:
        """Per lane: the fetched high watermark, the committed offset and the lag between
        them (the broker's ListOffsets is not used: Tansu's is wrong)."""
        with self._lock:
            out: dict[str, dict[str, int]] = {}
            for key in sorted(self._assigned):
                high = self._high.get(key)
                if high is None:
                    continue
                committed = self._committed.get(key, 0)
                out[lane_of(*key)] = {
                    "high_watermark": high,
                    "committed": committed,
                    "lag": max(0, high - committed),
                }
            return out

    @property
    def halted(self) -> str | None:
        return self._halted

    async def stop(self) -> None:
        self._stopping.set()
        task, self._commit_task = self._commit_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._call(self._close)
        self._thread.shutdown(wait=True)
