"""`cdc dlq` over a kafka pipeline's dead-letter topics: ``<data topic>.<dlq.topic_suffix>``
for each table of the pipeline (a pattern would also match a table named like the suffix).

A letter's id is ``<dlq topic>:<partition>:<offset>`` (Kafka topic names cannot hold ``:``).
Listing reads every such topic from its first to its last offset (no consumer group offsets
are committed). What is shown:

- a change a sink rejected (written by `KafkaErrorRouter` with a codec): the change itself,
  decoded from the ``cdc.change`` header, its sink, error, attempts; `cdc dlq replay`
  delivers it again;
- a message the consumer could not decode (no sink id) or a letter without the
  ``cdc.change`` header (written with ``dlq.include_headers: false``): the table its topic
  names, the error from the headers, where it is; it is listed as not replayable.

Kafka cannot delete one record, so removing a letter (after a successful replay) writes a
marker to the compacted topic ``<topic_prefix>.__cdc_dlq_replayed``: key the letter's id,
value the record's timestamp. A marker hides a letter only when both match, so a DLQ topic
deleted and created again (offsets restart at 0) does not hide its new letters.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from adapters.kafka.admin import TopicAdmin, TopicSpec
from adapters.kafka.dead_letters import (
    H_ATTEMPTS,
    H_CHANGE,
    H_ERROR_CLASS,
    H_ERROR_MESSAGE,
    H_LANE,
    H_OFFSET,
    H_PARTITION,
    H_PIPELINE,
    H_SINK,
    H_TIME,
    H_TOPIC,
    DeadLetterWriteError,
)
from domain.capture import ChangeCodec
from domain.events import Operation, Position, SourceEvent, TableSchema
from domain.ports import StoredDeadLetter

MARKERS = "__cdc_dlq_replayed"
MAX_SCAN = 100_000  # records one list / fetch looks at, over all DLQ topics
READ_TIMEOUT = 30.0


class DeadLetterReadError(RuntimeError):
    pass


def markers_topic(topic_prefix: str) -> str:
    return f"{topic_prefix}.{MARKERS}"


def letter_id(topic: str, partition: int, offset: int) -> str:
    return f"{topic}:{partition}:{offset}"


class KafkaDeadLetters:
    """The kafka transport's `DeadLetterStore` (domain/ports.py)."""

    # A letter dead-lettered again during a replay is a new record; `cdc dlq replay` then
    # removes the old one.
    updates_in_place = False

    def __init__(
        self,
        pipeline_id: str,
        topic_prefix: str,
        suffix: str,
        dlq_topics: Sequence[str],
        consumer_settings: Mapping[str, Any],
        producer_settings: Mapping[str, Any],
        admin: Callable[[], TopicAdmin],
        codec: ChangeCodec,
        replication_factor: int = 1,
    ) -> None:
        self.pipeline_id = pipeline_id
        self.topic_prefix = topic_prefix
        self.suffix = suffix
        self.dlq_topics = list(dlq_topics)
        self.consumer_settings = dict(consumer_settings)
        self.producer_settings = dict(producer_settings)
        self._admin_factory = admin
        self._admin: TopicAdmin | None = None
        self.codec = codec
        self.replication_factor = replication_factor
        self.markers = markers_topic(topic_prefix)
        # id -> record timestamp (ms) of the letters the last scan saw, for `remove`.
        self._seen: dict[str, int] = {}

    # ------------------------------------------------------------ DeadLetterStore

    async def list(
        self, sink_id: str | None = None, limit: int | None = None
    ) -> Sequence[StoredDeadLetter]:
        found = await asyncio.to_thread(self._scan)
        if sink_id is not None:
            found = [x for x in found if x.sink_id == sink_id]
        return found if limit is None else found[:limit]

    async def fetch(self, ids: Sequence[str]) -> Sequence[StoredDeadLetter]:
        wanted = set(ids)
        return [x for x in await asyncio.to_thread(self._scan) if x.id in wanted]

    async def remove(self, ids: Sequence[str]) -> int:
        return await asyncio.to_thread(self._mark, list(ids))

    async def close(self) -> None:
        self._admin = None

    # ------------------------------------------------------------------ reading

    def admin(self) -> TopicAdmin:
        if self._admin is None:
            self._admin = self._admin_factory()
        return self._admin

    def _dlq_topics(self, present: set[str]) -> builtins.list[str]:
        return sorted(t for t in self.dlq_topics if t in present)

    def _read(self, topics: Sequence[str]) -> builtins.list[Any]:
        """Every record of `topics` from the first offset to the end (as of now)."""
        if not topics:
            return []
        consumer = Consumer(
            {
                **self.consumer_settings,
                "group.id": f"cdc-dlq-reader.{self.pipeline_id}",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )
        records: builtins.list[Any] = []
        try:
            metadata = consumer.list_topics(timeout=READ_TIMEOUT)
            ends: dict[tuple[str, int], int] = {}
            assignment = []
            for topic in topics:
                info = metadata.topics.get(topic)
                if info is None or info.error is not None:
                    continue
                for partition in info.partitions:
                    low, high = consumer.get_watermark_offsets(
                        TopicPartition(topic, partition), timeout=READ_TIMEOUT
                    )
                    if high > low:
                        ends[(topic, partition)] = high
                        assignment.append(TopicPartition(topic, partition, low))
            if not assignment:
                return []
            consumer.assign(assignment)
            deadline = time.monotonic() + READ_TIMEOUT
            while ends and len(records) < MAX_SCAN:
                if time.monotonic() > deadline:
                    raise DeadLetterReadError(
                        f"reading the dead-letter topics timed out; waiting for {sorted(ends)}"
                    )
                for msg in consumer.consume(500, 0.5):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            continue
                        raise DeadLetterReadError(f"reading {msg.topic()}: {err.str()}")
                    records.append(msg)
                    where = (msg.topic(), msg.partition())
                    if where in ends and (msg.offset() or 0) >= ends[where] - 1:
                        del ends[where]
        finally:
            consumer.close()
        return records

    def _removed(self, present: set[str]) -> dict[str, int]:
        if self.markers not in present:
            return {}
        removed: dict[str, int] = {}
        for msg in self._read([self.markers]):
            key = msg.key()
            if key is None:
                continue
            value = msg.value()
            if value is None:
                removed.pop(key.decode(), None)
            else:
                removed[key.decode()] = int(json.loads(value)["timestamp_ms"])
        return removed

    def _scan(self) -> builtins.list[StoredDeadLetter]:
        present = self.admin().list_topics()
        removed = self._removed(present)
        letters: builtins.list[StoredDeadLetter] = []
        self._seen = {}
        for msg in self._read(self._dlq_topics(present)):
            ident = letter_id(msg.topic(), msg.partition(), msg.offset())
            stamp = _timestamp_ms(msg)
            if removed.get(ident) == stamp:
                continue
            letter = self._stored(ident, msg)
            if letter is None:
                continue
            self._seen[ident] = stamp
            letters.append(letter)
        letters.sort(key=lambda x: (x.created_at or datetime.min.replace(tzinfo=UTC), x.id))
        return letters

    def _stored(self, ident: str, msg: Any) -> StoredDeadLetter | None:
        h = {k: (v or b"") for k, v in (msg.headers() or [])}

        def text(name: str, default: str = "") -> str:
            return h[name].decode(errors="replace") if name in h else default

        pipeline_id = text(H_PIPELINE, self.pipeline_id)
        if pipeline_id != self.pipeline_id:
            return None
        source_topic = text(H_TOPIC, msg.topic()[: -len(self.suffix) - 1])
        partition = text(H_PARTITION, "-1")
        lane = text(H_LANE, f"{source_topic}:{partition}")
        event: SourceEvent | None = None
        if H_CHANGE in h:
            try:
                events = self.codec.decode(h[H_CHANGE])
            except ValueError:
                events = []
            event = events[0] if len(events) == 1 else None
        replayable = event is not None and bool(text(H_SINK))
        if event is None:
            event = self._placeholder(source_topic, text(H_OFFSET, str(msg.offset())))
        attempts = text(H_ATTEMPTS, "1")
        return StoredDeadLetter(
            id=ident,
            pipeline_id=self.pipeline_id,
            sink_id=text(H_SINK),
            lane=lane,
            event=event,
            error_class=text(H_ERROR_CLASS),
            error=text(H_ERROR_MESSAGE) or ("" if replayable else "(no error headers)"),
            attempts=int(attempts) if attempts.isdigit() else 1,
            created_at=_created_at(text(H_TIME), msg),
            location=f"{msg.topic()} partition {msg.partition()} offset {msg.offset()}",
            replayable=replayable,
        )

    def _placeholder(self, source_topic: str, offset: str) -> SourceEvent:
        """What is known of a change that cannot be decoded: its table (named by the topic)
        and its offset on the data topic."""
        name = source_topic.removeprefix(f"{self.topic_prefix}.")
        schema, _, table = name.rpartition(".")
        position = Position(int(offset) if offset.lstrip("-").isdigit() else -1, 0)
        return SourceEvent(Operation.READ, TableSchema(schema, table, ()), position)

    # ------------------------------------------------------------------ removing

    def _mark(self, ids: builtins.list[str]) -> int:
        unknown = [i for i in ids if i not in self._seen]
        if unknown:
            self._scan()
        chosen = [i for i in ids if i in self._seen]
        if not chosen:
            return 0
        self.admin().ensure_topics(
            [
                TopicSpec(
                    self.markers,
                    1,
                    self.replication_factor,
                    {"cleanup.policy": "compact"},
                )
            ]
        )
        producer = Producer({**self.producer_settings, "message.timeout.ms": 15_000})
        failures: builtins.list[str] = []

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for ident in chosen:
            producer.produce(
                self.markers,
                key=ident.encode(),
                value=json.dumps(
                    {"timestamp_ms": self._seen[ident], "replayed_at": _now()}
                ).encode(),
                on_delivery=delivered,
            )
        left = producer.flush(20)
        if left or failures:
            raise DeadLetterWriteError(
                f"cannot mark replayed dead letters on {self.markers}: "
                + (failures[0] if failures else f"{left} not confirmed")
            )
        for ident in chosen:
            del self._seen[ident]
        return len(chosen)


def _timestamp_ms(msg: Any) -> int:
    _kind, stamp = msg.timestamp()
    return int(stamp)


def _created_at(header: str, msg: Any) -> datetime | None:
    if header:
        try:
            return datetime.strptime(header, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            pass
    stamp = _timestamp_ms(msg)
    return datetime.fromtimestamp(stamp / 1000, UTC) if stamp > 0 else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
