"""Resharding on a faithful emulator: kinesis-local (npm) for Kinesis, moto_server for the
DynamoDB lease table. A stream of one shard holding two lanes is split into two shards while
changes keep coming: the children are read only after the parent is finished (read to its
end and every record of it durable), so each lane's positions keep increasing. Sequence
numbers here are AWS-like 56-digit integers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from adapters.kinesis.provisioner import KinesisProvisioner
from adapters.kinesis.publisher import KinesisPublisher
from adapters.kinesis.source import KinesisEventSource
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import DeliveryAck, OutboundBatch, SourceChunk
from services.capture.payload import ArrowBatchCodec
from tests.support import kinesis_local
from tests.support.kinesis import clients, settings_for

ITEMS = TableSchema("public", "items", (Column("id", 20, "bigint", True), Column("n", 25, "text")))


@pytest.fixture(scope="module")
def kinesis_local_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        server = kinesis_local.start(tmp_path_factory.mktemp("kinesis-local"))
    except kinesis_local.KinesisLocalUnavailable as exc:
        pytest.skip(f"resharding needs kinesis-local: {exc}")
    try:
        yield server.endpoint_url
    finally:
        server.stop()


def batch(keys: range, lsn0: int) -> list[SourceEvent]:
    return [
        SourceEvent(Operation.CREATE, ITEMS, Position(lsn0 + i), after=(str(k), f"n{k}"))
        for i, k in enumerate(keys)
    ]


def test_children_are_read_after_their_parent_is_finished(
    kinesis_local_url: str, moto_server: Any, tmp_path: Path
) -> None:
    settings = settings_for(moto_server.endpoint_url, shards=1, lanes_per_table=2)
    _, dynamodb = clients(settings)
    kinesis = boto3.client(
        "kinesis",
        endpoint_url=kinesis_local_url,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    stream = settings.streams["public.items"]

    async def publish(events: list[SourceEvent], batch_id: int) -> None:
        done = asyncio.Event()

        async def on_ack(_: str, ack: DeliveryAck) -> None:
            done.set()

        publisher = KinesisPublisher(settings, ArrowBatchCodec(), on_ack, kinesis_client=kinesis)
        publisher.start()
        await publisher.send(OutboundBatch(batch_id, settings.pipeline_id, ("slot",), events))
        await asyncio.wait_for(done.wait(), 30)
        await publisher.stop()

    async def scenario() -> list[SourceChunk]:
        await KinesisProvisioner(
            settings, kinesis_client=kinesis, dynamodb_client=dynamodb
        ).provision()
        await publish(batch(range(40), 1000), 1)
        kinesis.update_shard_count(
            StreamName=stream, TargetShardCount=2, ScalingType="UNIFORM_SCALING"
        )
        for _ in range(100):
            shards = kinesis.list_shards(StreamName=stream)["Shards"]
            summary = kinesis.describe_stream_summary(StreamName=stream)
            if len(shards) == 3 and summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
                break
            await asyncio.sleep(0.1)
        parent = next(s["ShardId"] for s in shards if "ParentShardId" not in s)
        await publish(batch(range(40), 2000), 2)  # the same keys: into the children
        source = KinesisEventSource(
            settings, ArrowBatchCodec(), kinesis_client=kinesis, dynamodb_client=dynamodb
        )
        await source.start()
        chunks = source.chunks()
        got: list[SourceChunk] = []
        # The parent's records, not acked yet: nothing of the children may come.
        while sum(len(c.events) for c in got) < 40:
            got.append(await asyncio.wait_for(anext(chunks), 20))
        assert {c.ack.shard_id for c in got} == {parent}
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(anext(chunks), 3)
        chunks = source.chunks()  # the timeout closed the generator; a new one reads on
        for c in got:
            await source.ack(c.lane, [c.ack])
        while sum(len(c.events) for c in got) < 80:
            chunk = await asyncio.wait_for(anext(chunks), 30)
            got.append(chunk)
            await source.ack(chunk.lane, [chunk.ack])
        await source.stop()
        return got

    got = asyncio.run(scenario())
    children = {c.ack.shard_id for c in got[-2:]}
    assert len({c.ack.shard_id for c in got}) >= 2 and children
    by_lane: dict[str, list[Position]] = {}
    for chunk in got:
        by_lane.setdefault(chunk.lane, []).extend(e.position for e in chunk.events)
    assert len(by_lane) == 2
    for positions in by_lane.values():
        assert positions == sorted(positions)
    assert sorted(p for ps in by_lane.values() for p in ps) == [
        e.position for e in batch(range(40), 1000) + batch(range(40), 2000)
    ]
    assert all(c.ack.sequence > 10**40 for c in got)  # AWS-like sequence numbers, as ints
