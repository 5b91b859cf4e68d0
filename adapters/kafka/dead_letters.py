"""The dead-letter topic of a data topic: ``<topic>.<dlq.topic_suffix>``.

A poison message (one that does not decode, or that a sink rejected permanently) is copied
there unchanged (key and value bytes) with headers saying where it came from and why. The
write is synchronous and retried with backoff until the broker confirms it: the caller
moves the partition's offset past the message only after `send` returned, so a failed
dead-letter write holds the commit back instead of losing the message.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer

from adapters.kafka.clients import dead_letter_topic
from domain.capture import ChangeCodec
from domain.ports import DeadLetter

log = structlog.get_logger(__name__)

# Header names (values are UTF-8 text).
H_TOPIC, H_PARTITION, H_OFFSET = "cdc.source.topic", "cdc.source.partition", "cdc.source.offset"
H_ERROR_CLASS, H_ERROR_MESSAGE = "cdc.error.class", "cdc.error.message"
H_SINK, H_TIME = "cdc.sink.id", "cdc.time"
# Of a change a sink rejected (KafkaErrorRouter): what `cdc dlq replay` needs to deliver it
# again. H_CHANGE is the change as a cdc.v2 EventBatch of one event (types and position kept).
H_PIPELINE, H_LANE, H_ATTEMPTS, H_CHANGE = "cdc.pipeline", "cdc.lane", "cdc.attempts", "cdc.change"
_MAX_MESSAGE = 2000


@dataclass(frozen=True, slots=True)
class Poison:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    error_class: str
    error_message: str
    sink_id: str = ""  # empty: the source rejected it (it did not decode)


class DeadLetterWriteError(RuntimeError):
    pass


def headers(poison: Poison) -> list[tuple[str, str | bytes | None]]:
    """The headers of a dead letter: where it came from, why, which sink, when."""
    return [
        (H_TOPIC, poison.topic.encode()),
        (H_PARTITION, str(poison.partition).encode()),
        (H_OFFSET, str(poison.offset).encode()),
        (H_ERROR_CLASS, poison.error_class.encode()),
        (H_ERROR_MESSAGE, poison.error_message[:_MAX_MESSAGE].encode()),
        (H_SINK, poison.sink_id.encode()),
        (H_TIME, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()),
    ]


class DeadLetterProducer:
    def __init__(
        self,
        settings: Mapping[str, Any],
        suffix: str,
        include_headers: bool = True,
        initial_wait: float = 1.0,
        max_wait: float = 60.0,
        delivery_timeout: float = 15.0,
        error_after: int = 3,
    ) -> None:
        self._producer = Producer({**settings, "message.timeout.ms": int(delivery_timeout * 1000)})
        self.suffix = suffix
        self.include_headers = include_headers
        self.initial_wait = initial_wait
        self.max_wait = max_wait
        self.delivery_timeout = delivery_timeout
        # Failed attempts of one message after which health says ERROR (it keeps retrying).
        self.error_after = error_after
        self.attempts = 0  # failed attempts of the message being written
        self.written = 0
        self.failures = 0
        self.last_error = ""

    def topic_of(self, topic: str) -> str:
        return dead_letter_topic(topic, self.suffix)

    def headers(self, poison: Poison) -> list[tuple[str, str | bytes | None]]:
        return headers(poison) if self.include_headers else []

    def _send_once(self, poison: Poison) -> None:
        outcome: list[KafkaError | None] = []
        done = threading.Event()

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            outcome.append(err)
            done.set()

        self._producer.produce(
            self.topic_of(poison.topic),
            value=poison.value,
            key=poison.key,
            headers=self.headers(poison),
            on_delivery=delivered,
        )
        deadline = time.monotonic() + self.delivery_timeout + 5
        while not done.is_set():
            if time.monotonic() > deadline:
                raise DeadLetterWriteError("no delivery report from the broker")
            self._producer.poll(0.1)
        if outcome[0] is not None:
            raise DeadLetterWriteError(str(outcome[0]))

    def send(self, poison: Poison, stopping: Callable[[], bool] = lambda: False) -> bool:
        """Write `poison` to its dead-letter topic; retry until the broker confirms it.
        False only when `stopping()` became true first (the message stays uncommitted)."""
        wait = self.initial_wait
        while True:
            try:
                self._send_once(poison)
            except (KafkaException, DeadLetterWriteError, BufferError) as exc:
                self.failures += 1
                self.attempts += 1
                self.last_error = str(exc)
                log.warning(
                    "kafka.dead_letter_write_failed",
                    topic=self.topic_of(poison.topic),
                    source_topic=poison.topic,
                    partition=poison.partition,
                    offset=poison.offset,
                    error=str(exc),
                    retry_in_seconds=round(wait, 2),
                )
                end = time.monotonic() + wait * (0.5 + random.random() / 2)
                while time.monotonic() < end:
                    if stopping():
                        return False
                    time.sleep(0.1)
                wait = min(wait * 2, self.max_wait)
                continue
            self.written += 1
            self.attempts = 0
            self.last_error = ""
            log.warning(
                "kafka.dead_lettered",
                topic=self.topic_of(poison.topic),
                source_topic=poison.topic,
                partition=poison.partition,
                offset=poison.offset,
                error_class=poison.error_class,
                error=poison.error_message[:300],
                sink_id=poison.sink_id or None,
            )
            return True

    def close(self) -> None:
        self._producer.flush(5)


def letter_json(letter: DeadLetter) -> bytes:
    """The value of a change a sink rejected: the change itself as JSON (the sink has the
    decoded change, not the original Avro message)."""
    ev = letter.event
    columns = ev.table.column_names

    def row(values: Any) -> Any:
        if values is None:
            return None
        return {c: (None if v is None else str(v)) for c, v in zip(columns, values, strict=True)}

    return json.dumps(
        {
            "table": ev.table.qualified_name,
            "op": ev.operation.value,
            "position": [ev.position.major, ev.position.minor],
            "key": ev.key,
            "before": row(ev.before),
            "after": row(ev.after),
            "commit_time_us": ev.commit_time_us,
        },
        separators=(",", ":"),
    ).encode()


class KafkaErrorRouter:
    """The kafka transport's `ErrorRouter` (domain/ports.py): where a sink without dead
    letters of its own (the webhook sink) puts the changes it rejects permanently. Each goes
    to the dead-letter topic of its data topic (the lane ``<topic>:<partition>`` names both)
    as JSON (`letter_json`), with the same headers as a poison message, the sink's id
    included, and (given a `codec`) the change itself in cdc.v2 form plus its pipeline, lane
    and attempts, so `cdc dlq replay` can deliver it again (adapters/kafka/dead_letter_store.py).
    `dead_letter` returns once the broker confirmed every letter and raises
    otherwise: the sink then does not acknowledge the batch, so the offset is held back."""

    def __init__(
        self,
        settings: Mapping[str, Any],
        suffix: str,
        topic_prefix: str,
        include_headers: bool = True,
        delivery_timeout: float = 15.0,
        codec: ChangeCodec | None = None,
        pipeline_id: str = "",
    ) -> None:
        self.codec = codec
        self.pipeline_id = pipeline_id
        self.settings = dict(settings)
        self.suffix = suffix
        self.topic_prefix = topic_prefix
        self.include_headers = include_headers
        self.delivery_timeout = delivery_timeout
        self._producer: Producer | None = None

    def _poison(self, letter: DeadLetter) -> Poison:
        topic, sep, partition = letter.lane.rpartition(":")
        if not sep or not partition.isdigit():
            topic, partition = f"{self.topic_prefix}.{letter.event.table.qualified_name}", "-1"
        return Poison(
            topic,
            int(partition),
            letter.event.position.major,
            None,
            letter_json(letter),
            letter.error_class or letter.stage,
            letter.error,
            letter.sink_id,
        )

    def _send(self, letters: Sequence[DeadLetter]) -> None:
        if self._producer is None:
            self._producer = Producer(
                {**self.settings, "message.timeout.ms": int(self.delivery_timeout * 1000)}
            )
        producer = self._producer
        failures: list[str] = []

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for letter in letters:
            poison = self._poison(letter)
            producer.produce(
                dead_letter_topic(poison.topic, self.suffix),
                value=poison.value,
                headers=self._headers(letter, poison),
                on_delivery=delivered,
            )
        left = producer.flush(self.delivery_timeout + 5)
        if left:
            raise DeadLetterWriteError(f"{left} dead letter(s) not confirmed by the broker")
        if failures:
            raise DeadLetterWriteError(f"dead-letter write failed: {failures[0]}")
        for letter in letters:
            log.warning(
                "kafka.dead_lettered",
                sink_id=letter.sink_id,
                lane=letter.lane,
                offset=letter.event.position.major,
                error_class=letter.error_class or letter.stage,
                error=letter.error[:300],
            )

    def _headers(self, letter: DeadLetter, poison: Poison) -> list[tuple[str, str | bytes | None]]:
        if not self.include_headers:
            return []
        out = headers(poison)
        if self.codec is not None:
            pipeline_id = letter.pipeline_id or self.pipeline_id
            out += [
                (H_PIPELINE, pipeline_id.encode()),
                (H_LANE, letter.lane.encode()),
                (H_ATTEMPTS, str(letter.attempts).encode()),
                (H_CHANGE, self.codec.encode(pipeline_id, letter.lane, [letter.event])),
            ]
        return out

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        if letters:
            await asyncio.to_thread(self._send, letters)

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await asyncio.to_thread(producer.flush, 5)
