"""The ingest process's composition root: picks the EventSource (and the SourceMonitor that
watches it) for `transport_mode`."""

from __future__ import annotations

from typing import Any

from dependency_injector import containers, providers

from adapters.config import PipelineConfig, PlatformConfig
from adapters.postgres.slot_monitor import PostgresSlotMonitor
from adapters.postgres.wal_reader import PostgresWalSource, WalReaderSettings
from domain.events import Operation
from domain.routing import Router, RoutingRule


class TransportNotAvailableError(RuntimeError):
    """The transport is valid configuration but this build has no EventSource for it yet."""


def source_conninfo(pipeline: PipelineConfig) -> str:
    from psycopg.conninfo import make_conninfo

    s = pipeline.source
    return make_conninfo(
        host=s.host, port=s.port, dbname=s.database, user=s.username, password=s.password or None
    )


def build_wal_source(pipeline: PipelineConfig, platform: PlatformConfig) -> PostgresWalSource:
    s = pipeline.source
    wal = platform.wal_reader
    return PostgresWalSource(
        WalReaderSettings(
            conninfo=source_conninfo(pipeline),
            database=s.database,
            tables=tuple(s.tables),
            slot_name=pipeline.effective_slot_name(platform),
            publication_name=pipeline.effective_publication_name(platform),
            snapshot_mode=s.snapshot_mode,
            status_interval_seconds=wal.status_interval_seconds,
            max_chunk_events=max(platform.ingest.batch_max_events, wal.batch_size),
            max_chunk_delay_seconds=platform.ingest.batch_max_delay_ms / 1000,
            heartbeat_mode=s.heartbeat_mode,
            heartbeat_interval_seconds=s.heartbeat_interval_seconds,
            snapshot_chunk_size=s.snapshot_chunk_size,
            snapshot_parallelism=s.snapshot_parallelism,
            reconnect_initial_seconds=wal.reconnect_initial_seconds,
            reconnect_max_seconds=wal.reconnect_max_seconds,
        )
    )


def build_slot_monitor(pipeline: PipelineConfig, platform: PlatformConfig) -> PostgresSlotMonitor:
    return PostgresSlotMonitor(
        source_conninfo(pipeline),
        pipeline.effective_slot_name(platform),
        interval_seconds=platform.lag_monitor_interval_seconds,
        lag_degraded_bytes=platform.wal_reader.slot_lag_degraded_bytes,
    )


def _not_available(transport: str) -> Any:
    raise TransportNotAvailableError(
        f"transport_mode '{transport}' is valid configuration, but this release has no "
        "event source for it yet; use transport_mode: direct"
    )


def build_router(pipeline: PipelineConfig) -> Router:
    return Router(
        RoutingRule(
            sink_id=sink.sink_id,
            tables=tuple(sink.tables or ()),
            operations=frozenset(Operation(op) for op in (sink.operations or ())),
        )
        for sink in pipeline.enabled_sinks
    )


class IngestContainer(containers.DeclarativeContainer):
    pipeline = providers.Dependency(instance_of=PipelineConfig)
    platform = providers.Dependency(instance_of=PlatformConfig)

    event_source = providers.Selector(
        providers.Callable(lambda p: p.transport_mode, platform),
        direct=providers.Singleton(build_wal_source, pipeline, platform),
        kafka=providers.Callable(_not_available, "kafka"),
        pubsub=providers.Callable(_not_available, "pubsub"),
        kinesis=providers.Callable(_not_available, "kinesis"),
    )
    # Watches what the event source reads from; None where the transport has no monitor.
    source_monitor = providers.Selector(
        providers.Callable(lambda p: p.transport_mode, platform),
        direct=providers.Singleton(build_slot_monitor, pipeline, platform),
        kafka=providers.Object(None),
        pubsub=providers.Object(None),
        kinesis=providers.Object(None),
    )
    router = providers.Singleton(build_router, pipeline)
