"""The capture stage's Outlet: routed batches from the pump -> messages per key-hash lane ->
a broker (`MessageTransport`: Pub/Sub, Kinesis) -> a durable `DeliveryAck` per batch.

- A batch is split over lanes by key hash (`domain.capture`); each lane has one worker that
  publishes its messages strictly in order: what is queued while a group is in flight goes
  into the next group, up to `max_changes_per_message` changes per message.
- A batch is acked (durable) only when the broker acknowledged every message that carries
  one of its changes; only then can the pump release the slot's LSN for it.
- A failed publish is retried from the first failed message of the lane, in order, after
  `transport.resume(lane)` (Pub/Sub pauses an ordering key after a failure). After
  `retry.max_attempts` the outlet fails: `send` raises, the capture stage exits non-zero and
  its restart replays from the slot's confirmed LSN (sinks skip what they applied).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from domain.capture import ChangeCodec, lane_name, split_by_lane
from domain.events import SourceEvent
from domain.health import ComponentHealth, Status
from domain.ports import DeliveryAck, OutboundBatch

log = structlog.get_logger(__name__)

AckHandler = Callable[[str, DeliveryAck], Awaitable[None]]

# Attribute values stay well inside every broker's limit (Pub/Sub: 1024 bytes).
MAX_ATTRIBUTE_BYTES = 1000


@dataclass(slots=True)
class OutMessage:
    """One message of one lane: the encoded changes and what a reader can see without
    decoding them."""

    data: bytes
    attributes: dict[str, str]
    events: int


class MessageTransport(Protocol):
    """A broker's publishing side, per lane (ordering key / partition key)."""

    name: str
    max_message_bytes: int

    async def publish(
        self, lane: str, messages: Sequence[OutMessage]
    ) -> list[BaseException | None]:
        """Publish `messages` in order on `lane`; one result per message (None: the broker
        acknowledged it). After a failure, later messages of the lane may fail too."""
        ...

    async def resume(self, lane: str) -> None:
        """Let the lane publish again after a failure (Pub/Sub: resume_publish)."""
        ...

    async def close(self) -> None: ...


class PublishFailedError(ConnectionError):
    """Publishing kept failing: the capture stage stops without confirming the slot."""


@dataclass(frozen=True, slots=True)
class RetrySettings:
    max_attempts: int = 5
    initial_wait_seconds: float = 1.0
    max_wait_seconds: float = 60.0
    multiplier: float = 2.0
    jitter: bool = True

    def wait(self, attempt: int) -> float:
        seconds = min(
            self.max_wait_seconds, self.initial_wait_seconds * self.multiplier ** (attempt - 1)
        )
        return seconds * random.uniform(0.5, 1.0) if self.jitter else seconds


@dataclass(slots=True)
class _Pending:
    lanes_left: int
    events: int


@dataclass(slots=True)
class _Item:
    batch_id: int
    events: list[SourceEvent]


@dataclass(slots=True)
class _Lane:
    name: str
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    published: int = 0


def truncate_attribute(value: str, limit: int = MAX_ATTRIBUTE_BYTES) -> str:
    data = value.encode("utf-8")
    if len(data) <= limit:
        return value
    return data[: limit - 3].decode("utf-8", "ignore") + "..."


class LanePublisher:
    """The `Outlet` of a capture stage (see the module doc)."""

    def __init__(
        self,
        transport: MessageTransport,
        codec: ChangeCodec,
        pipeline_id: str,
        *,
        lanes: int,
        max_changes_per_message: int,
        max_in_flight_batches: int,
        on_ack: AckHandler,
        retry: RetrySettings | None = None,
    ) -> None:
        self.transport = transport
        self.codec = codec
        self.pipeline_id = pipeline_id
        self.lane_count = lanes
        self.max_changes = max_changes_per_message
        self.on_ack = on_ack
        self.retry = retry or RetrySettings()
        self._credits = asyncio.Semaphore(max_in_flight_batches)
        self._max_in_flight = max_in_flight_batches
        self._lanes = [_Lane(lane_name(i)) for i in range(lanes)]
        self._pending: dict[int, _Pending] = {}
        self._failure: BaseException | None = None
        self._last_error = ""
        self._retries = 0
        self.messages_published = 0

    @property
    def name(self) -> str:
        return self.transport.name

    @property
    def unacked(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        for lane in self._lanes:
            lane.task = asyncio.create_task(self._worker(lane), name=f"publish-{lane.name}")

    async def send(self, batch: OutboundBatch) -> None:
        batch.require_events(self.name)
        await self._credits.acquire()
        if self._failure is not None:
            self._credits.release()
            raise PublishFailedError(f"{self.name}: publishing failed: {self._failure}")
        parts = split_by_lane(batch.events, self.lane_count)
        if not parts:  # nothing to publish: durable at once
            self._credits.release()
            await self.on_ack(self.name, DeliveryAck(batch.batch_id, accepted=True))
            return
        self._pending[batch.batch_id] = _Pending(len(parts), len(batch.events))
        for index, events in parts.items():
            self._lanes[index].queue.put_nowait(_Item(batch.batch_id, events))

    async def _worker(self, lane: _Lane) -> None:
        try:
            while True:
                items = [await lane.queue.get()]
                count = len(items[0].events)
                while count < self.max_changes and not lane.queue.empty():
                    item = lane.queue.get_nowait()
                    items.append(item)
                    count += len(item.events)
                events = [ev for item in items for ev in item.events]
                messages = self._messages(lane.name, events)
                await self._publish_in_order(lane, messages)
                lane.published += len(messages)
                self.messages_published += len(messages)
                for item in items:
                    await self._lane_done(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported through send() and health()
            self._fail(exc)

    def _messages(self, lane: str, events: list[SourceEvent]) -> list[OutMessage]:
        out: list[OutMessage] = []
        for start in range(0, len(events), self.max_changes):
            out += self._encode(lane, events[start : start + self.max_changes])
        return out

    def _encode(self, lane: str, events: list[SourceEvent]) -> list[OutMessage]:
        data = self.codec.encode(self.pipeline_id, lane, events)
        if len(data) > self.transport.max_message_bytes:
            if len(events) == 1:
                raise PublishFailedError(
                    f"one change of {events[0].table.qualified_name} at {events[0].position}"
                    f" encodes to {len(data)} bytes, over the {self.transport.name} message"
                    f" limit of {self.transport.max_message_bytes}"
                )
            half = len(events) // 2
            return self._encode(lane, events[:half]) + self._encode(lane, events[half:])
        tables = sorted({ev.table.qualified_name for ev in events})
        attributes = {
            "cdc_pipeline": truncate_attribute(self.pipeline_id),
            "cdc_lane": lane,
            "cdc_wire": "cdc.v2",
            "cdc_events": str(len(events)),
            "cdc_first_position": str(events[0].position),
            "cdc_last_position": str(events[-1].position),
            "cdc_tables": truncate_attribute(",".join(tables)),
        }
        return [OutMessage(data, attributes, len(events))]

    async def _publish_in_order(self, lane: _Lane, messages: list[OutMessage]) -> None:
        attempt = 1
        while True:
            results = await self.transport.publish(lane.name, messages)
            failed = next((i for i, r in enumerate(results) if r is not None), None)
            if failed is None:
                if attempt > 1:
                    self._last_error = ""
                return
            error = results[failed]
            self._last_error = f"lane {lane.name}: {error!r}"
            if attempt >= self.retry.max_attempts:
                raise PublishFailedError(
                    f"lane {lane.name}: {len(messages) - failed} message(s) not published"
                    f" after {attempt} attempts: {error!r}"
                )
            wait = self.retry.wait(attempt)
            log.warning(
                "capture.publish_failed",
                transport=self.name,
                lane=lane.name,
                attempt=attempt,
                unpublished=len(messages) - failed,
                retry_in=round(wait, 2),
                error=repr(error),
            )
            self._retries += 1
            await self.transport.resume(lane.name)
            await asyncio.sleep(wait)
            # Everything from the first failure on, in order: a later message may have been
            # published already (a duplicate is skipped by the sinks, a gap would not be).
            messages = messages[failed:]
            attempt += 1

    async def _lane_done(self, item: _Item) -> None:
        pending = self._pending.get(item.batch_id)
        if pending is None:
            return
        pending.lanes_left -= 1
        if pending.lanes_left:
            return
        del self._pending[item.batch_id]
        self._credits.release()
        await self.on_ack(
            self.name,
            DeliveryAck(item.batch_id, accepted=True, durable=True, written=pending.events),
        )

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
            log.error("capture.publish_gave_up", transport=self.name, error=str(exc))
        # Wake a send() waiting for a credit: it raises.
        for _ in range(self._max_in_flight):
            self._credits.release()

    async def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._pending and self._failure is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self._pending

    async def stop(self) -> None:
        for lane in self._lanes:
            if lane.task is not None:
                lane.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.task
        await self.transport.close()

    def health(self) -> ComponentHealth:
        detail: dict[str, Any] = {
            "lanes": self.lane_count,
            "unacked_batches": len(self._pending),
            "messages_published": self.messages_published,
            "publish_retries": self._retries,
        }
        if self._failure is not None:
            detail["error"] = str(self._failure)
            return ComponentHealth(f"publisher:{self.name}", Status.ERROR, detail)
        if self._last_error:
            detail["error"] = self._last_error
            return ComponentHealth(f"publisher:{self.name}", Status.DEGRADED, detail)
        return ComponentHealth(f"publisher:{self.name}", Status.OK, detail)
