"""The capture stage's broker on Pub/Sub: publishes a lane's messages with the lane as
ordering key and reports, per message, whether Pub/Sub acknowledged it.

An ordering key whose publish failed is paused by the client (every later publish on it
fails at once) until `resume_publish`: the capture stage's LanePublisher calls `resume`
before it publishes the failed message and everything after it again, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.cloud import pubsub_v1
from google.cloud.pubsub_v1 import types

# Pub/Sub's limit is 10 MB per message (data + attributes + ordering key); a publish request
# is limited to 10 MB too. Keep a margin for attributes.
MAX_MESSAGE_BYTES = 9_500_000


@dataclass(frozen=True)
class PublishSettings:
    max_messages: int = 100
    max_bytes: int = 1_000_000
    max_latency_seconds: float = 0.01
    ordered: bool = True


class PubSubTransport:
    """`MessageTransport` of services/capture/publisher.py for one topic."""

    name = "pubsub"
    max_message_bytes = MAX_MESSAGE_BYTES

    def __init__(
        self,
        topic_path: str,
        settings: PublishSettings,
        client: pubsub_v1.PublisherClient | None = None,
    ) -> None:
        self.topic_path = topic_path
        self.settings = settings
        self.client = client or pubsub_v1.PublisherClient(
            batch_settings=types.BatchSettings(
                max_messages=settings.max_messages,
                max_bytes=settings.max_bytes,
                max_latency=settings.max_latency_seconds,
            ),
            publisher_options=types.PublisherOptions(enable_message_ordering=settings.ordered),
        )

    async def publish(self, lane: str, messages: Sequence[Any]) -> list[BaseException | None]:
        """`messages`: objects with `.data` and `.attributes` (the capture's OutMessage)."""
        key = lane if self.settings.ordered else ""
        futures: list[Any] = []
        for message in messages:
            try:
                future = self.client.publish(
                    self.topic_path, message.data, ordering_key=key, **message.attributes
                )
            except Exception as exc:  # e.g. the key is paused: fails at once
                futures.append(_failed(exc))
                continue
            futures.append(asyncio.wrap_future(future))
        results = await asyncio.gather(*futures, return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    async def resume(self, lane: str) -> None:
        if self.settings.ordered:
            self.client.resume_publish(self.topic_path, lane)

    async def close(self) -> None:
        await asyncio.to_thread(self.client.stop)


async def _failed(exc: BaseException) -> None:
    raise exc
