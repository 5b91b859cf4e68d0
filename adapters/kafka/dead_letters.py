"""The dead-letter topic of a data topic: ``<topic>.<dlq.topic_suffix>``.

A poison message (one that does not decode, or that a sink rejected permanently) is copied
there unchanged (key and value bytes) with headers saying where it came from and why. The
write is synchronous and retried with backoff until the broker confirms it: the caller
moves the partition's offset past the message only after `send` returned, so a failed
dead-letter write holds the commit back instead of losing the message.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer

from adapters.kafka.clients import dead_letter_topic

log = structlog.get_logger(__name__)

# Header names (values are UTF-8 text).
H_TOPIC, H_PARTITION, H_OFFSET = "cdc.source.topic", "cdc.source.partition", "cdc.source.offset"
H_ERROR_CLASS, H_ERROR_MESSAGE = "cdc.error.class", "cdc.error.message"
H_SINK, H_TIME = "cdc.sink.id", "cdc.time"
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
        if not self.include_headers:
            return []
        return [
            (H_TOPIC, poison.topic.encode()),
            (H_PARTITION, str(poison.partition).encode()),
            (H_OFFSET, str(poison.offset).encode()),
            (H_ERROR_CLASS, poison.error_class.encode()),
            (H_ERROR_MESSAGE, poison.error_message[:_MAX_MESSAGE].encode()),
            (H_SINK, poison.sink_id.encode()),
            (H_TIME, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()),
        ]

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
