"""The shared fakes (tests/support/fakes.py) behave like the adapters they stand in for, so
that tests of the services that use them mean something."""

from __future__ import annotations

import asyncio

import pytest

from domain.errors import SinkUnavailableError
from domain.events import UNCHANGED, Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import (
    DeliveryAck,
    ErrorRouter,
    EventSource,
    Outlet,
    SinkBatch,
    SinkWriter,
    SourceChunk,
    SourceMonitor,
)
from tests.support.fakes import (
    FakeErrorRouter,
    FakeEventSource,
    FakeLog,
    FakeOutlet,
    FakeSinkWriter,
    FakeSourceMonitor,
    LogSource,
)

T = TableSchema(
    "s",
    "t",
    (Column("id", 20, "bigint", is_key=True), Column("a", 25, "text"), Column("b", 25, "text")),
)


def ev(op: Operation, lsn: int, minor: int = 0, **rows: tuple[object, ...]) -> SourceEvent:
    return SourceEvent(op, T, Position(lsn, minor), **rows)  # type: ignore[arg-type]


def read_all(source: FakeEventSource) -> list[SourceChunk]:
    async def go() -> list[SourceChunk]:
        await source.start()
        return [c async for c in source.chunks()]

    return asyncio.run(go())


def test_the_fakes_satisfy_the_ports() -> None:
    async def on_ack(outlet: str, ack: DeliveryAck) -> None:
        pass

    source: EventSource = FakeEventSource()
    log_source: EventSource = LogSource(FakeLog())
    writer: SinkWriter = FakeSinkWriter()
    router: ErrorRouter = FakeErrorRouter()
    monitor: SourceMonitor = FakeSourceMonitor()
    outlet: Outlet = FakeOutlet("s", on_ack)
    assert all((source, log_source, writer, router, monitor, outlet))


def test_source_redelivers_everything_after_the_acked_handle() -> None:
    a = SourceChunk("0", [ev(Operation.CREATE, 1, after=("1", "x", "y"))], 1)
    b1 = SourceChunk("0", [ev(Operation.CREATE, 2, after=("2", "x", "y"))], None)  # mid-txn
    b2 = SourceChunk("0", [ev(Operation.CREATE, 2, 1, after=("3", "x", "y"))], 2)
    c = SourceChunk("0", [ev(Operation.CREATE, 3, after=("4", "x", "y"))], 3)
    source = FakeEventSource([a, b1, b2, c])
    assert read_all(source) == [a, b1, b2, c]
    asyncio.run(source.ack("0", [1]))
    source.restart()
    assert read_all(source) == [b1, b2, c]  # the whole open transaction again
    asyncio.run(source.ack("0", [2]))
    assert source.committed_events("0") == a.events + b1.events + b2.events
    with pytest.raises(ValueError, match="goes back"):
        asyncio.run(source.ack("0", [1]))
    with pytest.raises(ValueError, match="never read"):
        asyncio.run(source.ack("0", [99]))
    assert source.commits == [("0", 1), ("0", 2)] and source.acked == {"0": [1, 2]}
    source.restart()
    assert read_all(source) == [c]


def test_writer_applies_rows_and_skips_a_replay() -> None:
    writer = FakeSinkWriter()
    batch = SinkBatch(
        "p",
        "0",
        1,
        [
            ev(Operation.CREATE, 1, 0, after=("1", "a", "big")),
            ev(Operation.CREATE, 1, 1, after=("2", "a", "b")),
            ev(Operation.UPDATE, 2, 0, after=("1", "a2", UNCHANGED)),  # TOASTed value kept
            ev(Operation.DELETE, 2, 1, before=("2", None, None)),
        ],
    )
    first = asyncio.run(writer.write(batch))
    assert (first.written, first.skipped) == (4, 0)
    assert writer.table("s.t") == {("1",): ("1", "a2", "big")}
    again = asyncio.run(writer.write(SinkBatch("p", "0", 2, batch.events)))
    assert (again.written, again.skipped) == (0, 4)
    assert writer.table("s.t") == {("1",): ("1", "a2", "big")}
    assert writer.applied == {"0": Position(2, 1)}  # per lane; none for another lane
    assert "other" not in writer.applied


def test_an_unavailable_writer_changes_nothing() -> None:
    writer = FakeSinkWriter()
    writer.available = False
    with pytest.raises(SinkUnavailableError):
        asyncio.run(writer.write(SinkBatch("p", "0", 1, [ev(Operation.CREATE, 1, after=("1",))])))
    assert writer.tables == {} and writer.batches == [] and writer.applied == {}


def test_rejected_rows_are_dead_lettered_or_the_batch_is_not_written() -> None:
    router = FakeErrorRouter()
    writer = FakeSinkWriter(
        error_router=router, reject=lambda e: "bad" if e.after and e.after[1] == "bad" else None
    )
    events = [
        ev(Operation.CREATE, 1, 0, after=("1", "ok", None)),
        ev(Operation.CREATE, 1, 1, after=("2", "bad", None)),
    ]
    router.available = False
    with pytest.raises(SinkUnavailableError):
        asyncio.run(writer.write(SinkBatch("p", "0", 1, events)))
    assert writer.tables == {} and router.letters == [] and writer.dead_letters == []
    router.available = True
    result = asyncio.run(writer.write(SinkBatch("p", "0", 1, events)))
    assert (result.written, result.dead_lettered) == (1, 1)
    assert [(letter.event.after, letter.error) for letter in router.letters] == [
        (("2", "bad", None), "bad")
    ]
    assert set(writer.table("s.t")) == {("1",)}
