"""The ingest pump: source lanes -> routed batches -> outlets -> acks released in order.

One pump serves `cdc ingest` (outlets: the sink services' gRPC streams) and a capture stage
that publishes to a broker (outlets: a Pub/Sub or Kinesis publisher): it depends only on
the `EventSource` and `Outlet` ports.

The source is read ahead by at most about one batch of changes. Chunks of different lanes
that are waiting together leave in one batch (one handle per lane), so a source with many
lanes (Kafka partitions, key-hash lanes) does not cut the stream into slivers of one lane
each; a chunk of a lane already in the batch, or one that revokes lanes, starts the next.

A source that decodes straight into columns hands out change blocks (`SourceChunk.blocks`):
they go through as blocks, never as events (domain/block_ops.py cuts and joins them), in
batches of their own: a chunk of blocks and a chunk of events never share a batch."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from domain.block_ops import (
    change_count,
    in_lane,
    joined_per_table,
    newest_commit_time_us,
    split_changes,
)
from domain.blocks import ChangeBlock
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
        ahead = _ReadAhead(self.batch_max_events)
        feeder = asyncio.create_task(self._feed(ahead), name="ingest-source")
        try:
            while (chunk := await ahead.take()) is not None:
                group = [chunk]
                if not chunk.revoked:
                    lanes = {chunk.lane}
                    room = self.batch_max_events - len(chunk)
                    columnar = chunk.blocks is not None
                    while (more := ahead.take_joining(lanes, room, columnar)) is not None:
                        group.append(more)
                        lanes.add(more.lane)
                        room -= len(more)
                await self._dispatch_group(group)
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder

    async def _feed(self, ahead: _ReadAhead) -> None:
        try:
            async for chunk in self.source.chunks():
                await ahead.put(chunk)
        except BaseException as exc:
            ahead.close(exc)
            raise
        ahead.close()

    async def _dispatch(self, chunk: SourceChunk) -> None:
        await self._dispatch_group([chunk])

    async def _dispatch_group(self, group: list[SourceChunk]) -> None:
        """Send the chunks of `group` (of distinct lanes, all of events or all of blocks;
        only the first may revoke lanes, and a group of several holds at most
        `batch_max_events` changes) as one batch, or a single chunk as batches of at most
        `batch_max_events`, its handle with the last."""
        first = group[0]
        if first.revoked:
            dropped = self.tracker.revoke(first.revoked)
            log.info("ingest.lanes_revoked", lanes=sorted(first.revoked), abandoned=dropped)
        for chunk in group:
            for change in chunk.schema_changes:
                self._schema_changed(change)
            self.events_read += len(chunk)
            if chunk.blocks is not None:
                self.metrics.count_read_blocks(chunk.blocks)
            else:
                self.metrics.count_read(chunk.events)
        if first.blocks is not None:
            await self._dispatch_blocks(group)
            return
        if len(group) > 1:
            await self._send([_Part(c.lane, c.events, c.ack) for c in group])
            return
        events = first.events
        size = self.batch_max_events
        if not events:
            await self._send([_Part(first.lane, [], first.ack)])
            return
        for start in range(0, len(events), size):
            part = events[start : start + size]
            last = start + size >= len(events)
            await self._send([_Part(first.lane, part, first.ack if last else None)])

    async def _dispatch_blocks(self, group: list[SourceChunk]) -> None:
        """`_dispatch_group` for chunks of change blocks."""
        first = group[0]
        assert first.blocks is not None
        if len(group) > 1 or len(first) <= self.batch_max_events:
            await self._send_blocks([_BlockPart(c.lane, c.blocks or [], c.ack) for c in group])
            return
        parts = split_changes(first.blocks, self.batch_max_events)
        for i, blocks in enumerate(parts):
            last = i == len(parts) - 1
            await self._send_blocks([_BlockPart(first.lane, blocks, first.ack if last else None)])

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

    async def _send(self, parts: list[_Part]) -> None:
        """One batch of the lanes in `parts` (distinct), routed: each targeted outlet gets
        the changes meant for it, grouped by lane."""
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        routed = [self.router.split(p.events) for p in parts]
        per_sink: dict[str, list[tuple[str, list[SourceEvent]]]] = {}
        for part, by_sink in zip(parts, routed, strict=True):
            for sink_id, evs in by_sink.items():
                if evs:
                    per_sink.setdefault(sink_id, []).append((part.lane, evs))
        commit_us = max((p.events[-1].commit_time_us for p in parts if p.events), default=0)

        def outbound_for(sink_id: str) -> Callable[[Mapping[str, str]], OutboundBatch]:
            return lambda context: _outbound(batch_id, self.pipeline_id, per_sink[sink_id], context)

        await self._deliver(
            batch_id,
            {p.lane: p.handle for p in parts},
            {sink_id: outbound_for(sink_id) for sink_id in per_sink},
            commit_us,
            sum(len(p.events) for p in parts),
        )

    async def _send_blocks(self, parts: list[_BlockPart]) -> None:
        """`_send` for parts of change blocks: each targeted outlet gets the blocks (or the
        changes of them) meant for it, of the lanes routed to it: each lane's blocks get
        its index among them (`@lane`) and follow the lanes before it (`@index`), the lanes'
        blocks of one table shape joined."""
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        # sink -> (lane, @index offset, its blocks for the sink) per lane with changes for it
        per_sink: dict[str, list[tuple[str, int, list[ChangeBlock]]]] = {}
        offset = 0
        for part in parts:
            for sink_id, picked in self.router.split_blocks(part.blocks).items():
                if picked:
                    per_sink.setdefault(sink_id, []).append((part.lane, offset, picked))
            offset += change_count(part.blocks)
        commit_us = max(newest_commit_time_us(p.blocks) for p in parts)

        def outbound_for(sink_id: str) -> Callable[[Mapping[str, str]], OutboundBatch]:
            routed = per_sink[sink_id]
            sink_lanes: tuple[str, ...]
            if len(routed) == 1:
                sink_lanes, blocks = (routed[0][0],), routed[0][2]
            else:
                sink_lanes = tuple(lane for lane, _, _ in routed)
                blocks = joined_per_table(
                    [b for i, (_, at, bs) in enumerate(routed) for b in in_lane(bs, i, at)]
                )
            return lambda context: OutboundBatch(
                batch_id, self.pipeline_id, sink_lanes, [], context, blocks=blocks
            )

        await self._deliver(
            batch_id,
            {p.lane: p.handle for p in parts},
            {sink_id: outbound_for(sink_id) for sink_id in per_sink},
            commit_us,
            offset,
        )

    async def _deliver(
        self,
        batch_id: int,
        handles: Mapping[str, Any],
        outbound_for: Mapping[str, Callable[[Mapping[str, str]], OutboundBatch]],
        commit_us: int,
        changes: int,
    ) -> None:
        """Register batch `batch_id` (its lanes and their handles) for the sinks in
        `outbound_for`, then send each of them its part, built from the trace context; a batch
        no sink wants releases its handles at once."""
        targets = list(outbound_for)
        self.tracker.register(batch_id, targets, dict(handles))
        if not targets:
            for lane in handles:
                await self._commit_ready(lane)
            return
        with self._tracer.start_as_current_span(
            "ingest.batch",
            attributes={
                "cdc.pipeline_id": self.pipeline_id,
                "cdc.lane": ",".join(handles),
                "cdc.batch_id": batch_id,
                "cdc.events": changes,
                "cdc.sinks": ",".join(targets),
            },
        ):
            context = tracing.inject()
            for sink_id in targets:
                outbound = outbound_for[sink_id](context)
                await self.channels[sink_id].send(outbound)
                self._sent_at[(batch_id, sink_id)] = (time.monotonic(), commit_us)
                if outbound.blocks is not None:
                    self.metrics.count_sent_blocks(sink_id, outbound.blocks)
                else:
                    self.metrics.count_sent(sink_id, outbound.events)
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


@dataclass(frozen=True, slots=True)
class _Part:
    """The changes of one lane in a batch being sent, and the lane's handle with it."""

    lane: str
    events: list[SourceEvent]
    handle: Any


@dataclass(frozen=True, slots=True)
class _BlockPart:
    """`_Part` for a lane whose changes came as change blocks (`@lane` 0, `@index` from 0)."""

    lane: str
    blocks: list[ChangeBlock]
    handle: Any


def _outbound(
    batch_id: int,
    pipeline_id: str,
    lanes: list[tuple[str, list[SourceEvent]]],
    context: Mapping[str, str],
) -> OutboundBatch:
    if len(lanes) == 1:
        lane, events = lanes[0]
        return OutboundBatch(batch_id, pipeline_id, (lane,), events, context)
    return OutboundBatch(
        batch_id,
        pipeline_id,
        tuple(lane for lane, _ in lanes),
        [ev for _, evs in lanes for ev in evs],
        context,
        lane_counts=tuple(len(evs) for _, evs in lanes),
    )


class _ReadAhead:
    """Chunks read from the source before they are dispatched: at most about one batch of
    changes (`limit`; one chunk is always let in), so backpressure from the outlets still
    stops reading the source soon."""

    def __init__(self, limit: int) -> None:
        self._chunks: deque[SourceChunk] = deque()
        self._events = 0
        self._limit = max(1, limit)
        self._changed = asyncio.Event()
        self._ended = False
        self._error: BaseException | None = None

    async def put(self, chunk: SourceChunk) -> None:
        while self._chunks and self._events >= self._limit:
            self._changed.clear()
            await self._changed.wait()
        self._chunks.append(chunk)
        self._events += len(chunk)
        self._changed.set()

    def close(self, error: BaseException | None = None) -> None:
        """The source ended (or failed: `take` raises its error once the chunks read before
        it are taken)."""
        self._ended = True
        if error is not None and not isinstance(error, asyncio.CancelledError):
            self._error = error
        self._changed.set()

    async def take(self) -> SourceChunk | None:
        """The next chunk, waiting for one; None when the source ended."""
        while not self._chunks:
            if self._ended:
                if self._error is not None:
                    raise self._error
                return None
            self._changed.clear()
            await self._changed.wait()
        return self._pop()

    def take_joining(self, lanes: set[str], room: int, columnar: bool) -> SourceChunk | None:
        """The next chunk if it is already here and may join a batch of `lanes` with `room`
        changes left: another lane, no revocation, small enough, of blocks when `columnar`
        (else of events)."""
        if not self._chunks:
            return None
        chunk = self._chunks[0]
        if (
            chunk.lane in lanes
            or chunk.revoked
            or (chunk.blocks is not None) != columnar
            or len(chunk) > room
        ):
            return None
        return self._pop()

    def _pop(self) -> SourceChunk:
        chunk = self._chunks.popleft()
        self._events -= len(chunk)
        self._changed.set()
        return chunk
