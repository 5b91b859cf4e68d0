"""`cdc ingest`: one pipeline's ingest stage as a process."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping

import grpc
import structlog

from adapters.config import PipelineConfig, PlatformConfig
from services import lifecycle, security, tracing
from services.grpc_health import add_health, set_status
from services.health_http import HealthState, serve_health
from services.ingest.container import IngestContainer
from services.ingest.service import IngestService
from services.ingest.sink_channel import SinkChannel

log = structlog.get_logger(__name__)


async def run_ingest(
    pipeline: PipelineConfig,
    platform: PlatformConfig,
    sink_endpoints: Mapping[str, str],
    grpc_port: int | None = None,
    sink_http_endpoints: Mapping[str, str] | None = None,
) -> int:
    container = IngestContainer(pipeline=pipeline, platform=platform)
    source = container.event_source()
    monitor = container.source_monitor()
    router = container.router()
    missing = [s for s in router.sink_ids if s not in sink_endpoints]
    if missing:
        raise lifecycle.StartupError(
            f"no --sink-endpoint (or CDC_SINK_ENDPOINTS) for sink(s): {', '.join(missing)}"
        )
    tracing.setup_tracing(
        f"{platform.tracing.service_name_prefix}-ingest", platform.tracing.otlp_endpoint
    )

    host = security.listen_host(platform)
    credentials = security.channel_credentials(platform.grpc_tls)
    service: IngestService
    channels = {
        sink_id: SinkChannel(
            sink_id,
            sink_endpoints[sink_id],
            platform.ingest.max_in_flight_batches,
            on_ack=lambda s, a: service.on_ack(s, a),
            credentials=credentials,
            options=security.channel_options(platform.grpc_tls),
            ack_timeout=platform.ingest.ack_timeout_seconds,
        )
        for sink_id in router.sink_ids
    }
    service = IngestService(
        pipeline.pipeline_id,
        source,
        router,
        channels,
        platform.ingest.batch_max_events,
        drain_timeout_seconds=lifecycle.ingest_drain_seconds(platform.shutdown_timeout_seconds),
        monitor=monitor,
    )

    server = grpc.aio.server()
    health_servicer = add_health(server)
    # Plaintext: this server answers only grpc.health.v1 (Kubernetes probes cannot do TLS).
    port = grpc_port or platform.ingest.grpc_port
    try:
        server.add_insecure_port(security.grpc_address(host, port))
    except RuntimeError:
        setting = "--grpc-port" if grpc_port else "ingest.grpc_port"
        raise lifecycle.StartupError(
            f"{setting} {port}: cannot listen on {host}:{port} (address already in use?)"
        ) from None
    await server.start()
    await set_status(health_servicer, True, "cdc.ingest")

    state = HealthState()
    try:
        http = (
            serve_health(state, platform.health_port, host, registry=service.metrics.registry)
            if platform.health_enabled
            else None
        )
    except OSError as exc:
        await server.stop(grace=None)
        raise lifecycle.StartupError(
            f"health_port {platform.health_port}: cannot listen on {host}:"
            f"{platform.health_port}: {exc.strerror or exc}"
        ) from None
    # Where each sink serves its /metrics and /readyz, for `cdc status` (services/status.py).
    sink_http = {"sink_http_endpoints": dict(sink_http_endpoints or {})}

    async def refresh_health() -> None:
        while True:
            try:
                state.update({**await service.health(), **sink_http})
            except Exception as exc:  # never serve an old snapshot as if it were current
                state.update({"status": "error", "ready": False, "error": repr(exc)})
            await asyncio.sleep(1.0)

    refresher = asyncio.create_task(refresh_health())
    loop = asyncio.get_running_loop()
    watchdog: list[object] = []

    def request_stop() -> None:
        # Last resort: whatever the stop hangs on, the process ends within its budget.
        if not watchdog:
            budget = lifecycle.ingest_stop_seconds(platform.shutdown_timeout_seconds)
            watchdog.append(lifecycle.start_shutdown_watchdog("ingest", budget))
        service.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)

    def orphaned() -> None:
        log.warning("ingest.orphaned", reason="the supervising `cdc run` is gone; stopping")
        request_stop()

    lifecycle.watch_parent(loop, orphaned)
    try:
        await service.run()
    finally:
        refresher.cancel()
        state.update({"status": "stopping", "ready": False})
        if http is not None:
            http.shutdown()
        await server.stop(grace=1)
        tracing.shutdown_tracing()
    if service.unacked_at_stop:
        log.error(
            "ingest.drain_incomplete",
            unacked_batches=service.unacked_at_stop,
            drain_timeout_seconds=service.drain_timeout_seconds,
            note="not confirmed to the source: redelivered on the next start, nothing lost",
        )
        return lifecycle.EXIT_DRAIN_INCOMPLETE
    return lifecycle.EXIT_OK
