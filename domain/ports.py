"""The ports: what the services need from the outside world, as Protocols.

Adapters implement them; services depend only on these.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from domain.events import Position, SchemaChange, SourceEvent
from domain.health import ComponentHealth

C = TypeVar("C")


@dataclass(slots=True)
class SourceChunk:
    """Events one partition produced in one read, in order.

    `checkpoint` is the transport position that may be committed once these events and
    all earlier ones are handled (None when the chunk ends inside a transaction).
    `schema_changes` are the table shapes that changed before these events.
    """

    partition: str
    events: list[SourceEvent]
    checkpoint: Any = None
    schema_changes: list[SchemaChange] = field(default_factory=list)


@dataclass(slots=True)
class SinkBatch:
    pipeline_id: str
    partition: str
    batch_id: int
    events: Sequence[SourceEvent]


@dataclass(slots=True)
class WriteResult:
    written: int = 0
    skipped: int = 0  # already applied earlier (a replay)
    dead_lettered: int = 0


@dataclass(slots=True)
class DeadLetter:
    event: SourceEvent
    error: str
    stage: str
    attributes: dict[str, str] = field(default_factory=dict)


class EventSource(Protocol):
    """Reads a transport and yields chunks of events; commits positions it is told to."""

    async def start(self) -> None: ...

    def chunks(self) -> AsyncIterator[SourceChunk]: ...

    async def commit(self, partition: str, checkpoint: Any) -> None: ...

    async def health(self) -> ComponentHealth: ...

    async def stop(self) -> None: ...


class Provisioner(Protocol):
    """Creates the transport resources a pipeline needs; never deletes data it did not create."""

    async def provision(self) -> None: ...

    async def teardown(self) -> None: ...


class SourceMonitor(Protocol):
    """Watches what the event source reads from (a replication slot, consumer lag)."""

    async def start(self) -> None: ...

    async def lag(self) -> dict[str, Any]: ...

    async def health(self) -> ComponentHealth: ...

    async def stop(self) -> None: ...


class ErrorRouter(Protocol):
    """Stores events that cannot be processed; returns only once they are durable."""

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None: ...


class SinkWriter(Protocol):
    """Writes batches durably and idempotently: a replayed batch changes nothing."""

    async def start(self) -> None: ...

    async def write(self, batch: SinkBatch) -> WriteResult: ...

    async def health(self) -> ComponentHealth: ...

    async def stop(self) -> None: ...


class CheckpointStore(Protocol):
    """Where a sink keeps the last position it applied per (pipeline, partition)."""

    async def applied(self, pipeline_id: str, partition: str) -> Position | None: ...
