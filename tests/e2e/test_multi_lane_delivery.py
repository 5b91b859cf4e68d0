"""Batches of several lanes end to end: a source of four key-hash lanes, the ingest pump in
this process sending to a real `cdc sink` process over gRPC, the PostgreSQL sink on a real
database. The sink process is killed with SIGKILL mid-stream and started again, and the
pump "crashes" too (its task cancelled with batches in flight, its memory gone) and a new
one reads on from the acked offsets. Afterwards the sink holds exactly the final row of
every key (compared row by row) and the applied position of every lane.

The multi-lane source is the shared fake (`tests/support/fakes.py` `FakeLog`, a durable log
with acked offsets per lane, like Kafka partitions): this release has no real transport of
several lanes yet (the Kafka, Pub/Sub and Kinesis sources come with their own tests), so
the pump's crash is a cancelled task rather than a killed process."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg

from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import DeliveryAck, OutboundBatch, SourceChunk
from domain.routing import Router, RoutingRule
from services.ingest.service import IngestService
from services.ingest.sink_channel import SinkChannel
from tests.support.fakes import FakeLog, LogSource
from tests.support.pipeline import free_port, sink_stage, write_configs
from tests.support.postgres import PgTestContext

ITEMS = TableSchema("public", "items", (Column("id", 20, "bigint", True), Column("v", 25, "text")))
LANES = ("k0", "k1", "k2", "k3")


class _Source(LogSource):
    """Reads each lane on from what it handed out (not only from the acked offsets), and
    waits for new events while the log grows."""

    async def chunks(self) -> AsyncIterator[SourceChunk]:
        cursors = {lane: self.log.acked.get(lane, 0) for lane in LANES}
        while not self.stopped:
            progressed = False
            for lane in LANES:
                events = self.log.lanes.get(lane, [])
                start = cursors[lane]
                if start >= len(events):
                    continue
                end = min(len(events), start + self.chunk_events)
                cursors[lane] = end
                progressed = True
                yield SourceChunk(lane, events[start:end], end)
            if not progressed:
                await asyncio.sleep(0.005)


def _produce(log: FakeLog, rng: random.Random, n: int, state: dict[int, str | None]) -> None:
    """`n` changes of keys 0..299, each key always in the same lane (its hash lane)."""
    for _ in range(n):
        key = rng.randrange(300)
        lane = LANES[key % len(LANES)]
        position = Position(len(log.lanes.get(lane, [])) + 1, 0)
        if state.get(key) is not None and rng.random() < 0.2:
            event = SourceEvent(Operation.DELETE, ITEMS, position, before=(str(key), None))
            state[key] = None
        else:
            value = f"v{rng.randrange(10**9)}"
            op = Operation.UPDATE if state.get(key) is not None else Operation.CREATE
            event = SourceEvent(op, ITEMS, position, after=(str(key), value))
            state[key] = value
        log.append(lane, event)


def test_multi_lane_batches_survive_a_killed_sink_and_a_crashed_pump(
    pg: PgTestContext, tmp_path: Path
) -> None:
    replica_db = pg.new_database("replica")
    files = write_configs(
        tmp_path,
        host=pg.host,
        port=pg.port,
        source_db=replica_db,  # unused: the source is the log below
        replica_db=replica_db,
        tables=["public.items"],
    )
    port = free_port()
    sink = sink_stage(files, tmp_path, port).start()
    log = FakeLog()
    for lane in LANES:
        log.lanes[lane] = []
    state: dict[int, str | None] = {}
    rng = random.Random(5)
    lanes_per_batch: list[int] = []

    def pump() -> tuple[IngestService, SinkChannel]:
        service: IngestService

        async def on_ack(name: str, ack: DeliveryAck) -> None:
            await service.on_ack(name, ack)

        channel = SinkChannel("replica", f"127.0.0.1:{port}", 8, on_ack)
        send = channel.send

        async def recording_send(batch: OutboundBatch) -> None:  # type: ignore[override]
            lanes_per_batch.append(len(batch.lanes))
            await send(batch)

        channel.send = recording_send  # type: ignore[method-assign]
        service = IngestService(
            "e2e",
            _Source(log, chunk_events=7),
            Router([RoutingRule("replica")]),
            {"replica": channel},
            batch_max_events=60,
        )
        return service, channel

    async def produce_for(seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            _produce(log, rng, 40, state)
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        service, channel = pump()
        running = asyncio.create_task(service.run())
        await produce_for(1.5)
        sink.kill9()  # mid-stream: batches in flight, some written, some not
        await produce_for(0.5)
        sink.start()
        await produce_for(1.5)
        # The pump dies with batches in flight: its task and its stream end, undrained,
        # as with the process.
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await channel.stop()
        await produce_for(0.5)
        service, _ = pump()  # a new pump: only the acked offsets survived
        running = asyncio.create_task(service.run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        while any(log.acked.get(lane, 0) < len(log.lanes[lane]) for lane in LANES):
            assert loop.time() < deadline, (log.acked, {k: len(v) for k, v in log.lanes.items()})
            assert not running.done(), running
            await asyncio.sleep(0.05)
        service.request_stop()
        await asyncio.wait_for(running, 30)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 180))
        with psycopg.connect(pg.dsn(replica_db)) as conn:
            rows = conn.execute("SELECT id, v FROM public.items ORDER BY id").fetchall()
            offsets = dict(
                conn.execute(
                    "SELECT partition, major FROM public._cdc_offsets WHERE pipeline_id = 'e2e'"
                ).fetchall()
            )
    finally:
        if sink.alive():
            sink.terminate()
    expected = sorted((k, v) for k, v in state.items() if v is not None)
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected, strict=True):
        assert got == want
    assert {lane: int(major) for lane, major in offsets.items()} == {
        lane: len(log.lanes[lane]) for lane in LANES
    }
    assert max(lanes_per_batch) > 1, "no batch carried several lanes"
    assert sum(len(v) for v in log.lanes.values()) > 1000
