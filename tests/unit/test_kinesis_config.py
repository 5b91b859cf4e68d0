"""transport_mode kinesis in the registry: accepted with the settings it reads, refused with
one it does not, and those settings reach the adapters (services/kinesis.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from adapters.config import PipelineConfig, PlatformConfig
from adapters.kinesis.monitor import KinesisMonitor
from adapters.kinesis.provisioner import KinesisProvisioner
from adapters.kinesis.publisher import KinesisPublisher
from adapters.kinesis.settings import KinesisSettings
from adapters.kinesis.source import KinesisEventSource
from adapters.postgres.source.provisioner import PostgresProvisioner
from domain.events import Column, Operation, Position, TableSchema
from domain.ports import OutboundBatch
from services import registry
from services.capture.payload import ArrowBatchCodec
from services.kinesis import CaptureProvisioner, kinesis_settings
from tests.support.arrow_chunks import Change, block_chunk

PIPELINE = {
    "pipeline_id": "orders",
    "topic_prefix": "shop",
    "source": {"database": "shop", "tables": ["public.orders", "sales.order_items"]},
    "sinks": [{"sink_id": "replica", "sink_type": "postgres", "postgres": {"database": "r"}}],
}
PLATFORM: dict[str, Any] = {
    "transport_mode": "kinesis",
    "kinesis": {
        "region": "eu-west-1",
        "shard_count": 4,
        "checkpoint_table_name": "leases",
        "poll_interval_seconds": 0.5,
        "max_records_per_shard": 250,
        "endpoint_url": "http://127.0.0.1:4566",
    },
    "dlq": {"enabled": True, "topic_suffix": "dead"},
    "retry": {"initial_wait_seconds": 0.5, "max_wait_seconds": 8, "multiplier": 3, "jitter": False},
    "max_buffered_messages": 321,
    "wal_reader": {"batch_size": 50, "batch_timeout_seconds": 0.3},
}


def test_kinesis_is_available_with_every_setting_it_reads() -> None:
    pipeline = PipelineConfig.model_validate(PIPELINE)
    platform = PlatformConfig.model_validate(PLATFORM)
    assert not registry.check(pipeline, platform)
    entry = registry.TRANSPORTS["kinesis"]
    assert entry.available and entry.has_capture and entry.provisioner is not None


def test_a_setting_kinesis_does_not_read_is_refused() -> None:
    pipeline = PipelineConfig.model_validate(PIPELINE)
    platform = PlatformConfig.model_validate({**PLATFORM, "schema_monitor_interval_seconds": 5})
    found = registry.check(pipeline, platform)
    assert [loc for loc, _ in found.platform] == [("schema_monitor_interval_seconds",)]


def test_the_settings_reach_the_adapters() -> None:
    pipeline = PipelineConfig.model_validate(PIPELINE)
    platform = PlatformConfig.model_validate(PLATFORM)
    s = kinesis_settings(pipeline, platform)
    assert s.streams == {
        "public.orders": "shop-public-orders",
        "sales.order_items": "shop-sales-order_items",
    }
    assert s.dlq_stream("shop-public-orders") == "shop-public-orders-dead"
    assert (s.shard_count, s.lanes_per_table, s.checkpoint_table) == (4, 4, "leases")
    assert (s.region, s.endpoint_url) == ("eu-west-1", "http://127.0.0.1:4566")
    assert (s.poll_interval_seconds, s.max_records_per_shard, s.max_events_per_record) == (
        0.5,
        250,
        50,
    )
    assert (s.backoff.initial_seconds, s.backoff.max_seconds, s.backoff.multiplier) == (0.5, 8, 3)
    assert s.backoff.jitter is False
    off = PlatformConfig.model_validate({**PLATFORM, "dlq": {"enabled": False}})
    assert kinesis_settings(pipeline, off).dlq_stream("x") is None


def test_the_registry_builds_the_kinesis_adapters_without_connecting() -> None:
    pipeline = PipelineConfig.model_validate(PIPELINE)
    platform = PlatformConfig.model_validate(PLATFORM)
    entry = registry.TRANSPORTS["kinesis"]
    assert entry.event_source is not None and entry.source_monitor is not None
    assert entry.capture_outlet is not None and entry.provisioner is not None
    assert isinstance(entry.event_source(pipeline, platform), KinesisEventSource)
    assert isinstance(entry.source_monitor(pipeline, platform), KinesisMonitor)
    provisioner = entry.provisioner(pipeline, platform)
    assert isinstance(provisioner, CaptureProvisioner)
    assert isinstance(provisioner.wal, PostgresProvisioner)
    assert isinstance(provisioner.kinesis, KinesisProvisioner)

    async def on_ack(outlet: str, ack: Any) -> None:
        pass

    assert isinstance(entry.capture_outlet(pipeline, platform, on_ack), KinesisPublisher)


def test_millis_behind_latest_per_shard_becomes_a_gauge() -> None:
    from services.metrics import IngestMetrics

    metrics = IngestMetrics("orders")
    shards = {
        "s/shardId-0": {"millis_behind_latest": 1500, "owner": "w1"},
        "s/shardId-1": {"millis_behind_latest": None, "owner": None},
    }
    metrics.slot_reading({"shards": shards, "max_millis_behind_latest": 1500})
    value = metrics.registry.get_sample_value(
        "cdc_source_millis_behind_latest", {"pipeline": "orders", "shard": "s/shardId-0"}
    )
    assert value == 1500
    unknown = metrics.registry.get_sample_value(
        "cdc_source_millis_behind_latest", {"pipeline": "orders", "shard": "s/shardId-1"}
    )
    assert unknown is None  # not read yet: no sample rather than a made-up 0


def test_the_kinesis_publisher_refuses_a_batch_of_change_blocks() -> None:
    """It publishes events (fed by the WAL reader): a batch of blocks has none, and acking it
    as published would lose its changes."""
    table = TableSchema("s", "t", (Column("id", 0, "bigint", True, "int64"),))
    blocks = block_chunk("a", [Change(table, Operation.CREATE, Position(1), (1,))], 1).blocks

    async def on_ack(outlet: str, ack: object) -> None:
        raise AssertionError("a refused batch is not acked")

    publisher = KinesisPublisher(
        KinesisSettings("p", {"s.t": "stream"}), ArrowBatchCodec(), on_ack, kinesis_client=object()
    )
    with pytest.raises(ValueError, match="carries change blocks"):
        asyncio.run(publisher.send(OutboundBatch(1, "p", ("slot",), [], blocks=blocks)))
    assert publisher.unacked == 0
