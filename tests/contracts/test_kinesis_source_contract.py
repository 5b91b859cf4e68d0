"""The event-source contract (tests/contracts/test_event_source_contract.py) run against the
Kinesis source on moto_server: its tests are imported here and run with a Kinesis harness.

Lanes are the publisher's key-hash lanes (one partition key each); with two lanes and two
shards, each lane is in its own shard. A transaction is one record on its lane, as the
capture stage publishes it. Revocation: another replica holds the lane's shard lease (the
lease item is taken over in DynamoDB, as after an expiry)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import pytest

from adapters.kinesis.lanes import explicit_hash_key, lane_name, partition_key
from adapters.kinesis.leases import LeaseTable, lease_key
from adapters.kinesis.provisioner import KinesisProvisioner
from adapters.kinesis.source import KinesisEventSource, RecordHandle
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import EventSource
from services.capture.payload import ArrowBatchCodec
from tests.contracts import test_event_source_contract as contract
from tests.support.kinesis import clients, settings_for

ITEMS = TableSchema("public", "items", (Column("id", 20, "bigint", True), Column("n", 25, "text")))

test_order_per_lane = contract.test_order_per_lane
test_acked_changes_are_not_delivered_again_and_unacked_ones_are = (
    contract.test_acked_changes_are_not_delivered_again_and_unacked_ones_are
)
test_nothing_acked_means_everything_is_delivered_again = (
    contract.test_nothing_acked_means_everything_is_delivered_again
)
_FIELDS = {f.name for f in dataclasses.fields(contract.Harness)}
if "revoke" in _FIELDS:  # the transport-neutral revocation test
    test_a_revoked_lane_is_announced_and_nothing_of_it_follows = (
        contract.test_a_revoked_lane_is_announced_and_nothing_of_it_follows
    )


@pytest.fixture
def transport(moto_server: Any) -> Iterator[Any]:
    settings = settings_for(moto_server.endpoint_url, shards=2, lease_seconds=3.0)
    asyncio.run(KinesisProvisioner(settings).provision())
    kinesis, dynamodb = clients(settings)
    stream = settings.streams["public.items"]
    lanes = (lane_name(stream, 0), lane_name(stream, 1))
    shard_of: dict[str, str] = {}
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        low, high = (int(x) for x in shard["HashKeyRange"].values())
        for i, lane in enumerate(lanes):
            if low <= int(explicit_hash_key(i, 2)) <= high:
                shard_of[lane] = shard["ShardId"]
    codec = ArrowBatchCodec()
    majors = iter(range(1, 1_000_000))

    def produce(keys: list[int], lane: str) -> None:
        index = lanes.index(lane)
        major = next(majors)
        events = [
            SourceEvent(Operation.CREATE, ITEMS, Position(major, i), after=(str(k), f"n{k}"))
            for i, k in enumerate(keys)
        ]
        kinesis.put_record(
            StreamName=stream,
            Data=codec.encode(settings.pipeline_id, lane, events),
            PartitionKey=partition_key(index),
            ExplicitHashKey=explicit_hash_key(index, 2),
        )

    def revoke(source: EventSource, lost: list[str]) -> None:
        for lane in lost:
            dynamodb.update_item(  # another replica holds the lease from now on
                TableName=settings.checkpoint_table,
                Key={"lease_key": {"S": lease_key(settings.pipeline_id, stream, shard_of[lane])}},
                UpdateExpression="SET #o = :o, #e = :e",
                ExpressionAttributeNames={"#o": "owner", "#e": "expires_at"},
                ExpressionAttributeValues={
                    ":o": {"S": "another-replica"},
                    ":e": {"N": str(time.time() + 3600)},
                },
            )

    def checkpoint(lane: str) -> str | None:
        table = LeaseTable(dynamodb, settings.checkpoint_table, settings.pipeline_id)
        return {x.shard_id: x.checkpoint for x in table.leases()}.get(shard_of[lane])

    async def check_ack_ignored(source: EventSource, lane: str) -> None:
        before = checkpoint(lane)
        late = RecordHandle(stream, shard_of[lane], 1, 10**9, str(10**9))
        await source.ack(lane, [late])
        await asyncio.sleep(0.5)
        assert checkpoint(lane) == before

    def open_source() -> EventSource:
        return KinesisEventSource(settings, codec)

    if "revoke" in _FIELDS:
        yield contract.Harness(produce, open_source, lanes, revoke, check_ack_ignored)
    else:
        yield contract.Harness(produce, open_source, lanes, False)
    asyncio.run(KinesisProvisioner(settings).teardown())
