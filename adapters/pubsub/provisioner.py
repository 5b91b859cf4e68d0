"""Creates a pipeline's Pub/Sub resources, idempotently, and removes them (`cdc undeploy`).

What it creates (names: adapters/pubsub/naming.py): the pipeline's topic; its subscription
for the ingest stage (message ordering as configured, the ack deadline, a dead-letter policy
to the DLQ topic after `max_delivery_attempts`); the DLQ topic and a subscription on it, so
dead letters are kept (a topic without a subscription drops what is published to it).
Existing resources are left as they are (their settings are not changed: a subscription's
ordering cannot be changed after creation; a mismatch is logged).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.protobuf import duration_pb2

from adapters.pubsub.naming import PipelineNames

log = structlog.get_logger(__name__)

# Pub/Sub's bounds of a dead-letter policy's max_delivery_attempts.
MIN_DELIVERY_ATTEMPTS = 5
MAX_DELIVERY_ATTEMPTS = 100


@dataclass(frozen=True)
class SubscriptionSettings:
    ordered: bool = True
    ack_deadline_seconds: int = 60
    dead_letter: bool = True
    max_delivery_attempts: int = MIN_DELIVERY_ATTEMPTS
    # How long a dead letter is kept on the DLQ subscription (Pub/Sub's maximum: 7 days).
    dlq_retention_seconds: int = 7 * 24 * 3600


def delivery_attempts(max_retries: int) -> int:
    """dlq.max_retries as a dead-letter policy's attempts (first delivery + retries), within
    Pub/Sub's 5..100."""
    return max(MIN_DELIVERY_ATTEMPTS, min(MAX_DELIVERY_ATTEMPTS, max_retries + 1))


class PubSubProvisioner:
    def __init__(self, names: PipelineNames, settings: SubscriptionSettings) -> None:
        self.names = names
        self.settings = settings
        self.created: list[str] = []
        self.report: list[str] = []  # what the last teardown did, one line per resource

    async def provision(self) -> None:
        await asyncio.to_thread(self._provision)

    async def teardown(self, force: bool = False) -> list[str]:
        """Remove everything, dead letters on the DLQ subscription too (`force` changes
        nothing: Pub/Sub has no notion of a resource in use); one line per resource."""
        self.report = await asyncio.to_thread(self._teardown)
        return self.report

    def teardown_report(self) -> list[str]:
        self.report = self._teardown()
        return self.report

    def _provision(self) -> None:
        n, s = self.names, self.settings
        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        try:
            self._create_topic(publisher, n.topic_path)
            self._create_topic(publisher, n.dlq_topic_path)
            self._create_subscription(
                subscriber,
                {
                    "name": n.dlq_subscription_path,
                    "topic": n.dlq_topic_path,
                    "ack_deadline_seconds": 60,
                    "message_retention_duration": duration_pb2.Duration(
                        seconds=s.dlq_retention_seconds
                    ),
                },
            )
            request: dict[str, object] = {
                "name": n.subscription_path,
                "topic": n.topic_path,
                "ack_deadline_seconds": s.ack_deadline_seconds,
                "enable_message_ordering": s.ordered,
            }
            if s.dead_letter:
                request["dead_letter_policy"] = {
                    "dead_letter_topic": n.dlq_topic_path,
                    "max_delivery_attempts": s.max_delivery_attempts,
                }
            existing = self._create_subscription(subscriber, request)
            if existing is not None and existing.enable_message_ordering != s.ordered:
                log.warning(
                    "pubsub.subscription_ordering_differs",
                    subscription=n.subscription_path,
                    existing=existing.enable_message_ordering,
                    configured=s.ordered,
                    note="ordering cannot change on an existing subscription; undeploy to recreate",
                )
        finally:
            subscriber.close()
            publisher.stop()

    def _create_topic(self, publisher: pubsub_v1.PublisherClient, path: str) -> None:
        try:
            publisher.create_topic(request={"name": path})
            self.created.append(path)
            log.info("pubsub.topic_created", topic=path)
        except gexc.AlreadyExists:
            pass

    def _create_subscription(
        self, subscriber: pubsub_v1.SubscriberClient, request: dict[str, object]
    ) -> Any:
        """None when created; the existing subscription otherwise."""
        try:
            subscriber.create_subscription(request=request)
            self.created.append(str(request["name"]))
            log.info("pubsub.subscription_created", subscription=request["name"])
            return None
        except gexc.AlreadyExists:
            return subscriber.get_subscription(request={"subscription": request["name"]})

    def _teardown(self) -> list[str]:
        n = self.names
        done: list[str] = []
        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        try:
            for path in (n.subscription_path, n.dlq_subscription_path):
                try:
                    subscriber.delete_subscription(request={"subscription": path})
                    done.append(f"deleted Pub/Sub subscription {path}")
                except gexc.NotFound:
                    done.append(f"Pub/Sub subscription {path} did not exist")
            for path in (n.topic_path, n.dlq_topic_path):
                try:
                    publisher.delete_topic(request={"topic": path})
                    done.append(f"deleted Pub/Sub topic {path}")
                except gexc.NotFound:
                    done.append(f"Pub/Sub topic {path} did not exist")
        finally:
            subscriber.close()
        return done
