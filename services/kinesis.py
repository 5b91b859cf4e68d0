"""Composition of the Kinesis adapters from the configuration: their settings, the record
codec (a record is one cdc.v2 EventBatch of one lane, services/wire.py) and the constructors
the adapter registry names."""

from __future__ import annotations

from collections.abc import Sequence

from adapters.config import PipelineConfig, PlatformConfig
from adapters.kinesis.monitor import KinesisMonitor
from adapters.kinesis.provisioner import KinesisProvisioner
from adapters.kinesis.settings import Backoff, KinesisSettings, stream_name
from adapters.kinesis.source import KinesisEventSource
from cdc_proto.v2 import events_pb2
from domain.events import SourceEvent
from services.wire import decode_batch, encode_batch


class WireRecordCodec:
    """A record's data is the lane's changes as one cdc.v2 EventBatch (Arrow blocks, the
    LSN position of every change), the format the sinks read."""

    def __init__(self, pipeline_id: str) -> None:
        self.pipeline_id = pipeline_id

    def encode(self, lane: str, events: Sequence[SourceEvent]) -> bytes:
        message = encode_batch(0, self.pipeline_id, lane, events)
        return bytes(message.SerializeToString())

    def decode(self, data: bytes) -> list[SourceEvent]:
        try:
            message = events_pb2.EventBatch.FromString(data)
        except Exception as exc:  # protobuf's DecodeError
            raise ValueError(f"not a cdc.v2 EventBatch: {exc}") from exc
        if not message.lanes:
            raise ValueError("not a cdc.v2 EventBatch: no lane")
        return list(decode_batch(message).events)


def kinesis_settings(pipeline: PipelineConfig, platform: PlatformConfig) -> KinesisSettings:
    k = platform.kinesis
    retry = platform.retry
    streams = {}
    for table in pipeline.source.tables:
        schema, _, name = table.rpartition(".")
        streams[table] = stream_name(pipeline.topic_prefix, schema or "public", name)
    return KinesisSettings(
        pipeline_id=pipeline.pipeline_id,
        streams=streams,
        shard_count=k.shard_count,
        lanes_per_table=k.shard_count,
        checkpoint_table=k.checkpoint_table_name,
        region=k.region,
        endpoint_url=str(k.endpoint_url).rstrip("/") if k.endpoint_url else None,
        dlq_suffix=platform.dlq.topic_suffix if platform.dlq.enabled else None,
        poll_interval_seconds=k.poll_interval_seconds,
        max_records_per_shard=k.max_records_per_shard,
        backoff=Backoff(
            initial_seconds=retry.initial_wait_seconds,
            max_seconds=retry.max_wait_seconds,
            multiplier=retry.multiplier,
            jitter=retry.jitter,
        ),
    )


def build_kinesis_source(pipeline: PipelineConfig, platform: PlatformConfig) -> KinesisEventSource:
    return KinesisEventSource(
        kinesis_settings(pipeline, platform),
        WireRecordCodec(pipeline.pipeline_id),
        max_buffered_records=platform.max_buffered_messages,
    )


def build_kinesis_monitor(pipeline: PipelineConfig, platform: PlatformConfig) -> KinesisMonitor:
    return KinesisMonitor(
        kinesis_settings(pipeline, platform),
        interval_seconds=platform.lag_monitor_interval_seconds,
    )


def build_kinesis_provisioner(
    pipeline: PipelineConfig, platform: PlatformConfig
) -> KinesisProvisioner:
    return KinesisProvisioner(kinesis_settings(pipeline, platform))
