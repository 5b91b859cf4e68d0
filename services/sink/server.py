"""`cdc sink`: one sink writer behind the Deliver stream, acking each batch once durable."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

import grpc
import structlog

from adapters.config import PipelineConfig, PlatformConfig
from cdc_proto.v1 import events_pb2, sink_pb2, sink_pb2_grpc
from domain.errors import CdcError
from domain.health import Status
from domain.ports import SinkWriter
from services import tracing
from services.grpc_health import add_health, set_status
from services.sink.container import SinkContainer
from services.wire import WireFormatError, decode_batch

log = structlog.get_logger(__name__)


class SinkServicer(sink_pb2_grpc.SinkServiceServicer):
    def __init__(self, writer: SinkWriter, sink_id: str) -> None:
        self.writer = writer
        self.sink_id = sink_id
        self._tracer = tracing.tracer("cdc.sink")
        # One writer, one order: concurrent streams (a reconnect racing the old stream)
        # must not interleave batches.
        self._lock = asyncio.Lock()

    async def Deliver(
        self, request_iterator: AsyncIterator[events_pb2.EventBatch], context: object
    ) -> AsyncIterator[sink_pb2.BatchAck]:
        async for message in request_iterator:
            yield await self._handle(message)

    async def _handle(self, message: events_pb2.EventBatch) -> sink_pb2.BatchAck:
        try:
            batch = decode_batch(message)
        except (WireFormatError, ValueError) as exc:
            log.error("sink.bad_batch", batch_id=message.batch_id, error=str(exc))
            return sink_pb2.BatchAck(
                batch_id=message.batch_id, status=sink_pb2.ACK_STATUS_REJECTED, error=str(exc)
            )
        parent = tracing.extract(message.trace_context)
        with self._tracer.start_as_current_span(
            "sink.write",
            context=parent,
            attributes={
                "cdc.sink_id": self.sink_id,
                "cdc.batch_id": message.batch_id,
                "cdc.events": len(batch.events),
            },
        ):
            async with self._lock:
                try:
                    result = await self.writer.write(batch)
                except CdcError as exc:
                    # Not written: the ingest service keeps the batch and resends it later.
                    log.error("sink.write_failed", batch_id=message.batch_id, error=str(exc))
                    return sink_pb2.BatchAck(
                        batch_id=message.batch_id,
                        status=sink_pb2.ACK_STATUS_REJECTED,
                        error=str(exc),
                    )
        return sink_pb2.BatchAck(
            batch_id=message.batch_id,
            status=sink_pb2.ACK_STATUS_WRITTEN,
            written=result.written,
            skipped=result.skipped,
            dead_lettered=result.dead_lettered,
        )


async def run_sink(
    pipeline: PipelineConfig, platform: PlatformConfig, sink_id: str, port: int
) -> int:
    sink = pipeline.sink(sink_id)
    container = SinkContainer(pipeline=pipeline, sink=sink)
    writer: SinkWriter = container.writer()
    tracing.setup_tracing(
        f"{platform.tracing.service_name_prefix}-sink-{sink_id}", platform.tracing.otlp_endpoint
    )
    await writer.start()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 256 << 20),
            ("grpc.max_send_message_length", 256 << 20),
        ]
    )
    sink_pb2_grpc.add_SinkServiceServicer_to_server(SinkServicer(writer, sink_id), server)
    health = add_health(server)
    bound = server.add_insecure_port(f"0.0.0.0:{port}")
    await server.start()
    log.info("sink.listening", sink_id=sink_id, port=bound)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def watch_health() -> None:
        while True:
            with contextlib.suppress(Exception):
                report = await writer.health()
                await set_status(health, report.status is not Status.ERROR, "cdc.v1.SinkService")
            await asyncio.sleep(1.0)

    watcher = asyncio.create_task(watch_health())
    await stop.wait()
    watcher.cancel()
    await set_status(health, False, "cdc.v1.SinkService")
    # Finish the batch in hand; an unacked batch is resent by the ingest service later.
    await server.stop(grace=5)
    await writer.stop()
    tracing.shutdown_tracing()
    log.info("sink.stopped", sink_id=sink_id)
    return 0
