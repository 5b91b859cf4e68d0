"""`cdc consume PIPELINE --table T`: print a table's changes from its Kafka topic, decoded,
one JSON object per line (or its dead letters with `--dead-letters`).

A debugging reader: it is assigned the topic's partitions directly (it never joins a
consumer group, so it cannot take partitions from the pipeline), its group id is its own
(``<the pipeline's group>.consume.<random>``, never the pipeline's) and it commits
nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

EXIT_CONFIG = 2


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "consume", help="print a table's changes from its Kafka topic (debugging reader)"
    )
    p.add_argument("pipeline", help="pipeline.yaml")
    p.add_argument("--platform-config", default=None, help="platform.yaml (default: built-in)")
    p.add_argument("--table", required=True, metavar="SCHEMA.TABLE")
    p.add_argument(
        "--from",
        dest="start",
        choices=("beginning", "end"),
        default="beginning",
        help="where to start in each partition (default: beginning)",
    )
    p.add_argument("--limit", type=int, default=0, help="stop after N messages (0: no limit)")
    p.add_argument(
        "--idle-exit",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="exit after this long without a message (0: follow forever)",
    )
    p.add_argument(
        "--dead-letters", action="store_true", help="read the table's dead-letter topic instead"
    )
    p.set_defaults(func=cmd_consume)


def _message_json(msg: Any, decoded: Any) -> dict[str, Any]:
    """One message as JSON: its change's row view (`events_of` of the typed block it makes:
    values as PostgreSQL text)."""
    from adapters.debezium.block_builder import build_blocks
    from adapters.debezium.envelope import EnvelopeError
    from domain.blocks import events_of

    out: dict[str, Any] = {
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
    }
    if decoded is None:
        out["tombstone"] = True
        return out
    built = build_blocks([decoded])
    if built.rejected:
        raise EnvelopeError(built.rejected[0][1])
    ((_, ev),) = events_of(built.blocks[0])
    columns = ev.table.column_names

    def row(values: Any) -> Any:
        if values is None:
            return None
        return {
            c: (v if isinstance(v, (str, type(None))) else repr(v))
            for c, v in zip(columns, values, strict=True)
        }

    out.update(op=ev.operation.value, key=ev.key, before=row(ev.before), after=row(ev.after))
    return out


def cmd_consume(args: argparse.Namespace) -> int:
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

    from adapters.config import load_pipeline, load_platform
    from adapters.debezium.envelope import EnvelopeError, table_of
    from adapters.kafka import clients
    from adapters.kafka.avro import SchemaRegistry, TopicDecoder

    platform = load_platform(args.platform_config)
    pipeline = load_pipeline(args.pipeline, platform=platform)
    if platform.transport_mode != "kafka":
        print(
            f"error: transport_mode is {platform.transport_mode}: `cdc consume` reads Kafka topics",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    topics = {table: topic for topic, table in clients.data_topics(pipeline).items()}
    topic = topics.get(args.table)
    if topic is None:
        print(
            f"error: --table {args.table} is not captured by pipeline {pipeline.pipeline_id}"
            f" (tables: {', '.join(sorted(topics))})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    data_topic = topic  # its `<topic>-key` subject gives a keyless message (a truncate) its key
    if args.dead_letters:
        topic = clients.dead_letter_topic(topic, platform.dlq.topic_suffix)
    group = f"{pipeline.effective_group_id(platform)}.consume.{uuid.uuid4().hex[:8]}"
    settings = clients.consumer_settings(platform.kafka, group)
    consumer = Consumer(settings)
    schema, name = table_of(args.table)
    decoder = TopicDecoder(
        SchemaRegistry(str(platform.kafka.schema_registry_url)),
        schema,
        name,
        pipeline.source.database,
        topic=data_topic,
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            print(f"error: topic {topic} does not exist", file=sys.stderr)
            return 1
        start = OFFSET_BEGINNING if args.start == "beginning" else OFFSET_END
        consumer.assign([TopicPartition(topic, p, start) for p in described.partitions])
        count = 0
        last = time.monotonic()
        while not args.limit or count < args.limit:
            msg = consumer.poll(0.5)
            if msg is None:
                if args.idle_exit and time.monotonic() - last > args.idle_exit:
                    break
                continue
            if msg.error() is not None:
                print(json.dumps({"error": str(msg.error())}), file=sys.stderr)
                continue
            last = time.monotonic()
            count += 1
            if args.dead_letters:
                headers = {
                    k: v.decode(errors="replace") if isinstance(v, bytes) else v
                    for k, v in list(msg.headers() or [])
                }
                line: dict[str, Any] = {
                    "topic": msg.topic(),
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "headers": headers,
                }
            else:
                try:
                    decoded = decoder.decode(msg.key(), msg.value(), msg.offset() or 0)
                    line = _message_json(msg, decoded.change)
                except EnvelopeError as exc:
                    line = {
                        "topic": msg.topic(),
                        "partition": msg.partition(),
                        "offset": msg.offset(),
                        "undecodable": str(exc),
                    }
            print(json.dumps(line, default=str), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0
