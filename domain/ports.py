"""The ports: what the services need from the outside world, as Protocols.

Adapters implement them; services depend only on these.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from domain.block_ops import change_count, last_positions_by_lane
from domain.blocks import (
    ChangeBlock,
    build_blocks,
    events_of_blocks,
    lane_blocks,
    lane_indices,
    lanes_of_blocks,
)
from domain.events import Position, SchemaChange, SourceEvent
from domain.health import ComponentHealth

C = TypeVar("C")


# What a source hands out with a chunk and gets back (`EventSource.ack`) once the chunk and
# everything before it in its lane is durable everywhere: an LSN, an offset, a Kinesis
# sequence number, a Pub/Sub ack id. Opaque to everyone but its source.
AckHandle = Any


@dataclass(slots=True)
class SourceChunk:
    """Events one lane produced in one read, in order.

    A *lane* is the unit whose order sinks keep (a replication slot, a Kafka partition, a
    key-hash lane of our Pub/Sub or Kinesis publisher). `ack` is released to the source
    (`EventSource.ack`) once these events and all earlier ones of the lane are durably
    handled (None: nothing to release with this chunk, e.g. it ends inside a transaction).
    `schema_changes` are the table shapes that changed before these events. `revoked`
    names lanes this reader lost before this chunk (a Kafka rebalance, a Kinesis lease):
    their in-flight batches are abandoned and nothing of theirs is acked afterwards.

    A source that decodes straight into columns hands out `blocks` instead of `events`
    (which stay empty): ``arrow``-encoded change blocks (domain/blocks.py), `@lane` 0,
    `@index` numbering the chunk's changes 0..n-1 across its blocks in change order.
    """

    lane: str
    events: list[SourceEvent]
    ack: AckHandle | None = None
    schema_changes: list[SchemaChange] = field(default_factory=list)
    revoked: frozenset[str] = frozenset()
    blocks: list[ChangeBlock] | None = None

    def __len__(self) -> int:
        """The number of changes in the chunk."""
        if self.blocks is not None:
            return change_count(self.blocks)
        return len(self.events)

    def row_view(self) -> list[SourceEvent]:
        """The chunk's changes as events: `events`, or the row view of its blocks."""
        return self.events if self.blocks is None else events_of_blocks(self.blocks)


class Guarantee(enum.Enum):
    """What a sink promises about a change delivered more than once (docs/architecture.md)."""

    EXACTLY_ONCE_EFFECT = "exactly-once effect"  # replays skipped by the stored position
    AT_LEAST_ONCE_IDEMPOTENCY_KEY = "at-least-once, idempotency key"  # replays resent, keyed


class SinkBatch:
    """A batch as a sink receives it: its changes as columnar blocks (one per table shape,
    the bulk form, `domain.blocks`) and/or as events (the row-level view). Either is
    derived from the other on first use.

    A batch may carry several lanes (`lanes`; each change's lane is the `@lane` column of
    its block, or, for a batch made of events, `lane_counts`: the events grouped by lane,
    that many of each). Positions are ordered within a lane only; `by_lane()` splits the
    batch into one batch per lane. `partition` is the first lane."""

    __slots__ = (
        "_blocks",
        "_events",
        "_lane_counts",
        "batch_id",
        "lanes",
        "partition",
        "pipeline_id",
        "source_database",
    )

    def __init__(
        self,
        pipeline_id: str,
        partition: str,
        batch_id: int,
        events: Sequence[SourceEvent] | None = None,
        *,
        blocks: Sequence[ChangeBlock] | None = None,
        lanes: Sequence[str] | None = None,
        lane_counts: Sequence[int] = (),
        source_database: str = "",
    ) -> None:
        if events is None and blocks is None:
            events = []
        self.pipeline_id = pipeline_id
        self.partition = partition
        self.batch_id = batch_id
        self._events = events
        self._blocks = blocks
        self.lanes: tuple[str, ...] = tuple(lanes) if lanes else (partition,)
        self._lane_counts = tuple(lane_counts)
        if self._lane_counts:
            if len(self._lane_counts) != len(self.lanes):
                raise ValueError(
                    f"{len(self._lane_counts)} lane counts for {len(self.lanes)} lanes"
                )
            if events is not None and sum(self._lane_counts) != len(events):
                raise ValueError(
                    f"lane counts add up to {sum(self._lane_counts)}, not {len(events)}"
                )
        self.source_database = source_database

    @property
    def events(self) -> Sequence[SourceEvent]:
        if self._events is None:
            assert self._blocks is not None
            self._events = events_of_blocks(self._blocks, self.lanes, self.source_database)
        return self._events

    @property
    def blocks(self) -> Sequence[ChangeBlock]:
        if self._blocks is None:
            assert self._events is not None
            lane: int | list[int] = lane_indices(self._lane_counts) if self._lane_counts else 0
            self._blocks = build_blocks(self._events, lane)
        return self._blocks

    @property
    def has_blocks(self) -> bool:
        """Whether the batch came as blocks (the columnar path needs no conversion)."""
        return self._blocks is not None

    def by_lane(self) -> list[SinkBatch]:
        """One batch per lane that has changes here, in lane order (the batch itself when it
        has one lane). Each keeps the batch id and the changes of its lane, in order."""
        if len(self.lanes) == 1:
            return [self]
        out: list[SinkBatch] = []
        if self._blocks is not None:
            for i, lane in enumerate(self.lanes):
                blocks = lane_blocks(self._blocks, i)
                if blocks:
                    out.append(self._one_lane(lane, blocks=blocks))
            return out
        events = self.events
        counts = self._lane_counts or (len(events),)
        start = 0
        for lane, count in zip(self.lanes, counts, strict=False):
            if count:
                out.append(self._one_lane(lane, events=events[start : start + count]))
            start += count
        return out

    def _one_lane(
        self,
        lane: str,
        *,
        events: Sequence[SourceEvent] | None = None,
        blocks: Sequence[ChangeBlock] | None = None,
    ) -> SinkBatch:
        return SinkBatch(
            self.pipeline_id,
            lane,
            self.batch_id,
            events,
            blocks=blocks,
            source_database=self.source_database,
        )

    def lane_of_events(self) -> list[int]:
        """The lane index of each of `events`."""
        if self._blocks is not None:
            return lanes_of_blocks(self._blocks)
        if self._lane_counts:
            return lane_indices(self._lane_counts)
        return [0] * len(self.events)

    def __len__(self) -> int:
        if self._events is not None:
            return len(self._events)
        assert self._blocks is not None
        return sum(len(b) for b in self._blocks)


@dataclass(slots=True)
class WriteResult:
    written: int = 0
    skipped: int = 0  # already applied earlier (a replay)
    dead_lettered: int = 0
    # False: accepted but buffered; the position becomes durable with a later flush().
    durable: bool = True


@dataclass(frozen=True, slots=True)
class DeliveryAck:
    """A sink's answer to one batch, transport-neutral (the gRPC BatchAck, a publisher's
    confirmation). `accepted` returns the batch's credit; `durable` releases its positions:
    a sink that commits every few seconds accepts at once and reports durability later,
    per lane (`durable_positions`), so it never stalls the ingest's credits."""

    batch_id: int
    accepted: bool
    durable: bool = True
    written: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    error: str = ""
    durable_positions: Mapping[str, Position] = field(default_factory=dict)


@dataclass(slots=True)
class OutboundBatch:
    """A routed batch on its way out of the ingest pump.

    It may carry several lanes: `events` are grouped by lane, `lane_counts[i]` of them in
    `lanes[i]` (empty `lane_counts`: all of them are `lanes[0]`'s). A lane may have no
    event here (its changes went to other sinks).

    A batch read from a source that hands out change blocks (`SourceChunk.blocks`) carries
    them as `blocks` instead (`events` stay empty): the lane of each change is its `@lane`
    (an index into `lanes`), `@index` orders the changes across the blocks."""

    batch_id: int
    pipeline_id: str
    lanes: tuple[str, ...]
    events: Sequence[SourceEvent]
    trace_context: Mapping[str, str] = field(default_factory=dict)
    lane_counts: tuple[int, ...] = ()
    blocks: Sequence[ChangeBlock] | None = None

    def __post_init__(self) -> None:
        if not self.lanes:
            raise ValueError(f"batch {self.batch_id} has no lane")
        if self.blocks is not None:
            if self.events or self.lane_counts:
                raise ValueError(
                    f"batch {self.batch_id} carries blocks: no events or lane counts beside them"
                )
            return
        if self.lane_counts and (
            len(self.lane_counts) != len(self.lanes) or sum(self.lane_counts) != len(self.events)
        ):
            raise ValueError(
                f"batch {self.batch_id}: lane counts {self.lane_counts} do not match"
                f" {len(self.lanes)} lanes and {len(self.events)} events"
            )

    def __len__(self) -> int:
        """The number of changes in the batch."""
        if self.blocks is not None:
            return change_count(self.blocks)
        return len(self.events)

    def require_events(self, outlet: str) -> None:
        """Refuse a batch of change blocks in an outlet that publishes events (the capture
        stage's, fed by the WAL reader): its `events` are empty, so publishing them and
        acking the batch would lose its changes."""
        if self.blocks is not None:
            raise ValueError(
                f"{outlet}: batch {self.batch_id} carries change blocks; this outlet"
                " publishes events (it is fed by the WAL reader)"
            )

    def by_lane(self) -> list[tuple[str, Sequence[SourceEvent]]]:
        """(lane, its events in order) for every lane of a batch of events."""
        if self.blocks is not None:
            raise ValueError(f"batch {self.batch_id} carries change blocks, not events")
        if not self.lane_counts:
            return [(self.lanes[0], self.events)]
        out: list[tuple[str, Sequence[SourceEvent]]] = []
        start = 0
        for lane, count in zip(self.lanes, self.lane_counts, strict=True):
            out.append((lane, self.events[start : start + count]))
            start += count
        return out

    def last_positions(self) -> dict[str, Position]:
        """The newest position of each lane that has changes here."""
        if self.blocks is not None:
            return {self.lanes[i]: p for i, p in last_positions_by_lane(self.blocks).items()}
        return {lane: events[-1].position for lane, events in self.by_lane() if events}


@dataclass(slots=True)
class DeadLetter:
    """A change a stage could not deliver, with why. `lane` is the batch's lane (the event's
    position is ordered within it); `error_class` the exception's or response's kind,
    `attempts` how often delivery was tried."""

    event: SourceEvent
    error: str
    stage: str
    attributes: dict[str, str] = field(default_factory=dict)
    pipeline_id: str = ""
    sink_id: str = ""
    lane: str = ""
    error_class: str = ""
    attempts: int = 1


class EventSource(Protocol):
    """Reads a transport and yields chunks of events per lane, each with an ack handle.

    `ack(lane, handles)` gets, in order, every handle of the lane whose chunks (and all
    earlier ones) are durable everywhere: a position-based source commits the newest, a
    per-message one acks each. Unacked chunks are delivered again after a restart."""

    async def start(self) -> None: ...

    def chunks(self) -> AsyncIterator[SourceChunk]: ...

    async def ack(self, lane: str, handles: Sequence[AckHandle]) -> None: ...

    async def health(self) -> ComponentHealth: ...

    async def stop(self) -> None: ...


class Provisioner(Protocol):
    """Creates the transport resources a pipeline needs (idempotent) and removes them again
    (`cdc undeploy`); never deletes data it did not create.

    `teardown` returns what it did, one line each. It refuses to remove resources a running
    pipeline uses unless `force`, raising `domain.errors.TeardownRefusedError` (which lists
    what was removed before the refusal)."""

    async def provision(self) -> None: ...

    async def teardown(self, force: bool = False) -> Sequence[str]: ...


class SourceMonitor(Protocol):
    """Watches what the event source reads from (a replication slot, consumer lag)."""

    async def start(self) -> None: ...

    async def lag(self) -> dict[str, Any]: ...

    async def health(self) -> ComponentHealth: ...

    async def stop(self) -> None: ...


class ErrorRouter(Protocol):
    """Stores events that cannot be processed; returns only once they are durable (raises
    otherwise: the caller must then hold the position back, never drop the events)."""

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None: ...


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """A dead letter as its store keeps it: `id` is the store's own (for fetch / remove);
    `location` says where it is kept (a table, a topic), for operators. `replayable` is
    false for a letter whose change could not be decoded (a message the source could not
    read): `event` then holds only what is known (the table) and `cdc dlq replay` leaves it."""

    id: str
    pipeline_id: str
    sink_id: str
    lane: str
    event: SourceEvent
    error_class: str
    error: str
    attempts: int
    created_at: datetime | None
    location: str
    replayable: bool = True


class DeadLetterStore(Protocol):
    """Where dead letters can be listed, fetched for replay and removed once replayed
    (`cdc dlq`). Implemented by each transport's error router and by sinks that keep dead
    letters beside their data."""

    async def list(
        self, sink_id: str | None = None, limit: int | None = None
    ) -> Sequence[StoredDeadLetter]: ...

    async def fetch(self, ids: Sequence[str]) -> Sequence[StoredDeadLetter]: ...

    async def remove(self, ids: Sequence[str]) -> int: ...

    async def close(self) -> None: ...


class SinkWriter(Protocol):
    """Writes batches idempotently: a replayed batch changes nothing.

    `write()` may buffer (its result says whether the batch is durable already);
    `flush()` makes everything written durable and returns the durable position per lane.
    `guarantee` says what the sink promises for a change delivered twice."""

    guarantee: Guarantee

    async def start(self) -> None: ...

    async def write(self, batch: SinkBatch) -> WriteResult: ...

    async def flush(self) -> Mapping[str, Position]: ...

    async def health(self) -> ComponentHealth: ...

    async def stop(self) -> None: ...


class AckCallback(Protocol):
    async def __call__(self, outlet: str, ack: DeliveryAck) -> None: ...


class Outlet(Protocol):
    """Where the ingest pump sends routed batches: a sink service's gRPC stream today; a
    Pub/Sub or Kinesis publisher for the capture stage of those transports. `send` waits
    for a credit (the backpressure on reading the source); acks come back through the
    callback the outlet was made with."""

    @property
    def name(self) -> str: ...

    def start(self) -> None: ...

    async def send(self, batch: OutboundBatch) -> None: ...

    @property
    def unacked(self) -> int: ...

    async def drain(self, timeout: float) -> bool: ...

    async def stop(self) -> None: ...

    def health(self) -> ComponentHealth: ...
