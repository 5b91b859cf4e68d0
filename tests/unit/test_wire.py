"""services.wire and the sink servicer: batches round-trip as typed columnar blocks (one per
table shape), unchanged TOASTed values stay distinct from NULL, rows in wire form decode
lazily, the Describe handshake refuses another wire version, and the sink writes the
batches of a stream in order while it decodes the next ones."""

from __future__ import annotations

import asyncio
import copy
import pickle
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import grpc
import pyarrow as pa
import pytest

from cdc_proto.v2 import events_pb2, sink_pb2
from domain.blocks import META_COLUMNS, UNCHANGED_COL
from domain.events import UNCHANGED, Column, Operation, Position, SourceEvent, TableSchema
from domain.health import Status
from domain.ports import OutboundBatch
from domain.rows import encode_row
from services.metrics import SinkMetrics
from services.sink.server import SinkServicer
from services.wire import (
    WIRE_VERSION,
    WireFormatError,
    decode_batch,
    encode_batch,
    encode_outbound,
)
from tests.support.arrow_chunks import Change, block_of
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
        assert (got.commit_time_us, got.transaction_id, got.source_database) == (
            want.commit_time_us,
            77,
            "shop",
        )
    assert len(message.blocks) == 2  # one block per distinct schema
    assert [b.rows for b in message.blocks] == [4, 1]
    assert message.events == 5
    assert list(message.lanes) == ["slot_a"]
    assert dict(message.trace_context) == {"traceparent": "00-abc"}
    # Each column carries its neutral logical type and the source's own type text.
    columns = message.blocks[0].columns
    assert [(c.name, c.logical_type, c.source_type) for c in columns] == [
        ("id", "int64", "bigint"),
        ("name", "string", "text"),
        ("doc", "string", "text"),
    ]
    assert message.blocks[0].encoding == events_pb2.COLUMN_ENCODING_POSTGRES_TEXT


def test_rows_in_wire_form_become_columns_with_unchanged_apart_from_null() -> None:
    raw_after = encode_row(("7", "n", UNCHANGED))
    raw_before = encode_row(("6", None, None))
    event = SourceEvent(
        Operation.UPDATE, ITEMS, Position(3, 1), before_wire=raw_before, after_wire=raw_after
    )
    message = encode_batch(1, "p", "0", [event])
    (block,) = decode_batch(message).blocks
    records = block.records
    # The columns hold the new row; "doc" is null there and listed as unchanged (sidecar).
    assert records.column(META_COLUMNS + 1).to_pylist() == ["n"]
    assert records.column(META_COLUMNS + 2).to_pylist() == [None]
    assert records.column(UNCHANGED_COL).to_pylist() == [[2]]
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
    (got,) = decode_batch(encode_batch(1, "p", "0", [lazy])).events
    assert got.after == ("2", "b", "c")


def test_a_row_is_given_once() -> None:
    with pytest.raises(ValueError):
        SourceEvent(Operation.CREATE, ITEMS, Position(1), after=("1",), after_wire=b"\x00\x00")


def test_malformed_blocks_are_format_errors() -> None:
    message = encode_batch(1, "p", "0", _events()[:1])
    message.blocks[0].records = b"\xff\x00garbage"
    with pytest.raises(WireFormatError):
        decode_batch(message)
    message = encode_batch(1, "p", "0", _events()[:1])
    del message.blocks[0].columns[-1]  # the schema says 2 columns, the records hold 3
    with pytest.raises(WireFormatError):
        decode_batch(message)
    message = encode_batch(1, "p", "0", _events()[:1])
    del message.lanes[:]
    message.lanes.append("0")
    message.blocks[0].rows = 7
    with pytest.raises(WireFormatError):
        decode_batch(message)


def test_a_row_that_does_not_fit_its_table_is_a_format_error_at_the_ingest() -> None:
    event = SourceEvent(Operation.CREATE, ITEMS, Position(1), after=("1", "x"))
    with pytest.raises(WireFormatError):
        encode_batch(1, "p", "0", [event])


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
    messages[1].blocks[0].records = b"\xff"
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


# --- the Describe handshake ----------------------------------------------------------------


async def _server(*servicers: object) -> tuple[grpc.aio.Server, str]:
    from cdc_proto.v1 import sink_pb2_grpc as v1_grpc
    from cdc_proto.v2 import sink_pb2_grpc as v2_grpc

    server = grpc.aio.server()
    for servicer in servicers:
        if isinstance(servicer, v2_grpc.SinkServiceServicer):
            v2_grpc.add_SinkServiceServicer_to_server(servicer, server)
        else:
            v1_grpc.add_SinkServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_describe_names_the_wire_version_and_refuses_another() -> None:
    from cdc_proto.v2 import sink_pb2_grpc

    async def scenario() -> None:
        server, target = await _server(_servicer(FakeSinkWriter()))
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = sink_pb2_grpc.SinkServiceStub(channel)
                reply = await stub.Describe(sink_pb2.DescribeRequest(wire_version=WIRE_VERSION))
                assert reply.wire_version == WIRE_VERSION == "cdc.v2"
                assert reply.guarantee == sink_pb2.GUARANTEE_EXACTLY_ONCE_EFFECT
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Describe(sink_pb2.DescribeRequest(wire_version="cdc.v3"))
                assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
                assert "cdc.v2" in refused.value.details()
                assert "cdc.v3" in refused.value.details()
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_an_ingest_of_the_previous_wire_version_is_refused_by_name() -> None:
    from cdc_proto.v1 import events_pb2 as v1_events
    from cdc_proto.v1 import sink_pb2_grpc as v1_grpc
    from services.sink.server import RefuseOlderWire

    async def scenario() -> None:
        server, target = await _server(_servicer(FakeSinkWriter()), RefuseOlderWire("s"))
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                call = v1_grpc.SinkServiceStub(channel).Deliver()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    # The refusal may come before the write (it then raises) or after it.
                    await call.write(v1_events.EventBatch(batch_id=1))
                    await call.read()
                assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
                assert "wire version mismatch" in refused.value.details()
                assert "cdc.v1" in refused.value.details()
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_the_ingest_refuses_a_sink_of_the_previous_wire_version() -> None:
    """A sink of the previous release has no cdc.v2 service: the channel says why it sends
    nothing, in its health, and keeps the batch for when the sink is upgraded."""
    from cdc_proto.v1 import sink_pb2_grpc as v1_grpc
    from services.ingest.sink_channel import SinkChannel

    class OldSink(v1_grpc.SinkServiceServicer):
        async def Deliver(self, request_iterator: object, context: object) -> AsyncIterator:
            raise AssertionError("must not be called")
            yield

    async def scenario() -> None:
        server, target = await _server(OldSink())
        acks: list[int] = []

        async def on_ack(sink_id: str, ack: sink_pb2.BatchAck) -> None:
            acks.append(ack.batch_id)

        channel = SinkChannel("old", target, 4, on_ack)
        try:
            channel.start()
            await channel.send(encode_batch(1, "p", "0", _events()[:1]))
            for _ in range(100):
                if "wire version mismatch" in str(channel.health().detail.get("error")):
                    break
                await asyncio.sleep(0.05)
            health = channel.health()
            assert health.status is Status.ERROR
            assert "cdc.v1" in health.detail["error"] and "cdc.v2" in health.detail["error"]
            assert channel.unacked == 1 and acks == []
        finally:
            await channel.stop()
            await server.stop(None)

    asyncio.run(scenario())


def test_a_batch_of_several_lanes_round_trips_with_each_change_in_its_lane() -> None:
    from domain.ports import OutboundBatch
    from services.wire import decode_batch, encode_outbound

    table = TableSchema("public", "t", (Column("id", 20, "bigint", True),))
    a = [SourceEvent(Operation.CREATE, table, Position(8, i), after=(str(i),)) for i in range(2)]
    b = [SourceEvent(Operation.DELETE, table, Position(1, 0), before=("5",))]
    message = encode_outbound(OutboundBatch(4, "p", ("a", "b"), a + b, lane_counts=(2, 1)))
    assert list(message.lanes) == ["a", "b"]
    batch = decode_batch(message)
    assert [(p.partition, list(p.events)) for p in batch.by_lane()] == [("a", a), ("b", b)]
    with pytest.raises(ValueError, match="lane counts"):
        OutboundBatch(5, "p", ("a", "b"), a + b, lane_counts=(1, 1))


# ------------------------------------------------------------ arrow-encoded (typed) blocks

TYPED = TableSchema(
    "shop",
    "typed",
    (
        Column("id", 0, "bigint", True, "int64"),
        Column("amount", 0, "numeric(12,2)", False, "decimal(12,2)"),
        Column("big", 0, "numeric(50,5)", False, "decimal(50,5)"),
        Column("at", 0, "timestamptz", False, "timestamptz"),
        Column("took", 0, "interval", False, "interval"),
        Column("tags", 0, "text[]", False, "list<string>"),
        Column("raw", 0, "bytea", False, "bytes"),
        Column("day", 0, "date", False, "date"),
    ),
)


def _typed_outbound() -> OutboundBatch:
    at = datetime(2026, 12, 1, 11, 30, 0, 123456, tzinfo=UTC)
    first = (
        1,
        Decimal("10.25"),
        Decimal("1.00001"),
        at,
        timedelta(days=31, microseconds=5),
        ["a", None],
        b"\x00\xff",
        date(2026, 2, 28),
    )
    second = (2, None, None, None, None, [], b"", None)
    changes = [
        Change(TYPED, Operation.CREATE, Position(7, 0), first, commit_us=1_000),
        Change(TYPED, Operation.UPDATE, Position(7, 1), second, before=first, commit_us=2_000),
    ]
    return OutboundBatch(
        3, "p", ("a",), [], {"traceparent": "x"}, blocks=[block_of(changes, [0, 1])]
    )


def test_typed_blocks_cross_the_wire_as_they_are() -> None:
    outbound = _typed_outbound()
    (sent,) = outbound.blocks or []
    message = events_pb2.EventBatch.FromString(encode_outbound(outbound).SerializeToString())
    batch = decode_batch(message)
    assert batch.has_blocks and len(batch) == 2 and batch.lanes == ("a",)
    (block,) = batch.blocks
    assert block.encoding == "arrow"
    assert [c.logical for c in block.schema.columns] == [c.logical for c in TYPED.columns]
    assert block.records.schema == sent.records.schema
    assert block.records.equals(sent.records)
    assert block.column(1).type == pa.decimal128(12, 2)
    assert block.column(2).type == pa.decimal256(50, 5)
    assert block.column(3).type == pa.timestamp("us", tz="UTC")
    assert block.column(4).type == pa.duration("us")
    assert block.column(5).type == pa.list_(pa.string())
    assert block.column(6).type == pa.binary()
    before = block.records.column("@before").to_pylist()
    assert before[0] is None and before[1]["took"] == timedelta(days=31, microseconds=5)
    assert before[1]["tags"] == ["a", None] and before[1]["raw"] == b"\x00\xff"
    assert block.column(1).to_pylist() == [Decimal("10.25"), None]
    assert message.trace_context["traceparent"] == "x"
    assert outbound.last_positions() == {"a": Position(7, 1)}


def test_a_typed_block_whose_column_type_is_not_its_logical_type_is_a_format_error() -> None:
    message = encode_outbound(_typed_outbound())
    message.blocks[0].columns[1].logical_type = "decimal(12,3)"
    with pytest.raises(
        WireFormatError,
        match=r"shop.typed.amount .* holds decimal128\(12, 2\), not decimal128\(12, 3\)",
    ):
        decode_batch(message)


def test_a_batch_of_blocks_carries_no_events_beside_them() -> None:
    blocks = _typed_outbound().blocks
    with pytest.raises(ValueError, match="no events or lane counts"):
        OutboundBatch(1, "p", ("a", "b"), [], lane_counts=(1, 1), blocks=blocks)
    with pytest.raises(ValueError, match="carries change blocks"):
        OutboundBatch(1, "p", ("a",), [], blocks=blocks).by_lane()
