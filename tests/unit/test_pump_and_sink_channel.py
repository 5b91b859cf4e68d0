"""The ingest pump (IngestService) with fake ports, and the sink channel against a real
sink servicer: acks released in order per lane (all of them), revoked lanes forgotten,
accepted (the credit) apart from durable (the release)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import grpc

from cdc_proto.v2 import sink_pb2_grpc
from domain.blocks import arrow_schema
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.health import ComponentHealth, Status
from domain.ports import (
    DeliveryAck,
    Guarantee,
    OutboundBatch,
    SinkBatch,
    SourceChunk,
    WriteResult,
)
from domain.routing import Router, RoutingRule
from services.ingest.service import IngestService
from services.ingest.sink_channel import SinkChannel
from services.metrics import SinkMetrics
from services.sink.server import SinkServicer
from tests.support.arrow_chunks import Change, block_chunk
from tests.support.fakes import FakeEventSource, FakeOutlet, FakeSinkWriter

T = TableSchema("public", "t", (Column("id", 20, "bigint", True), Column("v", 25, "text")))


def _events(major: int, n: int) -> list[SourceEvent]:
    return [
        SourceEvent(Operation.CREATE, T, Position(major, i), after=(str(i), "v")) for i in range(n)
    ]


def _pump(source: FakeEventSource, auto_durable: bool = True) -> tuple[IngestService, FakeOutlet]:
    service: IngestService
    outlet = FakeOutlet("s", lambda name, ack: service.on_ack(name, ack), auto_durable)
    service = IngestService("p", source, Router([RoutingRule("s")]), {"s": outlet}, 2)
    return service, outlet


def test_the_pump_releases_every_handle_in_order_once_durable() -> None:
    chunks = [
        SourceChunk("a", _events(1, 3), "h1"),  # split into 2 batches: the handle goes last
        SourceChunk("a", _events(2, 1), None),  # ends inside a transaction
        SourceChunk("b", _events(3, 1), "h3"),
        SourceChunk("a", _events(4, 1), "h4"),
    ]
    source = FakeEventSource(chunks)
    service, outlet = _pump(source, auto_durable=False)

    async def scenario() -> None:
        for chunk in chunks:
            await service._dispatch(chunk)
        assert source.acked == {}  # accepted, not durable: nothing released
        ids = [b.batch_id for b in outlet.sent]
        assert [b.lanes for b in outlet.sent] == [("a",), ("a",), ("a",), ("b",), ("a",)]
        await outlet.release(ids[3])
        assert source.acked == {"b": ["h3"]}
        for batch_id in reversed([ids[0], ids[1], ids[2], ids[4]]):
            await outlet.release(batch_id)
        assert source.acked == {"b": ["h3"], "a": ["h1", "h4"]}

    asyncio.run(scenario())


def test_the_pump_forgets_revoked_lanes() -> None:
    chunks = [
        SourceChunk("a", _events(1, 1), "a1"),
        SourceChunk("b", _events(2, 1), "b1"),
        SourceChunk("b", [], None, revoked=frozenset({"a"})),
    ]
    source = FakeEventSource(chunks)
    service, outlet = _pump(source, auto_durable=False)

    async def scenario() -> None:
        for chunk in chunks:
            await service._dispatch(chunk)
        for batch in list(outlet.sent):
            await outlet.release(batch.batch_id)  # the late ack of lane a is ignored
        assert source.acked == {"b": ["b1"]}
        assert service.tracker.lanes() == ("b",)

    asyncio.run(scenario())


def test_a_buffering_sink_returns_the_credit_at_once_and_releases_when_durable() -> None:
    """The sink accepts batches without making them durable (it commits later): the channel
    gets its credits back on acceptance and releases the batches when the sink's flush
    reports the lane's durable position."""

    async def scenario() -> None:
        writer = FakeSinkWriter(buffered=True)
        server = grpc.aio.server()
        sink_pb2_grpc.add_SinkServiceServicer_to_server(
            SinkServicer(writer, "s", SinkMetrics("p", "s")), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        acks: list[DeliveryAck] = []

        async def on_ack(name: str, ack: DeliveryAck) -> None:
            acks.append(ack)

        channel = SinkChannel("s", f"127.0.0.1:{port}", 1, on_ack)  # one credit only
        try:
            channel.start()
            for i in range(3):  # needs the credit back 2 times
                await asyncio.wait_for(
                    channel.send(OutboundBatch(10 + i, "p", ("lane",), _events(i + 1, 2))), 10
                )
            for _ in range(200):
                if channel.unacked == 0:
                    break
                await asyncio.sleep(0.02)
            assert channel.unacked == 0
        finally:
            await channel.stop()
            await server.stop(None)
        durable = [a.batch_id for a in acks if a.durable]
        assert sorted(durable) == [10, 11, 12]
        assert writer.applied == {"lane": Position(3, 1)}

    asyncio.run(scenario())


# ------------------------------------------------------------ batches of several lanes


def _multi_pump(
    source: FakeEventSource, limit: int, router: Router | None = None
) -> tuple[IngestService, dict[str, FakeOutlet]]:
    service: IngestService
    names = ["s"] if router is None else sorted(router.sink_ids)
    outlets = {n: FakeOutlet(n, lambda name, ack: service.on_ack(name, ack), False) for n in names}
    router = router or Router([RoutingRule("s")])
    service = IngestService("p", source, router, outlets, limit)
    return service, outlets


def test_chunks_of_several_lanes_waiting_together_leave_in_one_batch() -> None:
    chunks = [
        SourceChunk("a", _events(1, 3), "a1"),
        SourceChunk("b", _events(1, 2), "b1"),
        SourceChunk("c", _events(7, 4), "c1"),
        SourceChunk("a", _events(2, 1), "a2"),  # lane a is in the batch: the next one
        SourceChunk("b", _events(2, 2), "b2"),
        SourceChunk("d", _events(1, 1), "d1", revoked=frozenset({"c"})),  # its own batch
    ]
    source = FakeEventSource(chunks)
    # All chunks are read ahead before the first batch leaves (13 events, limit 20).
    service, outlets = _multi_pump(source, limit=20)
    outlet = outlets["s"]

    async def scenario() -> None:
        await service._read_loop()
        sent = outlet.sent
        assert [(b.lanes, b.lane_counts) for b in sent] == [
            (("a", "b", "c"), (3, 2, 4)),
            (("a", "b"), (1, 2)),
            (("d",), ()),
        ]
        first = dict(sent[0].by_lane())
        assert first["b"] == chunks[1].events and first["c"] == chunks[2].events
        assert sent[0].last_positions() == {
            "a": Position(1, 2),
            "b": Position(1, 1),
            "c": Position(7, 3),
        }
        # Released per lane in order: the second batch waits for the first.
        await outlet.release(sent[1].batch_id)
        assert source.acked == {}
        await outlet.release(sent[0].batch_id)
        # Lane c was revoked before its batch was durable: nothing of it is acked.
        assert source.acked == {"a": ["a1", "a2"], "b": ["b1", "b2"]}
        await outlet.release(sent[2].batch_id)
        assert source.acked["d"] == ["d1"]

    asyncio.run(scenario())


def test_a_big_chunk_is_still_split_and_joins_no_other_lane() -> None:
    chunks = [
        SourceChunk("a", _events(1, 5), "a1"),
        SourceChunk("b", _events(1, 1), "b1"),
    ]
    service, outlets = _multi_pump(FakeEventSource(chunks), limit=2)

    async def scenario() -> None:
        await service._read_loop()
        assert [(b.lanes, len(b.events)) for b in outlets["s"].sent] == [
            (("a",), 2),
            (("a",), 2),
            (("a",), 1),
            (("b",), 1),
        ]

    asyncio.run(scenario())


def test_each_sink_gets_only_the_lanes_routed_to_it() -> None:
    U = TableSchema("public", "u", T.columns)
    only_u = [SourceEvent(Operation.CREATE, U, Position(3, 0), after=("1", "v"))]
    chunks = [
        SourceChunk("a", _events(1, 2), "a1"),
        SourceChunk("b", only_u, "b1"),
    ]
    router = Router([RoutingRule("all"), RoutingRule("t_only", tables=["public.t"])])
    service, outlets = _multi_pump(FakeEventSource(chunks), 10, router)

    async def scenario() -> None:
        await service._read_loop()
        (to_all,) = outlets["all"].sent
        (to_t,) = outlets["t_only"].sent
        assert (to_all.lanes, to_all.lane_counts) == (("a", "b"), (2, 1))
        assert (to_t.lanes, to_t.lane_counts, len(to_t.events)) == (("a",), (), 2)
        assert to_all.batch_id == to_t.batch_id
        await outlets["all"].release(to_all.batch_id)
        assert service.source.acked == {}  # type: ignore[attr-defined]
        await outlets["t_only"].release(to_t.batch_id)
        assert service.source.acked == {"a": ["a1"], "b": ["b1"]}  # type: ignore[attr-defined]

    asyncio.run(scenario())


def test_a_batch_of_several_lanes_crosses_the_wire_and_is_durable_per_lane() -> None:
    """Over gRPC to a real sink servicer: the sink stores a position per lane, skips a
    replayed lane, and a buffering sink's durable positions per lane release the batch only
    once every lane of it is covered."""

    async def scenario() -> None:
        writer = FakeSinkWriter(buffered=True)
        server = grpc.aio.server()
        sink_pb2_grpc.add_SinkServiceServicer_to_server(
            SinkServicer(writer, "s", SinkMetrics("p", "s")), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        acks: list[DeliveryAck] = []

        async def on_ack(name: str, ack: DeliveryAck) -> None:
            acks.append(ack)

        channel = SinkChannel("s", f"127.0.0.1:{port}", 4, on_ack)
        a, b = _events(50, 2), _events(3, 3)
        try:
            channel.start()
            await channel.send(OutboundBatch(1, "p", ("a", "b"), a + b, lane_counts=(2, 3)))
            await channel.send(OutboundBatch(2, "p", ("a",), a))  # a replay of lane a
            for _ in range(200):
                if channel.unacked == 0:
                    break
                await asyncio.sleep(0.02)
            assert channel.unacked == 0
        finally:
            await channel.stop()
            await server.stop(None)
        assert sorted(x.batch_id for x in acks if x.durable) == [1, 2]
        assert writer.applied == {"a": Position(50, 1), "b": Position(3, 2)}
        accepted = {x.batch_id: x for x in acks if not x.durable}
        assert (accepted[1].written, accepted[2].skipped) == (5, 2)

    asyncio.run(scenario())


# ------------------------------------------------------------ batches of change blocks


class CountingWriter:
    """A SinkWriter that only counts and keeps each batch as it arrived (the approach of
    bench/discard_sink.py): what reaches the sink, without a destination's cost."""

    guarantee = Guarantee.EXACTLY_ONCE_EFFECT

    def __init__(self) -> None:
        self.batches: list[SinkBatch] = []

    async def start(self) -> None:
        pass

    async def write(self, batch: SinkBatch) -> WriteResult:
        self.batches.append(batch)
        return WriteResult(written=len(batch))

    async def flush(self) -> dict[str, Position]:
        return {}

    async def health(self) -> ComponentHealth:
        return ComponentHealth("sink:count", Status.OK, {})

    async def stop(self) -> None:
        pass


TYPED = TableSchema(
    "shop",
    "orders",
    (
        Column("id", 0, "bigint", True, "int64"),
        Column("amount", 0, "numeric(12,2)", False, "decimal(12,2)"),
        Column("at", 0, "timestamptz", False, "timestamptz"),
        Column("tags", 0, "text[]", False, "list<string>"),
    ),
)


def _typed(major: int, n: int, lane: str, ack: str) -> SourceChunk:
    at = datetime(2026, 12, 1, tzinfo=UTC)
    changes = [
        Change(TYPED, Operation.CREATE, Position(major, i), (i, Decimal("1.25") * i, at, [lane]))
        for i in range(n)
    ]
    return block_chunk(lane, changes, ack)


def test_the_pump_streams_typed_blocks_to_a_real_sink_servicer() -> None:
    """Source chunks of arrow blocks (two lanes joined, then a chunk cut in two) go through
    the pump and a SinkChannel over gRPC to a sink servicer: the sink gets arrow-encoded
    blocks of the columns' Arrow types with their lanes, and every handle is released."""

    async def scenario() -> None:
        writer = CountingWriter()
        server = grpc.aio.server()
        sink_pb2_grpc.add_SinkServiceServicer_to_server(
            SinkServicer(writer, "s", SinkMetrics("p", "s")),
            server,  # type: ignore[arg-type]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        service: IngestService
        channel = SinkChannel(
            "s", f"127.0.0.1:{port}", 2, lambda name, ack: service.on_ack(name, ack)
        )
        source = FakeEventSource(
            [_typed(1, 2, "a", "a1"), _typed(4, 1, "b", "b1"), _typed(9, 5, "a", "a2")]
        )
        service = IngestService("p", source, Router([RoutingRule("s")]), {"s": channel}, 3, 10)
        try:
            await asyncio.wait_for(service.run(), 20)
        finally:
            await server.stop(None)
        assert service.unacked_at_stop == 0
        assert source.acked == {"a": ["a1", "a2"], "b": ["b1"]}
        assert [(b.lanes, len(b)) for b in writer.batches] == [
            (("a", "b"), 3),
            (("a",), 3),
            (("a",), 2),
        ]
        first = writer.batches[0]
        assert first.has_blocks and {b.encoding for b in first.blocks} == {"arrow"}
        for block in first.blocks:
            assert [str(c.logical) for c in block.schema.columns] == [
                "int64",
                "decimal(12,2)",
                "timestamptz",
                "list<string>",
            ]
            assert block.records.schema == arrow_schema(TYPED, "arrow")
        (block,) = first.blocks  # the two lanes' blocks of the table, joined
        assert block.column(1).to_pylist() == [Decimal("0.00"), Decimal("1.25"), Decimal("0.00")]
        assert block.column(3).to_pylist() == [["a"], ["a"], ["b"]]
        assert [(p.partition, len(p)) for p in first.by_lane()] == [("a", 2), ("b", 1)]
        assert first.lane_of_events() == [0, 0, 1]

    asyncio.run(scenario())
