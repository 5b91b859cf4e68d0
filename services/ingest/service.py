"""The ingest pump: source lanes -> routed batches -> outlets -> acks released in order.

One pump serves `cdc ingest` (outlets: the sink services' gRPC streams) and a capture stage
that publishes to a broker (outlets: a Pub/Sub or Kinesis publisher): it depends only on
the `EventSource` and `Outlet` ports."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

import structlog

from domain.commit_tracker import CommitTracker
from domain.events import SchemaChange, SourceEvent
from domain.health import ComponentHealth, Status, overall
from domain.ports import (
    DeliveryAck,
    EventSource,
    OutboundBatch,
    Outlet,
    SourceChunk,
    SourceMonitor,
)
from domain.routing import Router
from services import tracing
from services.metrics import IngestMetrics

log = structlog.get_logger(__name__)


class IngestService:
    def __init__(
        self,
        pipeline_id: str,
        source: EventSource,
        router: Router,
        channels: Mapping[str, Outlet],
        batch_max_events: int,
        drain_timeout_seconds: float = 30.0,
        monitor: SourceMonitor | None = None,
        metrics: IngestMetrics | None = None,
    ) -> None:
        self.pipeline_id = pipeline_id
        self.source = source
        self.router = router
        self.channels = dict(channels)
        self.batch_max_events = batch_max_events
        self.drain_timeout_seconds = drain_timeout_seconds
        self.monitor = monitor
        self.tracker: CommitTracker[Any] = CommitTracker()
        self._next_batch_id = int(time.time() * 1000) << 16  # unique across restarts
        self._commit_lock = asyncio.Lock()
        # (batch, sink) -> (first send, monotonic; source commit time of its newest change, us)
        self._sent_at: dict[tuple[int, str], tuple[float, int]] = {}
        self.metrics = metrics if metrics is not None else IngestMetrics(pipeline_id)
        self._stop = asyncio.Event()
        # Batches still unacked when the drain ended (0: it completed); set by _shutdown.
        self.unacked_at_stop = 0
        self._tracer = tracing.tracer("cdc.ingest")
        self.events_read = 0
        self.started_at = time.monotonic()

    async def run(self) -> None:
        # The source retries while its database is unreachable; a stop request must not
        # wait for it.
        starting = asyncio.create_task(self.source.start(), name="source-start")
        stopper = asyncio.create_task(self._stop.wait())
        await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await self.source.stop()
            log.info("ingest.stopped", events_read=0)
            return
        starting.result()
        # Started once the source has created what it watches (the slot).
        if self.monitor is not None:
            await self.monitor.start()
        try:
            for channel in self.channels.values():
                channel.start()
            reader = asyncio.create_task(self._read_loop(), name="ingest-read")
            stopper = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                stopper.cancel()
                reader.result()  # a crash of the read loop propagates
            else:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        except BaseException:
            if self.monitor is not None:
                await self.monitor.stop()
            raise
        await self._shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    async def _shutdown(self) -> None:
        log.info("ingest.draining", unacked=self.tracker.pending_count())
        # One budget for all sinks together, not one per sink.
        deadline = time.monotonic() + self.drain_timeout_seconds
        for channel in self.channels.values():
            if not await channel.drain(max(0.0, deadline - time.monotonic())):
                log.warning("ingest.drain_timeout", sink=channel.name, unacked=channel.unacked)
        self.unacked_at_stop = sum(c.unacked for c in self.channels.values())
        await self._commit_ready()
        for channel in self.channels.values():
            await channel.stop()
        if self.monitor is not None:
            await self.monitor.stop()
        await self.source.stop()
        log.info("ingest.stopped", events_read=self.events_read)

    async def _read_loop(self) -> None:
        async for chunk in self.source.chunks():
            await self._dispatch(chunk)

    async def _dispatch(self, chunk: SourceChunk) -> None:
        if chunk.revoked:
            dropped = self.tracker.revoke(chunk.revoked)
            log.info("ingest.lanes_revoked", lanes=sorted(chunk.revoked), abandoned=dropped)
        for change in chunk.schema_changes:
            self._schema_changed(change)
        events = chunk.events
        self.events_read += len(events)
        self.metrics.count_read(events)
        size = self.batch_max_events
        if not events:
            await self._send(chunk.lane, [], chunk.ack)
            return
        for start in range(0, len(events), size):
            part = events[start : start + size]
            last = start + size >= len(events)
            await self._send(chunk.lane, part, chunk.ack if last else None)

    def _schema_changed(self, change: SchemaChange) -> None:
        if not change.is_change:  # a table seen for the first time in this process
            return
        table = change.current.qualified_name
        self.metrics.schema_changed(table)
        log.info(
            "schema.version_changed",
            pipeline_id=self.pipeline_id,
            table=table,
            added=list(change.added),
            dropped=list(change.dropped),
            retyped=list(change.retyped),
        )

    async def _send(self, lane: str, events: list[SourceEvent], handle: Any) -> None:
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        by_sink = self.router.split(events)
        targets = [sink_id for sink_id, evs in by_sink.items() if evs]
        self.tracker.register(batch_id, targets, {lane: handle})
        if not targets:
            await self._commit_ready(lane)
            return
        commit_us = events[-1].commit_time_us
        with self._tracer.start_as_current_span(
            "ingest.batch",
            attributes={
                "cdc.pipeline_id": self.pipeline_id,
                "cdc.lane": lane,
                "cdc.batch_id": batch_id,
                "cdc.events": len(events),
                "cdc.sinks": ",".join(targets),
            },
        ):
            context = tracing.inject()
            for sink_id in targets:
                await self.channels[sink_id].send(
                    OutboundBatch(batch_id, self.pipeline_id, (lane,), by_sink[sink_id], context)
                )
                self._sent_at[(batch_id, sink_id)] = (time.monotonic(), commit_us)
                self.metrics.count_sent(sink_id, by_sink[sink_id])
                self.metrics.unacked.labels(self.pipeline_id, sink_id).set(
                    self.channels[sink_id].unacked
                )

    async def on_ack(self, sink_id: str, ack: DeliveryAck) -> None:
        """An outlet's answer. Accepted-but-not-durable answers only count; a durable one
        releases the batch for this sink."""
        m, p = self.metrics, self.pipeline_id
        m.events_acked.labels(p, sink_id, "written").inc(ack.written)
        m.events_acked.labels(p, sink_id, "skipped").inc(ack.skipped)
        m.events_acked.labels(p, sink_id, "dead_lettered").inc(ack.dead_lettered)
        m.unacked.labels(p, sink_id).set(self.channels[sink_id].unacked)
        if not ack.durable:
            return
        sent = self._sent_at.pop((ack.batch_id, sink_id), None)
        if sent is not None:
            sent_at, commit_us = sent
            m.ack_latency.labels(p, sink_id).observe(time.monotonic() - sent_at)
            if commit_us:
                seconds = max(0.0, time.time() - commit_us / 1e6)
                m.commit_to_ack.labels(p, sink_id).observe(seconds)
        for lane in self.tracker.ack(ack.batch_id, sink_id):
            await self._commit_ready(lane)

    async def _commit_ready(self, lane: str | None = None) -> None:
        lanes = [lane] if lane is not None else list(self.tracker.lanes())
        async with self._commit_lock:
            for name in lanes:
                handles = self.tracker.take_released(name)
                if handles:
                    await self.source.ack(name, handles)
                    self.metrics.commits.labels(self.pipeline_id).inc()

    async def health(self) -> dict[str, Any]:
        components: list[ComponentHealth] = [await self.source.health()]
        if self.monitor is not None:
            reading = await self.monitor.health()
            self.metrics.slot_reading(reading.detail)
            components.append(reading)
        components += [c.health() for c in self.channels.values()]
        status = overall(components)
        self.metrics.source_ready.labels(self.pipeline_id).set(status is not Status.ERROR)
        return {
            "status": status.value,
            "ready": status is not Status.ERROR,
            "pipeline_id": self.pipeline_id,
            "events_read": self.events_read,
            "pending_batches": self.tracker.pending_count(),
            "components": {c.name: c.as_dict() for c in components},
        }
