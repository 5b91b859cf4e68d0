"""Dead letters of a pubsub pipeline on its DLQ topic: the `ErrorRouter` a sink that needs
the transport's dead letters uses (the webhook sink), and the `DeadLetterStore` of
`cdc dlq` over the DLQ topic's keeping subscription.

A dead letter is one message: the change as a cdc.v2 batch of one event (positions kept, so
a replay is skipped where it was applied meanwhile) with the attributes `cdc_pipeline`,
`cdc_sink`, `cdc_lane`, `cdc_stage`, `cdc_error_class`, `cdc_error`, `cdc_attempts`. Its id
in `cdc dlq` is the Pub/Sub message id. Listing pulls the subscription and gives every
message back (nack) at the end; removing acks the listed ids. A message cannot be changed:
a letter dead-lettered again by a replay is a new message, and the old one is removed
(`updates_in_place` false, as for Kafka). Messages the ingest could not read at all (not a
cdc.v2 batch: `cdc_stage` ingest) are not changes and are not listed; they stay on the
subscription for inspection with Pub/Sub's own tools.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from adapters.pubsub.source import make_subscriber
from domain.capture import ChangeCodec
from domain.ports import DeadLetter, StoredDeadLetter

MAX_SCAN = 10_000  # messages one list / fetch / remove looks at


class PubSubDeadLetters:
    # A letter dead-lettered again during a replay is a new message; `cdc dlq replay` then
    # removes the old one.
    updates_in_place = False

    def __init__(
        self,
        pipeline_id: str,
        dlq_topic_path: str,
        dlq_subscription_path: str,
        codec: ChangeCodec,
    ) -> None:
        self.pipeline_id = pipeline_id
        self.topic_path = dlq_topic_path
        self.subscription_path = dlq_subscription_path
        self.codec = codec
        self._publisher: pubsub_v1.PublisherClient | None = None
        self._subscriber: pubsub_v1.SubscriberClient | None = None

    @property
    def location(self) -> str:
        return self.topic_path

    # ---------------------------------------------------------------- ErrorRouter

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Returns once Pub/Sub acknowledged every letter; raises otherwise."""
        if not letters:
            return
        if self._publisher is None:
            self._publisher = pubsub_v1.PublisherClient()
        futures = []
        for letter in letters:
            data = self.codec.encode(
                letter.pipeline_id or self.pipeline_id, letter.lane, [letter.event]
            )
            attributes = {
                "cdc_pipeline": (letter.pipeline_id or self.pipeline_id)[:1000],
                "cdc_sink": letter.sink_id[:1000],
                "cdc_lane": letter.lane[:1000],
                "cdc_stage": letter.stage[:1000],
                "cdc_error_class": (letter.error_class or letter.stage)[:1000],
                "cdc_error": letter.error[:1000],
                "cdc_attempts": str(letter.attempts),
            }
            futures.append(
                asyncio.wrap_future(self._publisher.publish(self.topic_path, data, **attributes))
            )
        await asyncio.gather(*futures)

    # ------------------------------------------------------------ DeadLetterStore

    async def list(
        self, sink_id: str | None = None, limit: int | None = None
    ) -> Sequence[StoredDeadLetter]:
        def keep(letter: StoredDeadLetter) -> bool:
            return sink_id is None or letter.sink_id == sink_id

        found = await asyncio.to_thread(self._scan, keep, False)
        found.sort(key=lambda d: (d.created_at or datetime.min.replace(tzinfo=UTC), d.id))
        return found if limit is None else found[:limit]

    async def fetch(self, ids: Sequence[str]) -> Sequence[StoredDeadLetter]:
        wanted = set(ids)
        return await asyncio.to_thread(self._scan, lambda d: d.id in wanted, False)

    async def remove(self, ids: Sequence[str]) -> int:
        wanted = set(ids)
        return len(await asyncio.to_thread(self._scan, lambda d: d.id in wanted, True))

    async def close(self) -> None:
        if self._publisher is not None:
            await asyncio.to_thread(self._publisher.stop)
            self._publisher = None
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None

    def _scan(
        self, select: Callable[[StoredDeadLetter], bool], ack_selected: bool
    ) -> builtins.list[StoredDeadLetter]:
        """Pull what the subscription holds (each message leased until the end, so none
        comes twice), keep what `select` accepts; then ack those (`ack_selected`) and give
        every other message back at once."""
        if self._subscriber is None:
            self._subscriber = make_subscriber()
        subscriber = self._subscriber
        chosen: builtins.list[StoredDeadLetter] = []
        chosen_acks: builtins.list[str] = []
        others: builtins.list[str] = []
        try:
            while len(chosen_acks) + len(others) < MAX_SCAN:
                try:
                    response = subscriber.pull(
                        request={
                            "subscription": self.subscription_path,
                            "max_messages": 1000,
                            "return_immediately": True,
                        },
                        timeout=30,
                    )
                except gexc.DeadlineExceeded:
                    break
                if not response.received_messages:
                    break
                for item in response.received_messages:
                    letter = self._stored(item.message)
                    if letter is not None and select(letter):
                        chosen.append(letter)
                        chosen_acks.append(item.ack_id)
                    else:
                        others.append(item.ack_id)
            if ack_selected:
                self._in_parts(subscriber.acknowledge, chosen_acks)
            else:
                others += chosen_acks
        finally:
            self._in_parts(
                lambda request: subscriber.modify_ack_deadline(
                    request={**request, "ack_deadline_seconds": 0}
                ),
                others,
            )
        return chosen

    def _in_parts(self, call: Callable[..., Any], ack_ids: builtins.list[str]) -> None:
        for start in range(0, len(ack_ids), 2500):
            call(
                request={
                    "subscription": self.subscription_path,
                    "ack_ids": ack_ids[start : start + 2500],
                }
            )

    def _stored(self, message: Any) -> StoredDeadLetter | None:
        attributes = dict(message.attributes)
        if attributes.get("cdc_pipeline", self.pipeline_id) != self.pipeline_id:
            return None
        try:
            events = self.codec.decode(bytes(message.data))
        except ValueError:
            return None  # not a change (the ingest could not read it): not listed
        if len(events) != 1:
            return None
        published = message.publish_time
        return StoredDeadLetter(
            id=str(message.message_id),
            pipeline_id=self.pipeline_id,
            sink_id=attributes.get("cdc_sink", ""),
            lane=attributes.get("cdc_lane", ""),
            event=events[0],
            error_class=attributes.get("cdc_error_class", ""),
            error=attributes.get("cdc_error", ""),
            attempts=int(attributes.get("cdc_attempts", "1") or 1),
            created_at=published if isinstance(published, datetime) else None,
            location=self.location,
        )
