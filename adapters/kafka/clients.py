"""librdkafka settings of the consumer and the dead-letter producer, and the topic names.

The one place that turns platform.yaml's `kafka` section into client settings for this
package (security settings included), so that switching to the shared security module of
the provisioner's branch (adapters/kafka/security.py) is a change here only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from adapters.config import KafkaConfig, PipelineConfig

_SASL = {
    "sasl_plain": "PLAIN",
    "sasl_scram_256": "SCRAM-SHA-256",
    "sasl_scram_512": "SCRAM-SHA-512",
    "sasl_iam": "OAUTHBEARER",
    "sasl_oauthbearer": "OAUTHBEARER",
}


def _common(kafka: KafkaConfig) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers
        if isinstance(kafka.bootstrap_servers, str)
        else ",".join(kafka.bootstrap_servers),
        "security.protocol": kafka.security_protocol.lower(),
        # librdkafka's own log lines go through logging (the process's log format), not
        # straight to stderr.
        "logger": logging.getLogger("librdkafka"),
    }
    mechanism = _SASL.get(kafka.auth_mechanism)
    if mechanism is not None:
        settings["sasl.mechanism"] = mechanism
        if kafka.sasl_username is not None:
            settings["sasl.username"] = kafka.sasl_username
            settings["sasl.password"] = kafka.sasl_password or ""
    return settings


def consumer_settings(kafka: KafkaConfig, group_id: str) -> dict[str, Any]:
    """The pipeline's consumer: offsets committed by the source only (never automatically),
    only for what every targeted sink made durable."""
    return {
        **_common(kafka),
        "group.id": group_id,
        "auto.offset.reset": kafka.auto_offset_reset,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
        # A rebalance moves only the partitions that change owner; the others keep flowing.
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 1_000,
    }


def producer_settings(kafka: KafkaConfig) -> dict[str, Any]:
    """The dead-letter producer: acks and idempotence as configured."""
    return {
        **_common(kafka),
        "acks": kafka.acks,
        "enable.idempotence": kafka.enable_idempotence,
        "linger.ms": 0,
    }


def data_topics(pipeline: PipelineConfig) -> Mapping[str, str]:
    """topic -> source table (``schema.table``): the topics Debezium writes a table's changes
    to, ``<topic_prefix>.<schema>.<table>`` (SQL Server: ``<prefix>.<database>.<schema>.<table>``,
    Debezium's naming for that connector)."""
    source = pipeline.source
    out: dict[str, str] = {}
    for table in source.tables:
        if source.source_type == "sqlserver":
            out[f"{pipeline.topic_prefix}.{source.database}.{table}"] = table
        else:
            out[f"{pipeline.topic_prefix}.{table}"] = table
    return out


def dead_letter_topic(topic: str, suffix: str) -> str:
    return f"{topic}.{suffix}"


def group_id(kafka: KafkaConfig, pipeline: PipelineConfig) -> str:
    """The pipeline's consumer group: the configured group id, per pipeline (pipelines that
    share a platform.yaml must not share a group: they would split each other's partitions)."""
    return f"{kafka.group_id}.{pipeline.pipeline_id}"
