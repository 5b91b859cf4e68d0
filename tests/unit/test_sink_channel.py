"""services/ingest/sink_channel.py against a real gRPC sink servicer in this process (its
writer a FakeSinkWriter, durable on write): credits bound what is unacked, acks come back in
order and once each (accepted and durable), and after a lost stream or a rejected batch
everything unacked is resent in order."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdc_proto.v2 import sink_pb2_grpc
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.health import Status
from domain.ports import DeliveryAck, OutboundBatch
from services.grpc_health import add_health, set_status
from services.ingest.sink_channel import SinkChannel
from services.metrics import SinkMetrics
from services.net import find_free_port
from services.sink.server import SinkServicer
from tests.support.fakes import FakeSinkWriter

ORDERS = TableSchema("shop", "orders", (Column("id", 20, "bigint", is_key=True),))


def batch(batch_id: int) -> OutboundBatch:
    """Batch n carries the change at position n (key n), on lane "slot"."""
    event = SourceEvent(Operation.CREATE, ORDERS, Position(batch_id), after=(str(batch_id),))
    return OutboundBatch(batch_id, "p", ("slot",), [event])


class SinkServer:
    """`cdc sink`'s gRPC side in this process; stop() and start() again on the same port."""

    def __init__(self, writer: FakeSinkWriter) -> None:
        self.writer = writer
        self.port = find_free_port()
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server()
        servicer = SinkServicer(self.writer, "s", SinkMetrics("p", "s"))
        sink_pb2_grpc.add_SinkServiceServicer_to_server(servicer, server)
        health = add_health(server)
        await set_status(health, True, "cdc.v2.SinkService")
        server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=None)
            self.server = None


class Acks:
    def __init__(self) -> None:
        self.ids: list[int] = []

    async def __call__(self, sink_id: str, ack: DeliveryAck) -> None:
        # the writer is durable on write: each batch's one answer is accepted and durable
        assert sink_id == "s" and ack.accepted and ack.durable, ack
        self.ids.append(ack.batch_id)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(
    writer: FakeSinkWriter, max_in_flight: int = 100
) -> AsyncIterator[tuple[SinkServer, SinkChannel, Acks]]:
    server = SinkServer(writer)
    await server.start()
    acks = Acks()
    channel = SinkChannel("s", f"127.0.0.1:{server.port}", max_in_flight, acks)
    channel.start()
    try:
        yield server, channel, acks
    finally:
        await channel.stop()
        await server.stop()


def run(
    scenario: Callable[[SinkServer, SinkChannel, Acks, FakeSinkWriter], object],
    max_in_flight: int = 100,
) -> None:
    """Runs `scenario` with a started server and a channel to it."""

    async def main() -> None:
        writer = FakeSinkWriter()
        async with running(writer, max_in_flight) as (server, channel, acks):
            await scenario(server, channel, acks, writer)  # type: ignore[misc]

    asyncio.run(asyncio.wait_for(main(), 60))


def test_acks_come_back_in_order_once_each_and_free_the_batches() -> None:
    async def scenario(server, channel, acks, writer) -> None:  # type: ignore[no-untyped-def]
        for n in range(1, 21):
            await channel.send(batch(n))
        await until(lambda: len(acks.ids) == 20)
        assert acks.ids == list(range(1, 21))
        assert writer.batches == list(range(1, 21))
        assert channel.unacked == 0 and channel.acked_batches == 20
        assert await channel.drain(1) is True

    run(scenario)


def test_credits_bound_the_unacked_batches_and_return_with_each_ack() -> None:
    async def scenario(server, channel, acks, writer) -> None:  # type: ignore[no-untyped-def]
        writer.hold()  # a slow destination: nothing is acked
        for n in range(1, 4):
            await asyncio.wait_for(channel.send(batch(n)), 1)  # within the 3 credits
        fourth = asyncio.create_task(channel.send(batch(4)))
        await asyncio.sleep(0.3)
        assert not fourth.done(), "a 4th batch went out with 3 credits"
        assert channel.unacked == 3
        assert await channel.drain(0.1) is False
        writer.release()
        await asyncio.wait_for(fourth, 5)  # the first ack returned a credit
        await until(lambda: len(acks.ids) == 4)
        assert acks.ids == [1, 2, 3, 4]

    run(scenario, max_in_flight=3)


def test_unacked_batches_are_resent_in_order_after_the_stream_is_lost() -> None:
    async def scenario(server, channel, acks, writer) -> None:  # type: ignore[no-untyped-def]
        await channel.send(batch(1))
        await until(lambda: acks.ids == [1])
        writer.hold()
        for n in range(2, 6):
            await channel.send(batch(n))
        await until(lambda: writer.waiting == 1)  # batch 2 is being written
        await server.stop()  # the sink goes away mid-write: 2..5 unacked
        writer.release()
        assert channel.unacked == 4
        await channel.send(batch(6))  # sent while disconnected: queued behind the others
        await server.start()  # same port: the channel reconnects and resends
        await until(lambda: len(acks.ids) == 6, timeout=20)
        assert acks.ids == [1, 2, 3, 4, 5, 6]  # in order, none twice
        # what the sink applied before the loss was skipped, not applied again
        assert sorted(writer.table("shop.orders")) == [(str(n),) for n in range(1, 7)]
        assert channel.unacked == 0

    run(scenario)


def test_a_rejected_batch_is_kept_and_resent_with_the_ones_after_it() -> None:
    async def scenario(server, channel, acks, writer) -> None:  # type: ignore[no-untyped-def]
        writer.available = False  # the sink's database is down: batches are rejected
        for n in range(1, 4):
            await channel.send(batch(n))
        await asyncio.sleep(0.5)
        assert acks.ids == [] and channel.unacked == 3
        writer.available = True
        await until(lambda: len(acks.ids) == 3, timeout=20)
        assert acks.ids == [1, 2, 3]
        assert writer.batches == [1, 2, 3]

    run(scenario)


def test_health_follows_the_sinks_own_health_check() -> None:
    async def scenario(server, channel, acks, writer) -> None:  # type: ignore[no-untyped-def]
        await channel.send(batch(1))
        await until(lambda: channel.health().status is Status.OK, timeout=5)
        assert channel.health().detail["connected"] is True
        await server.stop()
        await until(lambda: channel.health().status is Status.ERROR, timeout=5)
        assert "UNREACHABLE" in channel.health().detail["serving"]

    run(scenario)


def test_one_credit_still_delivers_everything_in_order() -> None:
    async def scenario(server, channel, acks, writer) -> None:  # type: ignore[no-untyped-def]
        for n in range(1, 11):
            await asyncio.wait_for(channel.send(batch(n)), 5)
        await until(lambda: len(acks.ids) == 10)
        assert acks.ids == list(range(1, 11))

    run(scenario, max_in_flight=1)


def test_a_frozen_connection_is_dropped_after_the_ack_timeout_and_everything_resent() -> None:
    """The connection to the sink freezes (nothing passes, nothing is closed) while a write
    is in progress; a new connection would reach the sink. After `ack_timeout` without an
    ack or an answer to health checks the channel drops stream and connection, connects
    anew and resends everything unacked: the sink skips what the old stream had applied,
    so each change is applied once and the acks come back in order."""
    from structlog.testing import capture_logs

    from tests.support.proxy import TcpProxy

    async def main() -> None:
        writer = FakeSinkWriter()
        server = SinkServer(writer)
        await server.start()
        proxy = TcpProxy(server.port).start()
        acks = Acks()
        channel = SinkChannel("s", f"127.0.0.1:{proxy.port}", 100, acks, ack_timeout=2.0)
        channel.start()
        try:
            with capture_logs() as logs:
                await channel.send(batch(1))
                await until(lambda: acks.ids == [1])
                writer.hold()
                for n in range(2, 5):
                    await channel.send(batch(n))
                await until(lambda: writer.waiting == 1)  # batch 2 is being written
                proxy.freeze()
                writer.release()  # the old stream applies 2..4; its acks do not get through
                await until(lambda: len(acks.ids) == 4, timeout=20)
                await channel.send(batch(5))
                await until(lambda: len(acks.ids) == 5, timeout=10)
            assert acks.ids == [1, 2, 3, 4, 5]
            assert sorted(writer.table("shop.orders")) == [(str(n),) for n in range(1, 6)]
            assert proxy.accepted == 2, "expected one new connection"
            timeouts = [e for e in logs if e["event"] == "sink.ack_timeout"]
            assert len(timeouts) == 1 and timeouts[0]["waited_seconds"] >= 2.0, timeouts
            assert timeouts[0]["serving"].startswith("UNREACHABLE")
        finally:
            await channel.stop()
            proxy.stop()
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_slow_write_on_a_sink_that_answers_is_never_cut_off() -> None:
    """A write far longer than the ack timeout (the sink's database slow, or down while the
    sink retries) on a sink that answers its health check keeps its stream: no timeout, no
    resend, the ack comes when the write is done."""
    from structlog.testing import capture_logs

    async def main() -> None:
        writer = FakeSinkWriter()
        server = SinkServer(writer)
        await server.start()
        acks = Acks()
        channel = SinkChannel("s", f"127.0.0.1:{server.port}", 100, acks, ack_timeout=1.0)
        channel.start()
        try:
            with capture_logs() as logs:
                writer.hold()
                for n in range(1, 4):
                    await channel.send(batch(n))
                await until(lambda: writer.waiting == 1)
                await asyncio.sleep(4.0)  # 4 x the ack timeout
                assert writer.waiting == 1 and acks.ids == []
                writer.release()
                await until(lambda: len(acks.ids) == 3, timeout=10)
            assert acks.ids == [1, 2, 3]
            assert writer.batches == [1, 2, 3]  # each written once, none resent
            assert not [e for e in logs if e["event"] == "sink.ack_timeout"]
        finally:
            await channel.stop()
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_no_ack_timeout_while_acks_keep_coming() -> None:
    """The bound is on the oldest unacked batch, not on the stream: a steady flow of acks,
    each within the timeout, never drops the stream however long it runs."""
    from structlog.testing import capture_logs

    async def main() -> None:
        writer = FakeSinkWriter(delay=0.3)
        server = SinkServer(writer)
        await server.start()
        acks = Acks()
        channel = SinkChannel("s", f"127.0.0.1:{server.port}", 100, acks, ack_timeout=1.0)
        channel.start()
        try:
            with capture_logs() as logs:
                for n in range(1, 11):  # 3 s of writes in all, 0.3 s each
                    await channel.send(batch(n))
                await until(lambda: len(acks.ids) == 10, timeout=15)
            assert acks.ids == list(range(1, 11))
            assert not [e for e in logs if e["event"] == "sink.ack_timeout"]
        finally:
            await channel.stop()
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


# ------------------------------------------------------------- the Describe deadline


class _SilentSink(sink_pb2_grpc.SinkServiceServicer):
    """A sink service that accepts the call and never answers Describe (a hung peer); its
    health check says SERVING, so only the handshake's own deadline notices."""

    def __init__(self) -> None:
        self.asked = 0

    async def Describe(self, request: object, context: object) -> object:
        self.asked += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_a_sink_that_never_answers_describe_is_reported_by_name_and_asked_again() -> None:
    from structlog.testing import capture_logs

    async def main() -> None:
        server = grpc.aio.server()
        silent = _SilentSink()
        sink_pb2_grpc.add_SinkServiceServicer_to_server(silent, server)
        await set_status(add_health(server), True, "cdc.v2.SinkService")
        port = find_free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        channel = SinkChannel("replica", f"127.0.0.1:{port}", 10, Acks(), ack_timeout=1.0)
        started = time.monotonic()
        channel.start()
        try:
            await until(lambda: "error" in channel.health().detail, timeout=15)
            elapsed = time.monotonic() - started
            health = channel.health()
            assert health.status is Status.ERROR
            error = health.detail["error"]
            assert f"sink replica at 127.0.0.1:{port}" in error, error
            assert "no answer to the Describe handshake within 1 s" in error, error
            assert "connected, but it did not answer" in error, error
            assert 1.0 <= elapsed < 10, elapsed
            # Asked again on a new connection, not given up.
            await until(lambda: silent.asked >= 2, timeout=15)
            assert channel.unacked == 0 and channel.sink_description is None
        finally:
            await channel.stop()
            await server.stop(grace=None)

    with capture_logs() as logs:
        asyncio.run(asyncio.wait_for(main(), 60))
    timeouts = [e for e in logs if e["event"] == "sink.describe_timeout"]
    assert timeouts and timeouts[0]["sink"] == "replica" and timeouts[0]["connected"] is True


def test_describe_deadline_when_nothing_listens_names_the_address() -> None:
    async def main() -> None:
        port = find_free_port()
        channel = SinkChannel("replica", f"127.0.0.1:{port}", 10, Acks(), ack_timeout=1.0)
        channel.start()
        try:
            await until(lambda: "error" in channel.health().detail, timeout=15)
            error = channel.health().detail["error"]
            assert f"sink replica at 127.0.0.1:{port}" in error, error
            assert "could not connect" in error, error
        finally:
            await channel.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_sink_that_comes_up_after_a_describe_timeout_gets_the_batches() -> None:
    async def main() -> None:
        writer = FakeSinkWriter()
        server = SinkServer(writer)
        acks = Acks()
        channel = SinkChannel("s", f"127.0.0.1:{server.port}", 10, acks, ack_timeout=1.0)
        channel.start()
        try:
            await channel.send(batch(1))
            await until(lambda: "error" in channel.health().detail, timeout=15)
            assert "Describe handshake" in channel.health().detail["error"]
            await server.start()
            await until(lambda: acks.ids == [1], timeout=20)
            await until(lambda: channel.health().status is Status.OK, timeout=10)
            assert "error" not in channel.health().detail
        finally:
            await channel.stop()
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


class _FirstCallHangs:
    """Counts the calls; the first one never answers."""

    def __init__(self) -> None:
        self.calls = 0

    async def hang_first(self) -> None:
        self.calls += 1
        if self.calls == 1:
            await asyncio.Event().wait()


class _HealthHangingOnce(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self.hang = _FirstCallHangs()

    async def Check(self, request: object, context: object) -> health_pb2.HealthCheckResponse:
        await self.hang.hang_first()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class _SinkSilentOnce(SinkServicer):
    def __init__(self, writer: FakeSinkWriter) -> None:
        super().__init__(writer, "s", SinkMetrics("p", "s"))
        self.hang = _FirstCallHangs()

    async def Describe(self, request: Any, context: Any) -> Any:
        await self.hang.hang_first()
        return await super().Describe(request, context)


def test_the_health_poller_outlives_a_channel_closed_under_its_check() -> None:
    """The Describe deadline closes the channel while the health poller's check on it is
    in flight (gRPC then raises CancelledError in the poller): the poller goes on, and the
    sink's health follows the new connection (it stayed frozen, a dead poller, before)."""

    async def main() -> None:
        server = grpc.aio.server()
        sink = _SinkSilentOnce(FakeSinkWriter())
        health = _HealthHangingOnce()
        sink_pb2_grpc.add_SinkServiceServicer_to_server(sink, server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = find_free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        acks = Acks()
        channel = SinkChannel("s", f"127.0.0.1:{port}", 10, acks, ack_timeout=1.0)
        channel.start()
        try:
            await channel.send(batch(1))
            await until(lambda: acks.ids == [1], timeout=20)
            assert sink.hang.calls >= 2 and health.hang.calls >= 1
            await until(lambda: channel.health().status is Status.OK, timeout=10)
        finally:
            await channel.stop()
            await server.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 60))
