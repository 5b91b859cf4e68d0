"""In-memory fakes of the ports in domain/ports.py, with the behaviour of the real adapters
(not call-recording mocks), for unit tests of the services.

* :class:`FakeEventSource`: a transport with a replayable log per partition, like a
  replication slot: reading starts after the last committed checkpoint, so a restarted source
  redelivers everything not committed; commits only ever move forward.
* :class:`FakeSinkWriter`: a destination holding rows by table and key, idempotent like the
  PostgreSQL sink (events at or before the applied position of their (pipeline, partition) are
  skipped), that can be made unavailable and can dead-letter rows through an ErrorRouter.
* :class:`FakeErrorRouter`: a dead-letter store that is durable on return, or unavailable.
* :class:`FakeSourceMonitor`: a slot monitor with a settable status.

``journal`` (a list shared by several fakes) records lifecycle steps (``"source.start"``,
``"monitor.stop"``, ...) for tests of the order in which a service starts and stops things.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from domain.errors import SinkUnavailableError
from domain.events import UNCHANGED, Operation, Position, SourceEvent
from domain.health import ComponentHealth, Status
from domain.ports import DeadLetter, SinkBatch, SourceChunk, WriteResult

__all__ = [
    "FakeErrorRouter",
    "FakeEventSource",
    "FakeSinkWriter",
    "FakeSourceMonitor",
]

Row = tuple[str | None, ...]


class FakeEventSource:
    """An EventSource over an in-memory log of chunks per partition.

    ``chunks()`` yields, in log order, every chunk after the last committed checkpoint of its
    partition (a chunk with ``checkpoint=None`` ends inside a transaction: it is redelivered
    until a later chunk's checkpoint is committed). With ``follow=True`` it then waits for
    chunks :meth:`append`-ed later, until :meth:`stop`; otherwise it ends after the log.
    Checkpoints must be comparable (ints, Positions); committing one that is not in the log
    or that goes backwards raises, as a slot would refuse it.
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
        self.committed: dict[str, Any] = {}  # partition -> last committed checkpoint
        self.commits: list[tuple[str, Any]] = []  # every commit, in order
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
        committed checkpoints."""
        self.started = False
        self.stopped = False

    def committed_events(self, partition: str) -> list[SourceEvent]:
        """The events covered by the partition's committed checkpoint."""
        out: list[SourceEvent] = []
        pending: list[SourceEvent] = []
        done = self.committed.get(partition)
        for chunk in self.log:
            if chunk.partition != partition:
                continue
            pending += chunk.events
            if chunk.checkpoint is not None and done is not None and chunk.checkpoint <= done:
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

    async def commit(self, partition: str, checkpoint: Any) -> None:
        if checkpoint is None:
            raise ValueError("committing no checkpoint")
        if not any(c.partition == partition and c.checkpoint == checkpoint for c in self.log):
            raise ValueError(f"{partition}: checkpoint {checkpoint!r} was never read")
        previous = self.committed.get(partition)
        if previous is not None and checkpoint < previous:
            raise ValueError(f"{partition}: commit of {checkpoint!r} goes back from {previous!r}")
        self.committed[partition] = checkpoint
        self.commits.append((partition, checkpoint))

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
        """The chunk is covered by its partition's committed checkpoint: it, or a later chunk
        of its partition that ends the same transaction, has a checkpoint at or before it."""
        done = self.committed.get(chunk.partition)
        if done is None:
            return False
        for later in self.log[index:]:
            if later.partition == chunk.partition and later.checkpoint is not None:
                return bool(later.checkpoint <= done)
        return False


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
    """A SinkWriter (and CheckpointStore) over in-memory tables.

    ``rows[table][key]`` is the current row of each key (the key is the tuple of the key
    columns' values); creates and updates upsert, deletes remove, truncates empty the table.
    A batch is applied whole or not at all: the applied position per (pipeline, partition)
    moves to its newest event, and events at or before it are skipped on a replay. While
    ``available`` is False, or for batch ids in ``fail_batches``, ``write`` raises
    SinkUnavailableError and changes nothing. ``reject(event)`` returning a reason makes the
    row a dead letter (sent to ``error_router`` before the batch counts as written).
    :meth:`hold` makes writes wait (a slow destination) until :meth:`release`.
    """

    def __init__(
        self,
        *,
        name: str = "sink:fake",
        error_router: FakeErrorRouter | None = None,
        reject: Callable[[SourceEvent], str | None] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.name = name
        self.error_router = error_router
        self.reject = reject
        self.delay = delay
        self.available = True
        self.fail_batches: set[int] = set()
        self.status = Status.OK
        self.rows: dict[str, dict[tuple[str | None, ...], Row]] = {}
        self.positions: dict[tuple[str, str], Position] = {}
        self.batches: list[int] = []  # ids of the batches written, in order
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

    async def write(self, batch: SinkBatch) -> WriteResult:
        while self._open is not None:
            self.waiting += 1
            try:
                await self._open.wait()
            finally:
                self.waiting -= 1
        if self.delay:
            await asyncio.sleep(self.delay)
        else:
            await asyncio.sleep(0)
        if not self.available or batch.batch_id in self.fail_batches:
            raise SinkUnavailableError(f"{self.name}: destination unavailable")
        where = (batch.pipeline_id, batch.partition)
        applied = self.positions.get(where)
        result = WriteResult()
        fresh = [e for e in batch.events if applied is None or e.position > applied]
        result.skipped = len(batch.events) - len(fresh)
        letters: list[DeadLetter] = []
        tables = {t: dict(rows) for t, rows in self.rows.items()}  # applied whole or not at all
        for event in fresh:
            reason = self.reject(event) if self.reject is not None else None
            if reason is not None:
                letters.append(DeadLetter(event, reason, "sink"))
                continue
            _apply(tables, event)
            result.written += 1
        if letters:
            if self.error_router is None:
                raise SinkUnavailableError(f"{self.name}: dead letters but no error router")
            await self.error_router.dead_letter(letters)  # raises: nothing applied
            result.dead_lettered = len(letters)
        self.rows = tables
        if batch.events:
            newest = max(e.position for e in batch.events)
            self.positions[where] = newest if applied is None else max(applied, newest)
        self.batches.append(batch.batch_id)
        return result

    async def health(self) -> ComponentHealth:
        return ComponentHealth(self.name, self.status, {"batches": len(self.batches)})

    async def stop(self) -> None:
        self.stopped = True

    async def applied(self, pipeline_id: str, partition: str) -> Position | None:
        return self.positions.get((pipeline_id, partition))

    # --- test helpers --------------------------------------------------------------------

    def table(self, qualified_name: str) -> dict[tuple[str | None, ...], Row]:
        return self.rows.get(qualified_name, {})


def _apply(tables: dict[str, dict[tuple[str | None, ...], Row]], event: SourceEvent) -> None:
    name = event.table.qualified_name
    rows = tables.setdefault(name, {})
    if event.operation is Operation.TRUNCATE:
        rows.clear()
        return
    key = tuple(event.key.values())
    if event.operation is Operation.DELETE:
        rows.pop(key, None)
        return
    if event.operation is Operation.UPDATE and event.has_before:
        old_key = tuple(
            event.before[i]  # type: ignore[index]
            for i, c in enumerate(event.table.columns)
            if c.is_key
        )
        if old_key != key:
            rows.pop(old_key, None)
    after = event.after
    assert after is not None, "create/update without a new row"
    previous = rows.get(key)
    if previous is not None:  # an unchanged TOASTed value keeps what the row had
        after = tuple(p if v is UNCHANGED else v for v, p in zip(after, previous, strict=False))
    rows[key] = after


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
