"""Composition of the Kinesis adapters from the configuration: their settings and the
constructors the adapter registry names. A record's data is one lane's changes as a cdc.v2
EventBatch (services/capture/payload.py, shared with Pub/Sub)."""

from __future__ import annotations

from adapters.config import PipelineConfig, PlatformConfig
from adapters.kinesis.dead_letters import KinesisDeadLetters
from adapters.kinesis.monitor import KinesisMonitor
from adapters.kinesis.provisioner import KinesisProvisioner
from adapters.kinesis.publisher import KinesisPublisher
from adapters.kinesis.settings import Backoff, KinesisSettings, stream_name
from adapters.kinesis.source import KinesisEventSource
from domain.ports import AckCallback, Provisioner
from services.capture.payload import ArrowBatchCodec


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
        dlq_headers=platform.dlq.include_headers,
        poll_interval_seconds=k.poll_interval_seconds,
        max_records_per_shard=k.max_records_per_shard,
        max_events_per_record=platform.wal_reader.batch_size,
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
        ArrowBatchCodec(),
        max_buffered_records=platform.max_buffered_messages,
    )


def build_kinesis_monitor(pipeline: PipelineConfig, platform: PlatformConfig) -> KinesisMonitor:
    return KinesisMonitor(
        kinesis_settings(pipeline, platform),
        interval_seconds=platform.lag_monitor_interval_seconds,
    )


class CaptureProvisioner:
    """What a kinesis pipeline creates: the capture's publication and slot on the source
    (the WAL's provisioner), then the streams and the lease table. Teardown in the same
    order: a slot still in use refuses the whole undeploy before a stream is deleted."""

    def __init__(self, wal: Provisioner, kinesis: KinesisProvisioner) -> None:
        self.wal = wal
        self.kinesis = kinesis

    async def provision(self) -> None:
        await self.wal.provision()
        await self.kinesis.provision()

    async def teardown(self, force: bool = False) -> list[str]:
        done = list(await self.wal.teardown(force=force))
        return done + list(await self.kinesis.teardown(force=force))


def build_kinesis_provisioner(
    pipeline: PipelineConfig, platform: PlatformConfig, wal: Provisioner
) -> CaptureProvisioner:
    return CaptureProvisioner(wal, KinesisProvisioner(kinesis_settings(pipeline, platform)))


def build_kinesis_publisher(
    pipeline: PipelineConfig, platform: PlatformConfig, on_ack: AckCallback
) -> KinesisPublisher:
    return KinesisPublisher(
        kinesis_settings(pipeline, platform),
        ArrowBatchCodec(),
        on_ack,
        max_in_flight=platform.ingest.max_in_flight_batches,
    )


def build_kinesis_dead_letters(
    pipeline: PipelineConfig, platform: PlatformConfig
) -> KinesisDeadLetters:
    """The DLQ streams as the error router of sinks that need one (the webhook sink), and
    `cdc dlq`'s store (removed markers in the lease table)."""
    return KinesisDeadLetters(kinesis_settings(pipeline, platform), ArrowBatchCodec())
