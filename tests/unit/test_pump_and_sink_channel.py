"""The ingest pump (IngestService) with fake ports, and the sink channel against a real
sink servicer: acks released in order per lane (all of them), revoked lanes forgotten,
accepted (the credit) apart from durable (the release)."""

from __future__ import annotations

import asyncio

import grpc

from cdc_proto.v2 import sink_pb2_grpc
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import DeliveryAck, OutboundBatch, SourceChunk
from domain.routing import Router, RoutingRule
from services.ingest.service import IngestService
from services.ingest.sink_channel import SinkChannel
from services.metrics import SinkMetrics
from services.sink.server import SinkServicer
from tests.support.fakes import FakeEventSource, FakeOutlet, FakeSinkWriter

T = TableSchema("public", "t", (Column("id", 20, "bigint", True), Column("v", 25, "text")))


def _events(major: int, n: int) -> list[SourceEvent]:
    return [
        SourceEvent(Operation.CREATE, T, Position(major, i), after=(str(i), "v"))
        for i in range(n)
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
