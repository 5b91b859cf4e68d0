"""`cdc sink`: one sink writer behind the Deliver stream, acking each batch once durable."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from adapters.config import PipelineConfig, PlatformConfig
from cdc_proto.v1 import sink_pb2_grpc as v1_sink_pb2_grpc
from cdc_proto.v2 import events_pb2, sink_pb2, sink_pb2_grpc
from domain.errors import CdcError, SinkHaltedError
from domain.health import Status
from domain.ports import Guarantee, SinkBatch, SinkWriter
from services import lifecycle, security, tracing
from services.grpc_health import add_health, set_status
from services.health_http import HealthState, serve_health
from services.metrics import SinkMetrics
from services.sink.container import AVAILABLE_SINK_TYPES, SinkContainer
from services.wire import WIRE_VERSION, WireFormatError, decode_batch, wire_version_mismatch

log = structlog.get_logger(__name__)

# Batches read and decoded ahead of the one being written (per stream). The ingest service
# bounds what is in flight anyway (`max_in_flight_batches`).
_DECODE_AHEAD = 2
_Decoded = tuple[events_pb2.EventBatch, SinkBatch | None, str | None]


_GUARANTEES = {
    Guarantee.EXACTLY_ONCE_EFFECT: sink_pb2.GUARANTEE_EXACTLY_ONCE_EFFECT,
    Guarantee.AT_LEAST_ONCE_IDEMPOTENCY_KEY: sink_pb2.GUARANTEE_AT_LEAST_ONCE_IDEMPOTENCY_KEY,
}


class SinkServicer(sink_pb2_grpc.SinkServiceServicer):
    def __init__(
        self,
        writer: SinkWriter,
        sink_id: str,
        metrics: SinkMetrics,
        sink_type: str = "",
        on_halt: Callable[[str], None] | None = None,
    ) -> None:
        self.writer = writer
        self.on_halt = on_halt
        self.sink_id = sink_id
        self.sink_type = sink_type
        self.metrics = metrics
        self._tracer = tracing.tracer("cdc.sink")
        # One writer, one order: concurrent streams (a reconnect racing the old stream)
        # must not interleave batches.
        self._lock = asyncio.Lock()
        self._buffered = False  # the writer accepted a batch without making it durable

    async def _flushed(self) -> sink_pb2.BatchAck:
        async with self._lock:
            positions = await self.writer.flush()
        self._buffered = False
        return sink_pb2.BatchAck(
            batch_id=0,
            status=sink_pb2.ACK_STATUS_WRITTEN,
            durable=True,
            durable_positions=[
                sink_pb2.LanePosition(lane=lane, position=p.major, sequence=p.minor)
                for lane, p in positions.items()
            ],
        )

    async def Describe(
        self, request: sink_pb2.DescribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sink_pb2.DescribeReply:
        """The handshake: an ingest of another wire version is refused, by name."""
        if request.wire_version != WIRE_VERSION:
            message = wire_version_mismatch(WIRE_VERSION, request.wire_version, "sink")
            log.error("sink.wire_version_mismatch", sink_id=self.sink_id, error=message)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
        guarantee = getattr(self.writer, "guarantee", Guarantee.EXACTLY_ONCE_EFFECT)
        return sink_pb2.DescribeReply(
            wire_version=WIRE_VERSION,
            sink_id=self.sink_id,
            sink_type=self.sink_type,
            guarantee=_GUARANTEES.get(guarantee, sink_pb2.GUARANTEE_UNSPECIFIED),
        )

    async def Deliver(
        self, request_iterator: AsyncIterator[events_pb2.EventBatch], context: object
    ) -> AsyncIterator[sink_pb2.BatchAck]:
        """Acks in order, one per batch. The next batches are read and decoded while the
        current one is written (the writer mostly waits on the destination then); writes
        stay one at a time, in stream order."""
        decoded: asyncio.Queue[_Decoded | None] = asyncio.Queue(maxsize=_DECODE_AHEAD)
        reader = asyncio.create_task(self._read_ahead(request_iterator, decoded))
        rejected: str | None = None
        try:
            while True:
                item = await decoded.get()
                if item is None:
                    break
                message, batch, error = item
                if rejected is not None:
                    # A batch of this stream was not written: writing later ones would
                    # apply changes past a gap; the ingest service resends them all.
                    self.metrics.rejected()
                    yield _rejected(message.batch_id, rejected)
                    continue
                in_flight = self.metrics.in_flight.labels(self.metrics.pipeline, self.sink_id)
                in_flight.inc()
                try:
                    ack = await self._handle(message, batch, error)
                    if ack.status != sink_pb2.ACK_STATUS_WRITTEN:
                        rejected = f"not written: batch {message.batch_id} before it was rejected"
                        self.metrics.rejected()
                    yield ack
                finally:
                    in_flight.dec()
                if ack.status == sink_pb2.ACK_STATUS_WRITTEN and not ack.durable:
                    self._buffered = True
                elif ack.status == sink_pb2.ACK_STATUS_WRITTEN and self._buffered:
                    # The writer committed what it had buffered with this batch: release
                    # the earlier accepted batches too (its flush now commits nothing).
                    yield await self._flushed()
                if self._buffered and decoded.empty():
                    # A writer that buffers: make what it accepted durable while the stream
                    # is idle, and say up to where (batch_id 0: not about one batch).
                    try:
                        flushed = await self._flushed()
                    except CdcError as exc:
                        # Not durable: the ingest keeps every unacked batch and resends it.
                        log.error("sink.flush_failed", error=str(exc))
                        if isinstance(exc, SinkHaltedError) and self.on_halt is not None:
                            self.on_halt(str(exc))
                        self.metrics.rejected()
                        rejected = f"not written: flush failed: {exc}"
                        yield _rejected(0, str(exc))
                        continue
                    yield flushed
            await reader  # done; a broken request stream propagates
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    @staticmethod
    async def _read_ahead(
        request_iterator: AsyncIterator[events_pb2.EventBatch],
        decoded: asyncio.Queue[_Decoded | None],
    ) -> None:
        try:
            async for message in request_iterator:
                try:
                    item: _Decoded = (message, decode_batch(message), None)
                except (WireFormatError, ValueError) as exc:
                    item = (message, None, str(exc))
                await decoded.put(item)
        except asyncio.CancelledError:
            raise
        except BaseException:
            await decoded.put(None)  # the writer loop then re-raises this through result()
            raise
        await decoded.put(None)

    async def _handle(
        self, message: events_pb2.EventBatch, batch: SinkBatch | None, error: str | None
    ) -> sink_pb2.BatchAck:
        if batch is None:
            log.error("sink.bad_batch", batch_id=message.batch_id, error=error)
            return _rejected(message.batch_id, error or "undecodable batch")
        parent = tracing.extract(message.trace_context)
        with self._tracer.start_as_current_span(
            "sink.write",
            context=parent,
            attributes={
                "cdc.sink_id": self.sink_id,
                "cdc.batch_id": message.batch_id,
                "cdc.events": len(batch),
            },
        ):
            async with self._lock:
                started = time.monotonic()
                try:
                    result = await self.writer.write(batch)
                except SinkHaltedError as exc:
                    log.error("sink.halted", batch_id=message.batch_id, error=str(exc))
                    if self.on_halt is not None:
                        self.on_halt(str(exc))
                    return _rejected(message.batch_id, str(exc))
                except CdcError as exc:
                    # Not written: the ingest service keeps the batch and resends it later.
                    log.error("sink.write_failed", batch_id=message.batch_id, error=str(exc))
                    return _rejected(message.batch_id, str(exc))
                self.metrics.written_batch(
                    batch,
                    result.skipped,
                    result.dead_lettered,
                    time.monotonic() - started,
                    time.time_ns() // 1000,
                )
        return sink_pb2.BatchAck(
            batch_id=message.batch_id,
            status=sink_pb2.ACK_STATUS_WRITTEN,
            written=result.written,
            skipped=result.skipped,
            dead_lettered=result.dead_lettered,
            durable=result.durable,
        )


class RefuseOlderWire(v1_sink_pb2_grpc.SinkServiceServicer):
    """Answers an ingest of the previous wire version (cdc.v1) with a clear refusal instead
    of an UNIMPLEMENTED that says nothing about versions."""

    def __init__(self, sink_id: str) -> None:
        self.sink_id = sink_id

    async def Deliver(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        message = wire_version_mismatch(WIRE_VERSION, "cdc.v1", "sink")
        log.error("sink.wire_version_mismatch", sink_id=self.sink_id, error=message)
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
        yield  # pragma: no cover  (abort raises)


def _rejected(batch_id: int, error: str) -> sink_pb2.BatchAck:
    return sink_pb2.BatchAck(batch_id=batch_id, status=sink_pb2.ACK_STATUS_REJECTED, error=error)


async def run_sink(
    pipeline: PipelineConfig,
    platform: PlatformConfig,
    sink_id: str,
    port: int,
    http_port: int | None = None,
) -> int:
    sink = pipeline.sink(sink_id)
    # Before anything connects: a bad listen host or certificate file stops the start.
    host = security.listen_host(platform)
    credentials = security.server_credentials(platform.grpc_tls)
    index = pipeline.sinks.index(sink)
    if sink.sink_type not in AVAILABLE_SINK_TYPES:
        raise lifecycle.StartupError(
            f"sinks[{index}].sink_type: '{sink.sink_type}' (sink '{sink_id}') has no writer in "
            f"this release; available: {', '.join(AVAILABLE_SINK_TYPES)}"
        )
    container = SinkContainer(pipeline=pipeline, sink=sink, platform=platform)
    writer: SinkWriter = container.writer()
    tracing.setup_tracing(
        f"{platform.tracing.service_name_prefix}-sink-{sink_id}", platform.tracing.otlp_endpoint
    )
    await writer.start()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 256 << 20),
            ("grpc.max_send_message_length", 256 << 20),
            # The ingest pings every 10 s to notice a half-open connection
            # (services/ingest/sink_channel.py KEEPALIVE_OPTIONS): allow it, or the server
            # would answer with GOAWAY (too_many_pings) and drop the stream.
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    )
    metrics = SinkMetrics(pipeline.pipeline_id, sink_id)
    stop = asyncio.Event()
    halted: list[str] = []

    def halt(reason: str) -> None:
        # Exit 2 afterwards: `cdc run` does not restart a stage that would fail the same way.
        halted.append(reason)
        stop.set()

    sink_pb2_grpc.add_SinkServiceServicer_to_server(
        SinkServicer(writer, sink_id, metrics, sink.sink_type, on_halt=halt), server
    )
    v1_sink_pb2_grpc.add_SinkServiceServicer_to_server(RefuseOlderWire(sink_id), server)
    health = add_health(server)
    address = security.grpc_address(host, port)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:
        await writer.stop()
        raise lifecycle.StartupError(
            f"--port {port}: cannot listen on {address} (address already in use?)"
        ) from None
    await server.start()
    log.info("sink.listening", sink_id=sink_id, host=host, port=bound, tls=credentials is not None)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def orphaned() -> None:
        log.warning("sink.orphaned", sink_id=sink_id, reason="the supervising `cdc run` is gone")
        stop.set()

    lifecycle.watch_parent(loop, orphaned)

    # /healthz, /readyz (the destination's health) and /metrics (this sink's registry).
    state = HealthState()
    try:
        http = None if http_port is None else serve_health(state, http_port, host, metrics.registry)
    except OSError as exc:
        await server.stop(grace=None)
        await writer.stop()
        raise lifecycle.StartupError(
            f"--http-port {http_port}: cannot listen on {host}:{http_port}: {exc.strerror or exc}"
        ) from None

    async def watch_health() -> None:
        while True:
            with contextlib.suppress(Exception):
                report = await writer.health()
                ready = report.status is not Status.ERROR
                await set_status(health, ready, "cdc.v2.SinkService")
                metrics.ready.labels(pipeline.pipeline_id, sink_id).set(ready)
                metrics.writer_retries(int(getattr(writer, "retries", 0)))
                state.update(
                    {
                        "status": report.status.value,
                        "ready": ready,
                        "pipeline_id": pipeline.pipeline_id,
                        "sink_id": sink_id,
                        "components": {report.name: report.as_dict()},
                    }
                )
            await asyncio.sleep(1.0)

    watcher = asyncio.create_task(watch_health())
    await stop.wait()
    # Finish the batch in hand; an unacked batch is resent by the ingest service later.
    # All within this stage's part of the shutdown budget (services/lifecycle.py), which a
    # watchdog thread enforces whatever the stop hangs on.
    budget = lifecycle.sink_stop_seconds(platform.shutdown_timeout_seconds)
    lifecycle.start_shutdown_watchdog(f"sink:{sink_id}", max(budget, 1.5))
    watcher.cancel()
    state.update({"status": "stopping", "ready": False, "sink_id": sink_id})
    await set_status(health, False, "cdc.v2.SinkService")
    await server.stop(grace=max(0.5, budget - 1.5))
    try:
        await asyncio.wait_for(writer.stop(), timeout=1.0)
    except TimeoutError:
        log.warning("sink.writer_stop_timeout", sink_id=sink_id)
    if http is not None:
        http.shutdown()
    tracing.shutdown_tracing()
    log.info("sink.stopped", sink_id=sink_id)
    if halted:
        log.error("sink.halted_exit", sink_id=sink_id, reason=halted[0])
        return 2
    return 0
