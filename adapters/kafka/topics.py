"""Names of a pipeline's Kafka topics (docs/kafka.md#topics).

Data topics are ``<topic_prefix>.<schema>.<table>`` for every source type (``<db>.<collection>``
for MongoDB, ``<database>.<table>`` for MySQL, whose schemas are databases); the SQL Server
connector's own ``<prefix>.<database>.<schema>.<table>`` is routed to that shape by the
connector config. A dead-letter topic is the data topic plus ``.<dlq.topic_suffix>``.
"""

from __future__ import annotations

from adapters.config import PipelineConfig, PlatformConfig

SCHEMA_HISTORY_PREFIX = "_cdc-schema-history"


def table_topic(topic_prefix: str, table: str) -> str:
    return f"{topic_prefix}.{table}"


def data_topics(pipeline: PipelineConfig) -> list[str]:
    return [table_topic(pipeline.topic_prefix, t) for t in pipeline.source.tables]


def dlq_topic(topic: str, suffix: str) -> str:
    return f"{topic}.{suffix}"


def dlq_topics(pipeline: PipelineConfig, platform: PlatformConfig) -> list[str]:
    if not platform.dlq.enabled:
        return []
    return [dlq_topic(t, platform.dlq.topic_suffix) for t in data_topics(pipeline)]


def schema_history_topic(pipeline: PipelineConfig) -> str:
    """The MySQL / SQL Server connector's DDL history: one partition, kept forever, one per
    pipeline (two connectors must never share one). The leading underscore keeps it apart
    from every ``<topic_prefix>.<schema>.<table>`` name."""
    return f"{SCHEMA_HISTORY_PREFIX}.{pipeline.pipeline_id}"


def needs_schema_history(pipeline: PipelineConfig) -> bool:
    return pipeline.source.source_type in ("mysql", "sqlserver")
