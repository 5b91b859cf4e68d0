"""The ingest stage's EventSource on Pub/Sub: pulls the pipeline's subscription.

- Each ordering key is a lane (the capture stage's key-hash lanes); Pub/Sub delivers a
  key's messages in order. Consecutive messages of a lane in one pull become one chunk
  whose ack handle is those messages.
- Flow control: at most `max_outstanding_messages` messages received and not yet acked;
  the puller waits for acks beyond that (the backpressure of the sinks).
- Leases: the ack deadline of every message in flight is extended every third of
  `ack_deadline_seconds` (up to `max_lease_seconds`; after that it is redelivered, and the
  sinks skip what they applied), so a batch the sinks take long to make durable is not
  redelivered meanwhile.
- A message is acked only through `ack(lane, handles)`, i.e. when the commit tracker
  released it: every targeted sink made its changes durable.
- A message that is not a readable batch (poison) is published to the DLQ topic with the
  error in its attributes and acked once that publish is durable (never retried); if that
  publish fails it is nacked, and the subscription's dead-letter policy moves it after
  its delivery attempts.
- `stop()` nacks what was received and not acked, so it is redelivered at once.

Unary Pull, not the client library's streaming pull: measured on the emulator, an ordered
subscription never redelivered (within 60 s) what a closed streaming pull had received and
not acked, even after the ack deadline or a nack, so a restarted ingest would wait forever;
and the library's callback API hands out one message per ordering key until it is acked,
which caps a lane at one message per end-to-end ack latency (docs/pubsub.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from domain.capture import ChangeCodec
from domain.health import ComponentHealth, Status
from domain.ports import AckHandle, SourceChunk

log = structlog.get_logger(__name__)

LANE_ATTRIBUTE = "cdc_lane"
PULL_TIMEOUT_SECONDS = 10.0
# Between pulls that found nothing: from IDLE_WAIT_MIN doubling to IDLE_WAIT_MAX, cut short
# by an ack (which may make a key's next messages deliverable).
IDLE_WAIT_MIN = 0.005
IDLE_WAIT_MAX = 0.1
# return_immediately is deprecated in the API (an empty answer costs a request) but it is the
# one way to pull without waiting on the server: a waiting pull is not woken when an ack makes
# an ordering key's next messages deliverable (measured on the emulator: it answered empty
# after 3 s), and a client deadline shorter than the server's wait would lose the messages a
# late answer leases (redelivered only after the ack deadline, stalling their key).
warnings.filterwarnings("ignore", message="The return_immediately flag is deprecated")
MAX_PULL = 1000  # Pub/Sub's limit per Pull request
MAX_ACK_IDS = 2500  # ack ids per Acknowledge / ModifyAckDeadline request (stays < 512 KB)


@dataclass(frozen=True)
class SourceSettings:
    subscription_path: str
    dlq_topic_path: str | None  # None: dead letters are left to the subscription's policy
    # dlq.include_headers: a dead letter keeps the original message's attributes
    dlq_include_attributes: bool = True
    max_outstanding_messages: int = 1000
    max_chunk_events: int = 2000
    ack_deadline_seconds: int = 60
    # The longest a message's deadline is extended (then it is redelivered).
    max_lease_seconds: float = 3600.0


@dataclass(slots=True)
class Received:
    """One pulled message: the handle `ack()` gets back (inside a chunk's tuple)."""

    ack_id: str
    message_id: str
    ordering_key: str
    attributes: dict[str, str]
    publish_time: float  # epoch seconds
    taken_at: float  # monotonic


class PubSubEventSource:
    def __init__(
        self,
        settings: SourceSettings,
        codec: ChangeCodec,
        *,
        provision: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.codec = codec
        # Creates the subscription first when the ingest starts before the capture stage.
        self._provision = provision
        self._subscriber: pubsub_v1.SubscriberClient | None = None
        self._dlq_publisher: pubsub_v1.PublisherClient | None = None
        self._outstanding: dict[str, Received] = {}
        self._pull_size = MAX_PULL
        self._room = asyncio.Event()
        self._extender: asyncio.Task[None] | None = None
        self._stopping = False
        self._error = ""
        self.received = 0
        self.acked = 0
        self.dead_lettered = 0

    # -- the port -----------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        self._error = ""
        if self._provision is not None:
            await self._provision()
        if self._subscriber is None:
            self._subscriber = make_subscriber()
        self._extender = asyncio.create_task(self._extend_leases(), name="pubsub-leases")
        log.info("pubsub.subscribed", subscription=self.settings.subscription_path)

    async def chunks(self) -> AsyncIterator[SourceChunk]:
        idle = IDLE_WAIT_MIN
        while not self._stopping:
            room = self.settings.max_outstanding_messages - len(self._outstanding)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            self._room.clear()
            pulled = await self._pull(min(room, self._pull_size))
            if self._stopping:
                self._nack([r.ack_id for r, _ in pulled])
                return
            if not pulled:
                # Nothing deliverable now. An ack may unlock an ordering key's next messages
                # (Pub/Sub holds them until the key's earlier ones are acked, and does not
                # wake a waiting pull for it): pull again right after the next ack, or after
                # a wait growing to IDLE_WAIT_MAX while nothing comes.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), idle)
                idle = min(IDLE_WAIT_MAX, idle * 2)
                continue
            idle = IDLE_WAIT_MIN
            lanes: dict[str, tuple[list[Received], list[Any]]] = {}
            for received, data in pulled:
                events = await self._decode(received, data)
                if events is None:
                    continue
                self.received += 1
                self._outstanding[received.ack_id] = received
                lane = received.ordering_key or received.attributes.get(LANE_ATTRIBUTE, "k0")
                handles, evs = lanes.setdefault(lane, ([], []))
                handles.append(received)
                evs += events
            for lane, (handles, events) in lanes.items():
                yield SourceChunk(lane, events, tuple(handles))

    async def _pull(self, count: int) -> list[tuple[Received, bytes]]:
        assert self._subscriber is not None
        subscriber = self._subscriber
        request = {
            "subscription": self.settings.subscription_path,
            "max_messages": count,
            "return_immediately": True,
        }
        try:
            response = await asyncio.to_thread(
                subscriber.pull, request=request, timeout=PULL_TIMEOUT_SECONDS
            )
        except gexc.ResourceExhausted as exc:
            if "larger than max" in str(exc) and self._pull_size > 1:
                # The response would not fit a gRPC message: ask for fewer messages.
                self._pull_size = max(1, self._pull_size // 2)
                log.info("pubsub.pull_size_reduced", max_messages=self._pull_size)
                return []
            raise ConnectionError(f"pull failed: {exc}") from exc
        except (gexc.DeadlineExceeded, gexc.ServiceUnavailable, gexc.RetryError) as exc:
            log.debug("pubsub.pull_retry", error=repr(exc))
            return []
        except gexc.GoogleAPICallError as exc:
            self._error = f"pull failed: {exc}"
            raise ConnectionError(self._error) from exc
        self._error = ""
        now = time.monotonic()
        out = []
        for item in response.received_messages:
            m = item.message
            out.append(
                (
                    Received(
                        item.ack_id,
                        m.message_id,
                        m.ordering_key,
                        dict(m.attributes),
                        m.publish_time.timestamp(),
                        now,
                    ),
                    bytes(m.data),
                )
            )
        return out

    async def _decode(self, received: Received, data: bytes) -> list[Any] | None:
        try:
            return self.codec.decode(data)
        except ValueError as exc:
            await self._dead_letter(received, data, str(exc))
            return None

    async def _dead_letter(self, received: Received, data: bytes, error: str) -> None:
        log.error(
            "pubsub.message_dead_lettered",
            message_id=received.message_id,
            ordering_key=received.ordering_key,
            error=error,
        )
        if self.settings.dlq_topic_path is None:
            self._nack([received.ack_id])  # the subscription's dead-letter policy takes it
            return
        attributes = dict(received.attributes) if self.settings.dlq_include_attributes else {}
        attributes.update(
            {
                "cdc_error": error[:1000],
                "cdc_stage": "ingest",
                "cdc_source_subscription": self.settings.subscription_path[:1000],
                "cdc_source_message_id": received.message_id,
            }
        )
        if self._dlq_publisher is None:
            self._dlq_publisher = pubsub_v1.PublisherClient()
        try:
            future = self._dlq_publisher.publish(self.settings.dlq_topic_path, data, **attributes)
            await asyncio.wrap_future(future)
        except Exception as exc:
            log.error("pubsub.dead_letter_failed", error=repr(exc), note="nacked instead")
            self._nack([received.ack_id])
            return
        self.dead_lettered += 1
        await self._acknowledge([received.ack_id])  # only once the dead letter is durable

    async def ack(self, lane: str, handles: Sequence[AckHandle]) -> None:
        ack_ids = [received.ack_id for handle in handles for received in handle]
        await self._acknowledge(ack_ids)
        for ack_id in ack_ids:
            self._outstanding.pop(ack_id, None)
        self.acked += len(ack_ids)
        self._room.set()

    async def _acknowledge(self, ack_ids: list[str]) -> None:
        assert self._subscriber is not None
        subscriber = self._subscriber
        for start in range(0, len(ack_ids), MAX_ACK_IDS):
            part = ack_ids[start : start + MAX_ACK_IDS]
            await asyncio.to_thread(
                subscriber.acknowledge,
                request={"subscription": self.settings.subscription_path, "ack_ids": part},
            )

    def _modify(self, ack_ids: list[str], seconds: int) -> None:
        if self._subscriber is None:
            return
        for start in range(0, len(ack_ids), MAX_ACK_IDS):
            self._subscriber.modify_ack_deadline(
                request={
                    "subscription": self.settings.subscription_path,
                    "ack_ids": ack_ids[start : start + MAX_ACK_IDS],
                    "ack_deadline_seconds": seconds,
                }
            )

    def _nack(self, ack_ids: list[str]) -> None:
        if ack_ids:
            with contextlib.suppress(gexc.GoogleAPICallError):
                self._modify(ack_ids, 0)

    async def _extend_leases(self) -> None:
        deadline = self.settings.ack_deadline_seconds
        while True:
            await asyncio.sleep(max(1.0, deadline / 3))
            now = time.monotonic()
            ack_ids = [
                r.ack_id
                for r in list(self._outstanding.values())
                if now - r.taken_at < self.settings.max_lease_seconds
            ]
            if ack_ids:
                try:
                    await asyncio.to_thread(self._modify, ack_ids, deadline)
                except gexc.GoogleAPICallError as exc:
                    log.warning("pubsub.lease_extension_failed", error=repr(exc))

    def oldest_unacked_age(self) -> float:
        """Seconds since the oldest received-but-unacked message was published (0: none)."""
        oldest = min((r.publish_time for r in list(self._outstanding.values())), default=None)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    async def health(self) -> ComponentHealth:
        detail: dict[str, Any] = {
            "subscription": self.settings.subscription_path,
            "received": self.received,
            "acked": self.acked,
            "outstanding": len(self._outstanding),
            "dead_lettered": self.dead_lettered,
        }
        if self._error:
            detail["error"] = self._error
            return ComponentHealth("source:pubsub", Status.ERROR, detail)
        return ComponentHealth("source:pubsub", Status.OK, detail)

    async def stop(self) -> None:
        self._stopping = True
        self._room.set()
        if self._extender is not None:
            self._extender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._extender
            self._extender = None
        held = [r.ack_id for r in self._outstanding.values()]
        self._outstanding.clear()
        # Redelivered at once rather than after the ack deadline.
        await asyncio.to_thread(self._nack, held)
        if self._dlq_publisher is not None:
            await asyncio.to_thread(self._dlq_publisher.stop)
            self._dlq_publisher = None
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None


def make_subscriber() -> pubsub_v1.SubscriberClient:
    """The client; against the emulator with gRPC's 4 MB receive limit lifted (the library
    opens a plain channel there; its own channel to Google has no limit), so a pull of large
    messages does not fail."""
    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not host:
        return pubsub_v1.SubscriberClient()
    import grpc
    from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

    channel = grpc.insecure_channel(
        host,
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
    )
    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))
