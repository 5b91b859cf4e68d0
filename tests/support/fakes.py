"""Shared fakes of the ports (domain/ports.py), for unit tests and the contract suites.

Each fake is a small, faithful implementation of its port's contract, not a mock: the
contract suites in tests/contracts run against them and the real adapters alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from domain.events import UNCHANGED, Operation, Position, SourceEvent, TableSchema
from domain.health import ComponentHealth, Status
from domain.ports import (
    AckCallback,
    DeliveryAck,
    Guarantee,
    OutboundBatch,
    SinkBatch,
    SourceChunk,
    WriteResult,
)


class FakeSource:
    """An EventSource that yields the chunks it was given, then ends.

    `acked` records, per lane, every handle released to it, in order; `committed` the
    handles of every lane in the order they came."""

    def __init__(self, chunks: list[SourceChunk], calls: list[str] | None = None) -> None:
        self._chunks = chunks
        self.calls = calls if calls is not None else []
        self.committed: list[Any] = []
        self.acked: dict[str, list[Any]] = {}
        self.status = Status.OK

    async def start(self) -> None:
        self.calls.append("source.start")

    async def chunks(self) -> AsyncIterator[SourceChunk]:
        for chunk in self._chunks:
            yield chunk

    async def ack(self, lane: str, handles: Sequence[Any]) -> None:
        self.acked.setdefault(lane, []).extend(handles)
        self.committed.extend(handles)

    async def health(self) -> ComponentHealth:
        return ComponentHealth("source", self.status, {"slot": "s"})

    async def stop(self) -> None:
        self.calls.append("source.stop")


class FakeLog:
    """A durable log of lanes, the transport behind `LogSource`: a list of events per lane
    and the acked offset per lane (what survives a crash of the reader)."""

    def __init__(self) -> None:
        self.lanes: dict[str, list[SourceEvent]] = {}
        self.acked: dict[str, int] = {}  # lane -> number of events acked (an offset)
        self.owner: dict[str, object] = {}

    def append(self, lane: str, event: SourceEvent) -> None:
        self.lanes.setdefault(lane, []).append(event)


class LogSource:
    """An EventSource over a `FakeLog`: per lane, chunks of up to `chunk_events` events,
    each with its end offset as ack handle (a Kafka-like position source). `revoke(lanes)`
    takes lanes away (a rebalance): the next chunk says so and none of them follow."""

    def __init__(self, log: FakeLog, chunk_events: int = 2) -> None:
        self.log = log
        self.chunk_events = chunk_events
        self._revoked: set[str] = set()
        self._announce: set[str] = set()
        self.stopped = False

    async def start(self) -> None:
        for lane in self.log.lanes:
            self.log.owner[lane] = self

    def revoke(self, lanes: Sequence[str]) -> None:
        for lane in lanes:
            self._revoked.add(lane)
            self._announce.add(lane)

    async def chunks(self) -> AsyncIterator[SourceChunk]:
        # Each lane from its acked offset: what a restarted reader is given again.
        cursors = {lane: self.log.acked.get(lane, 0) for lane in self.log.lanes}
        while not self.stopped:
            progressed = False
            for lane, events in self.log.lanes.items():
                if lane in self._revoked:
                    continue
                start = cursors[lane]
                if start >= len(events):
                    continue
                end = min(len(events), start + self.chunk_events)
                cursors[lane] = end
                revoked = frozenset(self._announce)
                self._announce.clear()
                progressed = True
                yield SourceChunk(lane, events[start:end], end, revoked=revoked)
            if not progressed:
                if self._announce:
                    revoked = frozenset(self._announce)
                    self._announce.clear()
                    yield SourceChunk(next(iter(revoked)), [], None, revoked=revoked)
                return

    async def ack(self, lane: str, handles: Sequence[Any]) -> None:
        if lane in self._revoked:
            raise AssertionError(f"ack of revoked lane {lane}")
        for handle in handles:
            if handle < self.log.acked.get(lane, 0):
                raise AssertionError(f"lane {lane}: ack {handle} behind the acked offset")
            self.log.acked[lane] = handle

    async def health(self) -> ComponentHealth:
        return ComponentHealth("source", Status.OK, {})

    async def stop(self) -> None:
        self.stopped = True


class FakeSinkWriter:
    """A SinkWriter keeping rows in memory like the PostgreSQL sink: upsert by key,
    idempotent by the applied position per lane, unchanged TOASTed values kept, rows that
    cannot be applied dead-lettered. With `buffered`, `write()` only accepts and `flush()`
    makes durable (a sink that commits every few seconds)."""

    guarantee = Guarantee.EXACTLY_ONCE_EFFECT

    def __init__(self, buffered: bool = False) -> None:
        self.buffered = buffered
        self.tables: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
        self.dead_letters: list[tuple[SourceEvent, str]] = []
        self.applied: dict[str, Position] = {}  # durable
        self._pending: dict[str, Position] = {}  # accepted, not yet flushed
        self._staged: list[tuple[str, SourceEvent]] = []
        self.batches: list[int] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def health(self) -> ComponentHealth:
        return ComponentHealth("sink:fake", Status.OK, {})

    async def write(self, batch: SinkBatch) -> WriteResult:
        self.batches.append(batch.batch_id)
        lane = batch.lanes[0]
        applied = self._pending.get(lane, self.applied.get(lane))
        result = WriteResult(durable=not self.buffered)
        for ev in batch.events:
            if applied is not None and ev.position <= applied:
                result.skipped += 1
                continue
            self._staged.append((lane, ev))
            applied = ev.position
        if applied is not None:
            self._pending[lane] = applied
        if not self.buffered:
            result.written, result.dead_lettered = self._apply()
        else:
            result.written = len(batch) - result.skipped
        return result

    async def flush(self) -> Mapping[str, Position]:
        self._apply()
        return dict(self.applied)

    def _apply(self) -> tuple[int, int]:
        written = dead = 0
        for _, ev in self._staged:
            problem = self._apply_one(ev)
            if problem is None:
                written += 1
            else:
                dead += 1
                self.dead_letters.append((ev, problem))
        self._staged.clear()
        self.applied.update(self._pending)
        return written, dead

    def _apply_one(self, ev: SourceEvent) -> str | None:
        table = self.tables.setdefault(ev.table.qualified_name, {})
        if ev.operation is Operation.TRUNCATE:
            table.clear()
            return None
        names = ev.table.column_names
        key_idx = [i for i, c in enumerate(ev.table.columns) if c.is_key]
        if ev.operation is Operation.DELETE:
            row = ev.before if ev.before is not None else ev.after
            if row is None:
                return "delete without a before row"
            table.pop(tuple(row[i] for i in key_idx), None)
            return None
        after = ev.after
        if after is None or len(after) != len(names):
            return "row does not fit the table"
        key = tuple(after[i] for i in key_idx)
        if any(v is None or v is UNCHANGED for v in key):
            return "key column has no value"
        if ev.operation is Operation.UPDATE and ev.before is not None:
            old = tuple(ev.before[i] for i in key_idx)
            previous = table.pop(old, {}) if old != key else table.get(key, {})
        else:
            previous = table.get(key, {})
        stored = dict(previous)
        for name, value in zip(names, after, strict=True):
            if value is not UNCHANGED:
                stored[name] = value
        table[key] = stored
        return None

    def rows(self, table: TableSchema) -> dict[tuple[Any, ...], dict[str, Any]]:
        return self.tables.get(table.qualified_name, {})


class FakeOutlet:
    """An Outlet that accepts every batch at once and makes it durable when told
    (`release`), or at once with `auto_durable`."""

    def __init__(self, name: str, on_ack: AckCallback, auto_durable: bool = True) -> None:
        self._name = name
        self.on_ack = on_ack
        self.auto_durable = auto_durable
        self.sent: list[OutboundBatch] = []
        self._pending: list[int] = []

    @property
    def name(self) -> str:
        return self._name

    def start(self) -> None:
        pass

    async def send(self, batch: OutboundBatch) -> None:
        self.sent.append(batch)
        if self.auto_durable:
            ack = DeliveryAck(batch.batch_id, True, True, len(batch.events))
            await self.on_ack(self._name, ack)
        else:
            self._pending.append(batch.batch_id)
            await self.on_ack(self._name, DeliveryAck(batch.batch_id, True, False))

    async def release(self, batch_id: int) -> None:
        self._pending.remove(batch_id)
        await self.on_ack(self._name, DeliveryAck(batch_id, True, True))

    @property
    def unacked(self) -> int:
        return len(self._pending)

    async def drain(self, timeout: float) -> bool:
        return not self._pending

    async def stop(self) -> None:
        pass

    def health(self) -> ComponentHealth:
        return ComponentHealth(f"sink:{self._name}", Status.OK, {})
