"""Reading back what a connector wrote: a topic's Avro values, decoded with confluent-kafka's
own deserializer against the schema registry (the check is independent of our decoder)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import Consumer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def read_avro_values(
    bootstrap: str, registry: str, topic: str, want: int, seconds: float = 90
) -> list[dict[str, Any]]:
    """Up to `want` decoded values from the start of `topic`, in topic order, waiting at most
    `seconds`; tombstones (a delete's null value) are skipped."""
    deserialize = AvroDeserializer(SchemaRegistryClient({"url": registry}))
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    try:
        while len(found) < want and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None or message.error() or message.value() is None:
                continue
            context = SerializationContext(topic, MessageField.VALUE)
            found.append(deserialize(message.value(), context))
    finally:
        consumer.close()
    return found
