"""One gRPC Deliver stream from the ingest service to one sink service: the `Outlet` of
`cdc ingest`.

At most `max_in_flight` batches are not yet accepted (credits): when they are used up,
`send` waits, which is the backpressure that slows reading the transport. An ack returns
the credit once the sink accepted the batch; the batch is released (the ack callback with
`durable`) when the sink says it is durable, on that ack or later ones (`durable_positions`
per lane, for sinks that commit every few seconds). Batches not yet durable are kept and
resent in order after a reconnect; the sink skips positions it applied.

Every connection starts with the Describe handshake: a sink of another wire version is
refused with a clear message (logged, and in this channel's health) and asked again after
a backoff, instead of being sent batches it would misread. The handshake has a deadline
(the ack timeout): a sink that never answers it (hung, or a half-open connection) is
reported by name and address, its connection dropped, and asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdc_proto.v2 import events_pb2, sink_pb2, sink_pb2_grpc
from domain.events import Position
from domain.health import ComponentHealth, Status
from domain.ports import DeliveryAck, OutboundBatch
from services.wire import WIRE_VERSION, encode_outbound, wire_version_mismatch

log = structlog.get_logger(__name__)

AckHandler = Callable[[str, DeliveryAck], Awaitable[None]]

# HTTP/2 keepalive: a ping every 10 s, the connection dropped when one is not answered
# within 10 s, so a half-open connection (a vanished peer, a route dropping packets) is
# noticed within about 20 s while the stream is idle. The sink allows pings this often
# (services/sink/server.py). Under load it is not enough: once the socket's send buffer is
# full, gRPC cannot write the ping at all and its timeout never starts; the ack timeout
# covers that.
KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
DEFAULT_ACK_TIMEOUT_SECONDS = 20.0  # platform.yaml ingest.ack_timeout_seconds


class AckTimeoutError(ConnectionError):
    """The oldest unacked batch waited longer than the ack timeout while the sink did not
    answer its health check: the stream and its connection are dropped."""


class DescribeTimeoutError(ConnectionError):
    """The sink did not answer the Describe handshake within its deadline."""


class SinkChannel:
    def __init__(
        self,
        sink_id: str,
        target: str,
        max_in_flight: int,
        on_ack: AckHandler,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, str]] = (),
        ack_timeout: float = DEFAULT_ACK_TIMEOUT_SECONDS,
    ) -> None:
        self.sink_id = sink_id
        self.target = target
        # None: plaintext; else TLS (see services.security.channel_credentials).
        self._credentials = credentials
        self._options = list(options)
        self._credits = asyncio.Semaphore(max_in_flight)
        # Not yet durable at the sink, in send order (resent after a reconnect).
        self._unacked: OrderedDict[int, events_pb2.EventBatch] = OrderedDict()
        self._accepted: set[int] = set()  # of those, accepted: their credit is back
        self._last: dict[int, dict[str, Position]] = {}  # batch -> newest position per lane
        self._outbox: asyncio.Queue[events_pb2.EventBatch] = asyncio.Queue()
        self._on_ack = on_ack
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._last_error: str | None = None
        self._sink_status = "UNKNOWN"
        self._stopping = False
        self.sink_description: sink_pb2.DescribeReply | None = None
        self._wire_refused: str | None = None
        self._handshake_error: str | None = None  # the last Describe timed out
        self.acked_batches = 0
        self.last_ack_monotonic = time.monotonic()
        # Since when the oldest unacked batch could have been written by the sink: its send,
        # the ack of the one before it, or the (re)start of the stream that resent it.
        self._ack_timeout = ack_timeout
        self._oldest_since = time.monotonic()

    @property
    def name(self) -> str:
        return self.sink_id

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"sink-channel-{self.sink_id}")

    async def send(self, batch: OutboundBatch | events_pb2.EventBatch) -> None:
        if isinstance(batch, OutboundBatch):
            last = batch.last_positions()
            if last:
                self._last[batch.batch_id] = last
            message = encode_outbound(batch)
        else:
            message = batch
        await self._credits.acquire()
        if not self._unacked:
            self._oldest_since = time.monotonic()
        self._unacked[message.batch_id] = message
        self._outbox.put_nowait(message)

    async def drain(self, timeout: float) -> bool:
        """Wait until every sent batch is acked; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._unacked and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._unacked

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._channel is not None:
            await self._channel.close()

    def health(self) -> ComponentHealth:
        detail: dict[str, Any] = {
            "target": self.target,
            "connected": self._connected,
            "serving": self._sink_status,
            "unacked_batches": len(self._unacked),
        }
        if self._last_error:
            detail["error"] = self._last_error
        if self._wire_refused or self._handshake_error:
            detail["error"] = self._wire_refused or self._handshake_error
            return ComponentHealth(f"sink:{self.sink_id}", Status.ERROR, detail)
        # The sink's own health check says whether it is up and its destination reachable;
        # a broken stream is retried on its own and shows up in `detail`.
        ok = self._sink_status == "SERVING"
        return ComponentHealth(f"sink:{self.sink_id}", Status.OK if ok else Status.ERROR, detail)

    async def _run(self) -> None:
        backoff = 0.2
        health_task = asyncio.create_task(self._poll_health())
        try:
            while not self._stopping:
                started = time.monotonic()
                try:
                    await self._stream_once()
                except (grpc.aio.AioRpcError, ConnectionError, OSError) as exc:
                    details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                    self._last_error = f"{type(exc).__name__}: {details}"
                    log.warning("sink.stream_lost", sink=self.sink_id, error=self._last_error)
                finally:
                    self._connected = False
                if time.monotonic() - started > 10:
                    backoff = 0.2
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
        finally:
            health_task.cancel()

    async def _stream_once(self) -> None:
        if self._channel is None:
            options: list[tuple[str, Any]] = [
                ("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 256 << 20),
                *KEEPALIVE_OPTIONS,
                # Its own connection, not one shared through gRPC's global subchannel pool:
                # closing this channel after an ack timeout must close the stuck connection.
                ("grpc.use_local_subchannel_pool", 1),
                *self._options,
            ]
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=options
                )
        stub = sink_pb2_grpc.SinkServiceStub(self._channel)
        await self._describe(stub)
        call = stub.Deliver(wait_for_ready=True)
        # Everything not yet acked goes again, in order, then new batches follow.
        self._outbox = asyncio.Queue()
        for batch in self._unacked.values():
            self._outbox.put_nowait(batch)
        self._oldest_since = time.monotonic()
        writer = asyncio.create_task(self._write_loop(call, self._outbox))
        try:
            while True:
                ack = await self._next_ack(call)
                if ack is grpc.aio.EOF:
                    raise ConnectionError("sink closed the stream")
                self._connected = True
                self._last_error = None
                await self._handle_ack(ack)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            call.cancel()

    async def _describe(self, stub: Any) -> None:
        """The handshake: both sides must speak the same wire version."""
        try:
            reply = await stub.Describe(
                sink_pb2.DescribeRequest(wire_version=WIRE_VERSION),
                wait_for_ready=True,
                timeout=self._ack_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                await self._describe_timed_out()
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                # A sink of an older release: it has no cdc.v2 service at all.
                self._refuse(wire_version_mismatch(WIRE_VERSION, "cdc.v1", "ingest"))
            if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
                self._refuse(exc.details() or "the sink refused the handshake")
            raise
        if reply.wire_version != WIRE_VERSION:
            self._refuse(wire_version_mismatch(WIRE_VERSION, reply.wire_version, "ingest"))
        self.sink_description = reply
        self._wire_refused = self._handshake_error = None

    async def _describe_timed_out(self) -> None:
        """No answer to the handshake in time. Connected but silent (a hung sink, a
        half-open connection): the channel is dropped so the next attempt connects anew.
        Not connected: the sink is not listening (yet) at its address."""
        channel, self._channel = self._channel, None
        state = channel.get_state() if channel is not None else None
        connected = state is grpc.ChannelConnectivity.READY
        why = (
            "connected, but it did not answer"
            if connected
            else "could not connect (is it running and listening there?)"
        )
        message = (
            f"sink {self.sink_id} at {self.target}: no answer to the Describe handshake within"
            f" {self._ack_timeout:g} s (ingest.ack_timeout_seconds): {why}"
        )
        log.warning(
            "sink.describe_timeout",
            sink=self.sink_id,
            target=self.target,
            timeout_seconds=self._ack_timeout,
            connected=connected,
        )
        if channel is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await channel.close()
        self._handshake_error = message
        raise DescribeTimeoutError(message)

    def _refuse(self, message: str) -> None:
        self._last_error = self._wire_refused = message
        log.error(
            "sink.wire_version_mismatch", sink=self.sink_id, target=self.target, error=message
        )
        raise ConnectionError(message)

    async def _next_ack(self, call: Any) -> Any:
        """The next message of the stream. Raises AckTimeoutError, after closing the channel
        (its connection is the stuck one; a new stream on it would be stuck too), when the
        oldest unacked batch has waited longer than the ack timeout and the sink does not
        answer its health check either: a half-open connection or a hung peer. A sink that
        answers is only slow (a big batch, its database down and its writes retrying): it
        acks or rejects the batch in its own time."""
        read = asyncio.ensure_future(call.read())
        try:
            while True:
                done, _ = await asyncio.wait({read}, timeout=1.0)
                if done:
                    return read.result()
                waited = time.monotonic() - self._oldest_since
                answering = not self._sink_status.startswith("UNREACHABLE")
                if self._unacked and waited > self._ack_timeout and not answering:
                    log.warning(
                        "sink.ack_timeout",
                        sink=self.sink_id,
                        unacked=len(self._unacked),
                        waited_seconds=round(waited, 1),
                        ack_timeout_seconds=self._ack_timeout,
                        serving=self._sink_status,
                    )
                    channel, self._channel = self._channel, None
                    if channel is not None:
                        with contextlib.suppress(Exception):
                            async with asyncio.timeout(5):
                                await channel.close()
                    raise AckTimeoutError(
                        f"no ack for {waited:.0f} s (ingest.ack_timeout_seconds"
                        f" {self._ack_timeout:g}) and no answer to health checks: reconnecting"
                    )
        finally:
            if not read.done():
                read.cancel()

    async def _write_loop(self, call: Any, outbox: asyncio.Queue[events_pb2.EventBatch]) -> None:
        while True:
            batch = await outbox.get()
            if batch.batch_id not in self._unacked:
                continue
            await call.write(batch)
            self._connected = True

    async def _handle_ack(self, ack: sink_pb2.BatchAck) -> None:
        if ack.status != sink_pb2.ACK_STATUS_WRITTEN:
            # Not processed: keep it; it is resent on the next stream.
            raise ConnectionError(f"sink rejected batch {ack.batch_id}: {ack.error}")
        batch_id = ack.batch_id
        if ack.durable_positions or batch_id in self._unacked:
            # The sink answers on this connection: the ack timeout starts again.
            self._oldest_since = time.monotonic()
        if ack.durable_positions:
            await self._release_durable(ack)
        if batch_id not in self._unacked:
            # Batch 0: only durable positions; else an ack for a batch resent after a
            # reconnect that was acked before.
            return
        self.last_ack_monotonic = time.monotonic()
        first = batch_id not in self._accepted
        if first:
            self._accepted.add(batch_id)
            self._credits.release()
        if ack.durable:
            await self._release(batch_id, ack if first else None)
        elif first:
            await self._on_ack(
                self.sink_id,
                DeliveryAck(
                    batch_id,
                    accepted=True,
                    durable=False,
                    written=ack.written,
                    skipped=ack.skipped,
                    dead_lettered=ack.dead_lettered,
                ),
            )

    async def _release_durable(self, ack: sink_pb2.BatchAck) -> None:
        """Release the accepted batches the sink's durable positions cover."""
        durable = {d.lane: Position(d.position, d.sequence) for d in ack.durable_positions}
        for other in [b for b in self._unacked if b in self._accepted]:
            last = self._last.get(other)
            if last and all(
                lane in durable and position <= durable[lane] for lane, position in last.items()
            ):
                await self._release(other, None)

    async def _release(self, batch_id: int, ack: sink_pb2.BatchAck | None) -> None:
        """The batch is durable at the sink: forget it and tell the pump (with the counts
        of `ack` when this is also its first answer)."""
        self._unacked.pop(batch_id, None)
        self._accepted.discard(batch_id)
        self._last.pop(batch_id, None)
        self.acked_batches += 1
        await self._on_ack(
            self.sink_id,
            DeliveryAck(
                batch_id,
                accepted=True,
                durable=True,
                written=ack.written if ack else 0,
                skipped=ack.skipped if ack else 0,
                dead_lettered=ack.dead_lettered if ack else 0,
            ),
        )

    async def _poll_health(self) -> None:
        while True:
            try:
                if self._channel is not None:
                    stub = health_pb2_grpc.HealthStub(self._channel)
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    self._sink_status = health_pb2.HealthCheckResponse.ServingStatus.Name(
                        reply.status
                    )
            except grpc.aio.AioRpcError as exc:
                self._sink_status = f"UNREACHABLE ({exc.code().name})"
            except grpc.aio.UsageError:
                pass  # the channel was closed after an ack timeout; the next one is polled
            except asyncio.CancelledError:
                # Closing the channel (after a Describe or ack timeout) cancels the check in
                # flight with CancelledError; only stopping this poller may end it.
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
            except Exception as exc:  # a dead poller would leave the health frozen
                self._sink_status = f"UNKNOWN ({type(exc).__name__})"
                log.warning("sink.health_poll_failed", sink=self.sink_id, error=repr(exc))
            await asyncio.sleep(1.0)
