"""In-memory fakes of the ports in domain/ports.py, with the behaviour of the real adapters
(not call-recording mocks), for unit tests of the services and for the contract suites in
tests/contracts, which run against these fakes and the real adapters alike.

* :class:`FakeEventSource`: a transport with a replayable log of chunks per lane, like a
  replication slot: reading starts after the last acked handle of each lane, so a restarted
  source redelivers everything not acked; acks only ever move forward.
* :class:`FakeLog` and :class:`LogSource`: a durable log of lanes and an EventSource over it
  whose handles are offsets and whose lanes can be revoked (a Kafka-like position source).
* :class:`FakeSinkWriter`: a destination holding rows by table and key, idempotent like the
  PostgreSQL sink (events at or before the applied position of their lane are skipped), that
  can be made unavailable, slow or buffered (``write`` accepts, ``flush`` makes durable), and
  dead-letters rows (through an ErrorRouter when it has one).
* :class:`FakeErrorRouter`: a dead-letter store that is durable on return, or unavailable.
* :class:`FakeSourceMonitor`: a slot monitor with a settable status.
* :class:`FakeOutlet`: an Outlet that accepts every batch at once and makes it durable at
  once or when told.

``journal`` (a list shared by several fakes) records lifecycle steps (``"source.start"``,
``"monitor.stop"``, ...) for tests of the order in which a service starts and stops things.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

from domain.errors import SinkUnavailableError
from domain.events import UNCHANGED, Operation, Position, SourceEvent, TableSchema
from domain.health import ComponentHealth, Status
from domain.ports import (
    AckCallback,
    DeadLetter,
    DeliveryAck,
    Guarantee,
    OutboundBatch,
    SinkBatch,
    SourceChunk,
    WriteResult,
)

__all__ = [
    "FakeErrorRouter",
    "FakeEventSource",
    "FakeLog",
    "FakeOutlet",
    "FakeSinkWriter",
    "FakeSourceMonitor",
    "LogSource",
]

Row = tuple[Any, ...]
Tables = dict[str, dict[tuple[Any, ...], dict[str, Any]]]


class FakeEventSource:
    """An EventSource over an in-memory log of chunks per lane.

    ``chunks()`` yields, in log order, every chunk after the last acked handle of its lane
    (a chunk with ``ack=None`` ends inside a transaction: it is redelivered until a later
    chunk's handle is acked). With ``follow=True`` it then waits for chunks :meth:`append`-ed
    later, until :meth:`stop`; otherwise it ends after the log. Handles must be comparable
    (ints, Positions, strings); acking one that is not in the log or that goes backwards
    raises, as a slot would refuse it.

    ``commits`` records every handle acked, as ``(lane, handle)`` in order; ``acks`` every
    call of :meth:`ack`; ``acked`` the handles per lane; ``committed`` the last per lane.
    """

    def __init__(
        self,
        chunks: Iterable[SourceChunk] = (),
        *,
        follow: bool = False,
        journal: list[str] | None = None,
        name: str = "source",
    ) -> None:
        self.log: list[SourceChunk] = list(chunks)
        self.follow = follow
        self.journal = journal if journal is not None else []
        self.name = name
        self.status = Status.OK
        self.committed: dict[str, Any] = {}  # lane -> last acked handle
        self.commits: list[tuple[str, Any]] = []  # every handle acked, in order
        self.acks: list[tuple[str, list[Any]]] = []  # every ack() call
        self.acked: dict[str, list[Any]] = {}  # lane -> its handles acked, in order
        self.started = False
        self.stopped = False
        self.reads = 0  # chunks handed out, redeliveries included
        self._appended = asyncio.Event()

    # --- test controls -------------------------------------------------------------------

    def append(self, chunk: SourceChunk) -> None:
        """A new chunk arrives on the transport."""
        self.log.append(chunk)
        self._appended.set()

    def restart(self) -> None:
        """As after a crash of the reading process: the next read starts again after the
        acked handles."""
        self.started = False
        self.stopped = False

    def committed_events(self, lane: str) -> list[SourceEvent]:
        """The events covered by the lane's acked handle."""
        out: list[SourceEvent] = []
        pending: list[SourceEvent] = []
        done = self.committed.get(lane)
        for chunk in self.log:
            if chunk.lane != lane:
                continue
            pending += chunk.events
            if chunk.ack is not None and done is not None and chunk.ack <= done:
                out += pending
                pending = []
        return out

    # --- the port --------------------------------------------------------------------------

    async def start(self) -> None:
        self.started = True
        self.stopped = False
        self.journal.append(f"{self.name}.start")

    async def chunks(self) -> AsyncIterator[SourceChunk]:
        position = self._first_unacknowledged()
        while not self.stopped:
            if position < len(self.log):
                chunk = self.log[position]
                position += 1
                if self._is_committed(chunk, position - 1):
                    continue
                self.reads += 1
                yield chunk
                continue
            if not self.follow:
                return
            self._appended.clear()
            await self._appended.wait()

    async def ack(self, lane: str, handles: Sequence[Any]) -> None:
        if not handles:
            raise ValueError("an ack of no handle")
        for handle in handles:
            if handle is None:
                raise ValueError("acking no handle")
            if not any(c.lane == lane and c.ack == handle for c in self.log):
                raise ValueError(f"{lane}: handle {handle!r} was never read")
            previous = self.committed.get(lane)
            if previous is not None and handle < previous:
                raise ValueError(f"{lane}: ack of {handle!r} goes back from {previous!r}")
        self.acks.append((lane, list(handles)))
        for handle in handles:
            self.committed[lane] = handle
            self.commits.append((lane, handle))
            self.acked.setdefault(lane, []).append(handle)

    async def health(self) -> ComponentHealth:
        return ComponentHealth(self.name, self.status, {"slot": "s"})

    async def stop(self) -> None:
        self.stopped = True
        self._appended.set()
        self.journal.append(f"{self.name}.stop")

    # --- internals -----------------------------------------------------------------------

    def _first_unacknowledged(self) -> int:
        """Index of the first chunk a restarted reader must deliver again."""
        for index, chunk in enumerate(self.log):
            if not self._is_committed(chunk, index):
                return index
        return len(self.log)

    def _is_committed(self, chunk: SourceChunk, index: int) -> bool:
        """The chunk is covered by its lane's acked handle: it, or a later chunk of its lane
        that ends the same transaction, has a handle at or before it."""
        done = self.committed.get(chunk.lane)
        if done is None:
            return False
        for later in self.log[index:]:
            if later.lane == chunk.lane and later.ack is not None:
                return bool(later.ack <= done)
        return False


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


class FakeErrorRouter:
    """An ErrorRouter keeping dead letters in a list; ``available=False`` makes it fail like a
    dead-letter destination that is down (nothing is stored then)."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []
        self.available = True

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        if not self.available:
            raise SinkUnavailableError("dead-letter store unavailable")
        self.letters.extend(letters)


class FakeSinkWriter:
    """A SinkWriter keeping rows in memory like the PostgreSQL sink.

    ``tables[table][key]`` is the current row of each key (the key is the tuple of the key
    columns' values) as a dict by column name; creates and updates upsert (an unchanged
    TOASTed value keeps what the row had), deletes remove, truncates empty the table. A batch
    is applied whole or not at all: the applied position of its lane moves to its newest
    event, and events at or before it are skipped on a replay. While ``available`` is False,
    or for batch ids in ``fail_batches``, ``write`` raises SinkUnavailableError and changes
    nothing. A row that cannot be applied, or for which ``reject(event)`` returns a reason,
    is a dead letter: sent to ``error_router`` when there is one (before the batch counts as
    written; the router failing fails the batch) and listed in ``dead_letters``.
    :meth:`hold` makes writes wait (a slow destination) until :meth:`release`; ``delay``
    makes each write take that long. With ``buffered``, ``write()`` only accepts and
    ``flush()`` makes durable (a sink that commits every few seconds).
    """

    guarantee = Guarantee.EXACTLY_ONCE_EFFECT

    def __init__(
        self,
        buffered: bool = False,
        *,
        name: str = "sink:fake",
        error_router: FakeErrorRouter | None = None,
        reject: Callable[[SourceEvent], str | None] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.buffered = buffered
        self.name = name
        self.error_router = error_router
        self.reject = reject
        self.delay = delay
        self.available = True
        self.fail_batches: set[int] = set()
        self.status = Status.OK
        self.tables: Tables = {}
        self.dead_letters: list[tuple[SourceEvent, str]] = []
        self.applied: dict[str, Position] = {}  # lane -> durable applied position
        self._pending: dict[str, Position] = {}  # accepted, not yet flushed
        self._staged: list[SourceEvent] = []
        self.batches: list[int] = []  # ids of the batches written (accepted), in order
        self.started = False
        self.stopped = False
        self.waiting = 0  # writes held by hold()
        self._open: asyncio.Event | None = None

    # --- test controls -------------------------------------------------------------------

    def hold(self) -> None:
        """Writes from now on wait until release()."""
        self._open = asyncio.Event()

    def release(self) -> None:
        if self._open is not None:
            self._open.set()
            self._open = None

    # --- the port --------------------------------------------------------------------------

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def health(self) -> ComponentHealth:
        return ComponentHealth(self.name, self.status, {"batches": len(self.batches)})

    async def write(self, batch: SinkBatch) -> WriteResult:
        while self._open is not None:
            self.waiting += 1
            try:
                await self._open.wait()
            finally:
                self.waiting -= 1
        await asyncio.sleep(self.delay)
        if not self.available or batch.batch_id in self.fail_batches:
            raise SinkUnavailableError(f"{self.name}: destination unavailable")
        result = WriteResult(durable=not self.buffered)
        for part in batch.by_lane():  # positions are ordered within a lane only
            lane = part.lanes[0]
            applied = self._pending.get(lane, self.applied.get(lane))
            fresh: list[SourceEvent] = []
            for event in part.events:
                if applied is not None and event.position <= applied:
                    result.skipped += 1
                    continue
                fresh.append(event)
                applied = event.position
            if self.buffered:
                self._staged += fresh
                result.written += len(fresh)
            else:
                written, dead = await self._apply(fresh)
                result.written += written
                result.dead_lettered += dead
            if applied is not None:
                self._pending[lane] = applied
                if not self.buffered:
                    self.applied[lane] = applied
        self.batches.append(batch.batch_id)
        return result

    async def flush(self) -> Mapping[str, Position]:
        staged, self._staged = self._staged, []
        try:
            await self._apply(staged)
        except BaseException:
            self._staged = staged + self._staged
            raise
        self.applied.update(self._pending)
        return dict(self.applied)

    # --- test helpers --------------------------------------------------------------------

    def rows(self, table: TableSchema) -> dict[tuple[Any, ...], dict[str, Any]]:
        """The rows of `table` by key, each a dict by column name."""
        return self.tables.get(table.qualified_name, {})

    def table(self, qualified_name: str) -> dict[tuple[Any, ...], Row]:
        """The rows of the table by key, each as the tuple of its values."""
        rows = self.tables.get(qualified_name, {})
        return {key: tuple(row.values()) for key, row in rows.items()}

    # --- internals -----------------------------------------------------------------------

    async def _apply(self, events: Sequence[SourceEvent]) -> tuple[int, int]:
        """Applies `events` whole or not at all: (written, dead-lettered)."""
        tables = {name: dict(rows) for name, rows in self.tables.items()}
        letters: list[DeadLetter] = []
        for event in events:
            problem = self.reject(event) if self.reject is not None else None
            if problem is None:
                problem = _apply_one(tables, event)
            if problem is not None:
                letters.append(DeadLetter(event, problem, "sink"))
        if letters and self.error_router is not None:
            await self.error_router.dead_letter(letters)  # raises: nothing applied
        self.tables = tables
        self.dead_letters += [(letter.event, letter.error) for letter in letters]
        return len(events) - len(letters), len(letters)


def _apply_one(tables: Tables, ev: SourceEvent) -> str | None:
    """Applies one change to `tables`; the reason it cannot be applied, or None."""
    table = tables.setdefault(ev.table.qualified_name, {})
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


class FakeSourceMonitor:
    """A SourceMonitor with a settable status and lag."""

    def __init__(
        self, journal: list[str] | None = None, status: Status = Status.OK, lag_bytes: int = 42
    ) -> None:
        self.journal = journal if journal is not None else []
        self.status = status
        self.lag_bytes = lag_bytes

    async def start(self) -> None:
        self.journal.append("monitor.start")

    async def lag(self) -> dict[str, Any]:
        return {"lag_bytes": self.lag_bytes}

    async def health(self) -> ComponentHealth:
        return ComponentHealth("slot", self.status, {"slot": "s", "lag_bytes": self.lag_bytes})

    async def stop(self) -> None:
        self.journal.append("monitor.stop")


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
            ack = DeliveryAck(batch.batch_id, True, True, len(batch))
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
