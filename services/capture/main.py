"""`cdc capture`: one pipeline's capture stage for transports fed by our WAL reader
(pubsub, kinesis). The WAL reader -> the ingest pump (services/ingest/service.py) -> the
transport's publisher Outlet (services/capture/publisher.py). The pump releases the slot's
LSN only for batches the publisher reported durable, i.e. acknowledged by the broker.

Every change goes to the publisher (one routing rule, every table and operation); the sinks'
routing happens in the ingest stage that reads the transport.
"""

from __future__ import annotations

import asyncio
import signal

import structlog

from adapters.config import PipelineConfig, PlatformConfig
from domain.health import Status
from domain.ports import DeliveryAck, Outlet
from domain.routing import Router, RoutingRule
from services import lifecycle, registry, security
from services.health_http import HealthState, serve_health
from services.ingest.service import IngestService
from services.registry import build_slot_monitor, build_wal_source

log = structlog.get_logger(__name__)

EXIT_PUBLISH_FAILED = 1  # restarted by `cdc run` / Kubernetes; the slot replays from its LSN


class CaptureNotAvailableError(RuntimeError):
    """The transport has no capture stage (direct reads the slot in the ingest; kafka uses
    Debezium)."""


def build_outlet(
    pipeline: PipelineConfig, platform: PlatformConfig, service: list[IngestService]
) -> Outlet:
    adapter = registry.TRANSPORTS[platform.transport_mode]
    if adapter.capture_outlet is None:
        raise CaptureNotAvailableError(
            f"transport_mode {platform.transport_mode} has no capture stage; `cdc capture`"
            f" serves {', '.join(n for n, t in registry.TRANSPORTS.items() if t.has_capture)}"
        )

    async def on_ack(outlet: str, ack: DeliveryAck) -> None:
        await service[0].on_ack(outlet, ack)

    return adapter.capture_outlet(pipeline, platform, on_ack)


async def provision(pipeline: PipelineConfig, platform: PlatformConfig) -> None:
    adapter = registry.TRANSPORTS[platform.transport_mode]
    if adapter.provisioner is not None:
        await adapter.provisioner(pipeline, platform).provision()


async def run_capture(
    pipeline: PipelineConfig, platform: PlatformConfig, http_port: int | None = None
) -> int:
    holder: list[IngestService] = []
    outlet = build_outlet(pipeline, platform, holder)
    # Before the first publish: a message published to a topic without its subscription
    # would be lost.
    await provision(pipeline, platform)
    router = Router([RoutingRule(sink_id=outlet.name)])
    service = IngestService(
        pipeline.pipeline_id,
        build_wal_source(pipeline, platform, capture=True),
        router,
        {outlet.name: outlet},
        platform.ingest.batch_max_events,
        drain_timeout_seconds=lifecycle.ingest_drain_seconds(platform.shutdown_timeout_seconds),
        monitor=build_slot_monitor(pipeline, platform),
    )
    holder.append(service)

    host = security.listen_host(platform)
    state = HealthState()
    port = http_port if http_port is not None else platform.health_port
    try:
        http = (
            serve_health(state, port, host, registry=service.metrics.registry)
            if platform.health_enabled or http_port is not None
            else None
        )
    except OSError as exc:
        raise lifecycle.StartupError(
            f"{'--http-port' if http_port else 'health_port'} {port}: cannot listen on"
            f" {host}:{port}: {exc.strerror or exc}"
        ) from None

    failed: list[str] = []

    async def watch() -> None:
        while True:
            try:
                snapshot = await service.health()
                state.update({**snapshot, "stage": "capture"})
                if outlet.health().status is Status.ERROR:
                    failed.append(str(outlet.health().detail.get("error", "")))
                    service.request_stop()
                    return
            except Exception as exc:  # never serve an old snapshot as if it were current
                state.update({"status": "error", "ready": False, "error": repr(exc)})
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    loop = asyncio.get_running_loop()
    watchdog: list[object] = []

    def request_stop() -> None:
        if not watchdog:
            budget = lifecycle.ingest_stop_seconds(platform.shutdown_timeout_seconds)
            watchdog.append(lifecycle.start_shutdown_watchdog("capture", budget))
        service.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    lifecycle.watch_parent(loop, request_stop)
    try:
        await service.run()
    finally:
        watcher.cancel()
        state.update({"status": "stopping", "ready": False})
        if http is not None:
            http.shutdown()
    if failed:
        log.error(
            "capture.stopped_on_publish_failure",
            error=failed[0],
            note="the slot's LSN stays before what was not published; a restart replays it",
        )
        return EXIT_PUBLISH_FAILED
    if service.unacked_at_stop:
        log.error("capture.drain_incomplete", unacked_batches=service.unacked_at_stop)
        return lifecycle.EXIT_DRAIN_INCOMPLETE
    return lifecycle.EXIT_OK
