"""How the registry (services/registry.py) builds the Pub/Sub transport's parts from the two
config files. google-cloud-pubsub is imported only when transport_mode is pubsub (extra
`gcp`), so the other transports run without it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapters.config import PipelineConfig, PlatformConfig
from domain.ports import AckCallback, Provisioner
from services.capture.payload import ArrowBatchCodec
from services.capture.publisher import LanePublisher, RetrySettings
from services.lifecycle import StartupError

if TYPE_CHECKING:
    from adapters.pubsub.dead_letters import PubSubDeadLetters
    from adapters.pubsub.monitor import PubSubMonitor
    from adapters.pubsub.naming import PipelineNames
    from adapters.pubsub.provisioner import PubSubProvisioner
    from adapters.pubsub.source import PubSubEventSource

# One EventSource per pipeline in a process: its monitor reads the same source's counts.
_SOURCES: dict[str, PubSubEventSource] = {}


def _require_library(platform: PlatformConfig) -> None:
    try:
        import google.cloud.pubsub_v1  # noqa: F401
    except ImportError:
        raise StartupError(
            "transport_mode pubsub needs google-cloud-pubsub: pip install 'cdc-platform[gcp]'"
        ) from None
    if platform.pubsub is not None and not platform.pubsub.ordering_enabled:
        raise StartupError(
            "pubsub.ordering_enabled: false is not supported: sinks keep the order of each"
            " lane (an ordering key) and skip a change at or before the last one applied, so"
            " changes delivered out of order could be skipped; set it to true"
        )


def names(pipeline: PipelineConfig, platform: PlatformConfig) -> PipelineNames:
    from adapters.pubsub.naming import PipelineNames

    assert platform.pubsub is not None and platform.pubsub.project_id  # config validation
    return PipelineNames.of(
        platform.pubsub.project_id,
        pipeline.topic_prefix,
        pipeline.pipeline_id,
        platform.dlq.topic_suffix,
    )


def build_provisioner(pipeline: PipelineConfig, platform: PlatformConfig) -> PubSubProvisioner:
    _require_library(platform)
    from adapters.pubsub.provisioner import (
        PubSubProvisioner,
        SubscriptionSettings,
        delivery_attempts,
    )

    ps = platform.pubsub
    assert ps is not None
    return PubSubProvisioner(
        names(pipeline, platform),
        SubscriptionSettings(
            ordered=ps.ordering_enabled,
            ack_deadline_seconds=ps.ack_deadline_seconds,
            dead_letter=platform.dlq.enabled,
            max_delivery_attempts=delivery_attempts(platform.dlq.max_retries),
        ),
    )


def build_outlet(
    pipeline: PipelineConfig, platform: PlatformConfig, on_ack: AckCallback
) -> LanePublisher:
    _require_library(platform)
    from adapters.pubsub.publisher import PublishSettings, PubSubTransport

    ps = platform.pubsub
    assert ps is not None
    transport = PubSubTransport(
        names(pipeline, platform).topic_path,
        PublishSettings(
            max_messages=ps.publish_max_messages,
            max_bytes=ps.publish_max_bytes,
            max_latency_seconds=ps.publish_max_latency_seconds,
            ordered=ps.ordering_enabled,
        ),
    )
    r = platform.retry
    return LanePublisher(
        transport,
        ArrowBatchCodec(),
        pipeline.pipeline_id,
        lanes=ps.lanes,
        max_changes_per_message=platform.wal_reader.batch_size,
        max_in_flight_batches=platform.ingest.max_in_flight_batches,
        on_ack=on_ack,
        retry=RetrySettings(
            r.max_attempts, r.initial_wait_seconds, r.max_wait_seconds, r.multiplier, r.jitter
        ),
    )


def build_source(pipeline: PipelineConfig, platform: PlatformConfig) -> PubSubEventSource:
    _require_library(platform)
    from adapters.pubsub.source import PubSubEventSource, SourceSettings

    cached = _SOURCES.get(pipeline.pipeline_id)
    if cached is not None:
        return cached
    ps = platform.pubsub
    assert ps is not None
    n = names(pipeline, platform)
    source = PubSubEventSource(
        SourceSettings(
            subscription_path=n.subscription_path,
            dlq_topic_path=n.dlq_topic_path if platform.dlq.enabled else None,
            dlq_include_attributes=platform.dlq.include_headers,
            max_outstanding_messages=ps.max_outstanding_messages,
            max_chunk_events=platform.ingest.batch_max_events,
            ack_deadline_seconds=ps.ack_deadline_seconds,
        ),
        ArrowBatchCodec(),
        provision=build_provisioner(pipeline, platform).provision,
    )
    _SOURCES[pipeline.pipeline_id] = source
    return source


def build_monitor(pipeline: PipelineConfig, platform: PlatformConfig) -> PubSubMonitor:
    from adapters.pubsub.monitor import PubSubMonitor

    n = names(pipeline, platform)
    return PubSubMonitor(
        build_source(pipeline, platform),
        n.project,
        n.subscription,
        interval_seconds=max(60.0, platform.lag_monitor_interval_seconds),
    )


class CaptureProvisioner:
    """What a pubsub pipeline creates: the capture's publication and slot on the source (the
    WAL's provisioner), then the topics and subscriptions. Teardown in the same order: a slot
    still in use refuses the whole undeploy before anything on Pub/Sub is deleted."""

    def __init__(self, wal: Provisioner, pubsub: PubSubProvisioner) -> None:
        self.wal = wal
        self.pubsub = pubsub

    async def provision(self) -> None:
        await self.wal.provision()
        await self.pubsub.provision()

    async def teardown(self, force: bool = False) -> list[str]:
        done = list(await self.wal.teardown(force=force))
        return done + list(await self.pubsub.teardown(force=force))


def build_capture_provisioner(
    pipeline: PipelineConfig, platform: PlatformConfig, wal: Provisioner
) -> CaptureProvisioner:
    return CaptureProvisioner(wal, build_provisioner(pipeline, platform))


def build_dead_letters(pipeline: PipelineConfig, platform: PlatformConfig) -> PubSubDeadLetters:
    """The DLQ topic as the error router of sinks that need one, and `cdc dlq`'s store."""
    _require_library(platform)
    from adapters.pubsub.dead_letters import PubSubDeadLetters

    n = names(pipeline, platform)
    return PubSubDeadLetters(
        pipeline.pipeline_id, n.dlq_topic_path, n.dlq_subscription_path, ArrowBatchCodec()
    )
