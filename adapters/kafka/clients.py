"""librdkafka settings of the consumer and the dead-letter producer, and the topic names.

The security settings (SSL, SASL, MSK IAM and Google OAuth tokens) come from
adapters/kafka/security.py, the topic names from adapters/kafka/topics.py; this module adds
what the consumer and the dead-letter producer need on top.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from adapters.config import KafkaConfig, PipelineConfig
from adapters.kafka import security, topics


def _common() -> dict[str, Any]:
    # librdkafka's own log lines go through logging (the process's log format), not
    # straight to stderr.
    return {"logger": logging.getLogger("librdkafka")}


def consumer_settings(kafka: KafkaConfig, group_id: str) -> dict[str, Any]:
    """The pipeline's consumer: offsets committed by the source only (never automatically),
    only for what every targeted sink made durable."""
    return {
        **security.client_settings(kafka, "consumer"),
        **_common(),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
        # A rebalance moves only the partitions that change owner; the others keep flowing.
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 1_000,
        # Tansu answers a fetch only after fetch.wait.max.ms even with data waiting (500 ms by
        # default: 11k msg/s measured, 44k at 100 ms); a real broker answers at once anyway.
        "fetch.wait.max.ms": 100,
        # A topic the provisioner creates after the consumer started is seen soon.
        "topic.metadata.refresh.interval.ms": 10_000,
    }


def producer_settings(kafka: KafkaConfig) -> dict[str, Any]:
    """The dead-letter producer: acks and idempotence as configured."""
    return {**security.client_settings(kafka, "producer"), **_common(), "linger.ms": 0}


def data_topics(pipeline: PipelineConfig) -> Mapping[str, str]:
    """data topic -> source table (``schema.table``), as adapters/kafka/topics.py names them."""
    return {topics.table_topic(pipeline.topic_prefix, t): t for t in pipeline.source.tables}


def dead_letter_topic(topic: str, suffix: str) -> str:
    return topics.dlq_topic(topic, suffix)
