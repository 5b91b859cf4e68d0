"""services.wire and the sink servicer: batches round-trip, rows read from the WAL cross the
wire as the bytes the WAL reader received, rows in wire form decode lazily, and the sink
writes the batches of a stream in order while it decodes the next ones."""

from __future__ import annotations

import asyncio
import copy
import pickle
from collections.abc import AsyncIterator

import pytest

from cdc_proto.v1 import events_pb2, sink_pb2
from domain.events import UNCHANGED, Column, Operation, Position, SourceEvent, TableSchema
from domain.rows import RowFormatError, encode_row
from services.metrics import SinkMetrics
from services.sink.server import SinkServicer
from services.wire import WireFormatError, decode_batch, encode_batch
from tests.support.fakes import FakeSinkWriter

ITEMS = TableSchema(
    "public",
    "items",
    (
        Column("id", 20, "bigint", is_key=True),
        Column("name", 25, "text"),
        Column("doc", 25, "text"),
    ),
)
OTHER = TableSchema("app", "other", (Column("k", 25, "text", is_key=True),))


def _events() -> list[SourceEvent]:
    return [
        SourceEvent(Operation.CREATE, ITEMS, Position(10, 0), after=("1", "é ü 𝄞", None)),
        SourceEvent(Operation.UPDATE, ITEMS, Position(10, 1), after=("1", "", UNCHANGED)),
        SourceEvent(
            Operation.UPDATE,
            ITEMS,
            Position(10, 2),
            before=("1", None, None),
            after=("2", "x", "y"),
        ),
        SourceEvent(Operation.DELETE, OTHER, Position(11, 0), before=("k1",)),
        SourceEvent(Operation.TRUNCATE, ITEMS, Position(12, 0)),
    ]


def _same(a: SourceEvent, b: SourceEvent) -> bool:
    return (a.operation, a.table, a.position, a.before, a.after) == (
        b.operation,
        b.table,
        b.position,
        b.before,
        b.after,
    )


def test_batch_round_trips_through_bytes() -> None:
    events = _events()
    for i, ev in enumerate(events):
        ev.commit_time_us = 1_700_000_000_000_000 + i
        ev.transaction_id = 77
        ev.source_database = "shop"
    message = encode_batch(5, "pipe", "slot_a", events, {"traceparent": "00-abc"})
    decoded = decode_batch(events_pb2.EventBatch.FromString(message.SerializeToString()))
    assert (decoded.pipeline_id, decoded.partition, decoded.batch_id) == ("pipe", "slot_a", 5)
    assert len(decoded.events) == len(events)
    for got, want in zip(decoded.events, events, strict=True):
        assert _same(got, want)
        assert got.partition == "slot_a"
        assert (got.commit_time_us, got.transaction_id, got.source_database) == (
            want.commit_time_us,
            77,
            "shop",
        )
    assert len(message.tables) == 2  # one entry per distinct schema
    assert dict(message.trace_context) == {"traceparent": "00-abc"}


def test_rows_in_wire_form_are_passed_on_unchanged() -> None:
    raw_after = encode_row(("7", "n", UNCHANGED))
    raw_before = encode_row(("6", None, None))
    event = SourceEvent(
        Operation.UPDATE, ITEMS, Position(3, 1), before_wire=raw_before, after_wire=raw_after
    )
    message = encode_batch(1, "p", "0", [event])
    assert message.events[0].after == raw_after
    assert message.events[0].before == raw_before
    (got,) = decode_batch(message).events
    assert got.after == ("7", "n", UNCHANGED)
    assert got.before == ("6", None, None)


def test_wire_form_decodes_lazily_and_compares_as_decoded() -> None:
    raw = encode_row(("1", None, UNCHANGED))
    lazy = SourceEvent(Operation.CREATE, ITEMS, Position(1), after_wire=raw)
    plain = SourceEvent(Operation.CREATE, ITEMS, Position(1), after=("1", None, UNCHANGED))
    assert lazy.after_wire == raw and lazy.before_wire is None
    assert lazy.has_after and not lazy.has_before
    assert lazy == plain
    assert repr(lazy) == repr(plain)
    assert lazy.key == {"id": "1"}
    assert pickle.loads(pickle.dumps(lazy)) == plain
    assert copy.deepcopy(lazy) == plain
    lazy.after = ("2", "b", "c")  # assigning drops the wire form
    assert lazy.after_wire is None
    assert encode_batch(1, "p", "0", [lazy]).events[0].after == encode_row(("2", "b", "c"))


def test_a_row_is_given_once() -> None:
    with pytest.raises(ValueError):
        SourceEvent(Operation.CREATE, ITEMS, Position(1), after=("1",), after_wire=b"\x00\x00")


def test_malformed_rows_and_unknown_tables_are_format_errors() -> None:
    message = encode_batch(1, "p", "0", _events()[:1])
    message.events[0].after = b"\x00\x03t\x00\x00\x00\x09ab"
    with pytest.raises(RowFormatError):
        decode_batch(message)
    message = encode_batch(1, "p", "0", _events()[:1])
    message.events[0].table_ref = 9
    with pytest.raises(WireFormatError):
        decode_batch(message)


# --- the sink servicer -------------------------------------------------------------------


def _messages(ids: list[int]) -> list[events_pb2.EventBatch]:
    return [encode_batch(i, "p", "0", _events()[:2]) for i in ids]


def _servicer(writer: FakeSinkWriter) -> SinkServicer:
    return SinkServicer(writer, "s", SinkMetrics("p", "s"))


async def _deliver(servicer: SinkServicer, messages: list[events_pb2.EventBatch]) -> list:
    async def requests() -> AsyncIterator[events_pb2.EventBatch]:
        for m in messages:
            await asyncio.sleep(0)
            yield m

    return [ack async for ack in servicer.Deliver(requests(), None)]


def test_servicer_writes_in_order_and_acks_each_batch() -> None:
    writer = FakeSinkWriter()
    acks = asyncio.run(_deliver(_servicer(writer), _messages(list(range(1, 8)))))
    assert writer.batches == list(range(1, 8))
    assert [a.batch_id for a in acks] == list(range(1, 8))
    assert all(a.status == sink_pb2.ACK_STATUS_WRITTEN for a in acks)
    # every batch carries the same two changes: the writer applies them once, then skips them
    assert [(a.written, a.skipped) for a in acks] == [(2, 0)] + [(0, 2)] * 6


def test_after_a_rejected_batch_the_rest_of_the_stream_is_rejected_unwritten() -> None:
    writer = FakeSinkWriter()
    writer.fail_batches = {3}
    servicer = _servicer(writer)
    acks = asyncio.run(_deliver(servicer, _messages([1, 2, 3, 4, 5])))
    batches = servicer.metrics.batches
    assert batches.labels(pipeline="p", sink="s", result="written")._value.get() == 2
    assert batches.labels(pipeline="p", sink="s", result="rejected")._value.get() == 3
    assert writer.batches == [1, 2]
    assert [a.batch_id for a in acks] == [1, 2, 3, 4, 5]
    assert [a.status for a in acks] == [sink_pb2.ACK_STATUS_WRITTEN] * 2 + [
        sink_pb2.ACK_STATUS_REJECTED
    ] * 3


def test_an_undecodable_batch_is_rejected_and_nothing_after_it_written() -> None:
    writer = FakeSinkWriter()
    messages = _messages([1, 2, 3])
    messages[1].events[0].after = b"\xff"
    acks = asyncio.run(_deliver(_servicer(writer), messages))
    assert writer.batches == [1]
    assert [a.status for a in acks] == [
        sink_pb2.ACK_STATUS_WRITTEN,
        sink_pb2.ACK_STATUS_REJECTED,
        sink_pb2.ACK_STATUS_REJECTED,
    ]


def test_a_broken_request_stream_propagates_after_the_batches_before_it() -> None:
    writer = FakeSinkWriter()

    async def requests() -> AsyncIterator[events_pb2.EventBatch]:
        for m in _messages([1, 2]):
            yield m
        raise ConnectionError("stream lost")

    async def run() -> list:
        return [a async for a in _servicer(writer).Deliver(requests(), None)]

    with pytest.raises(ConnectionError):
        asyncio.run(run())
    assert writer.batches == [1, 2]
