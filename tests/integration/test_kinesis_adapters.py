"""The Kinesis adapters against a real emulator (moto_server): provisioning, publishing,
reading with leases and checkpoints, dead letters, iterator expiry, the lag monitor.

moto's sequence numbers are small per-shard integers (the source compares them as ints, as
it does AWS' 56-digit ones). Failures moto cannot produce on demand (an expired iterator, a
throttled or partly failed put) are injected by wrapping the real client: the calls still
go to the emulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from adapters.kinesis.leases import LeaseTable, lease_key
from adapters.kinesis.monitor import KinesisMonitor
from adapters.kinesis.provisioner import TAG, KinesisProvisioner
from adapters.kinesis.publisher import KinesisPublisher
from adapters.kinesis.settings import KinesisSettings
from adapters.kinesis.source import KinesisEventSource, decode_dead_letter
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import DeliveryAck, OutboundBatch, SourceChunk
from services.capture.payload import ArrowBatchCodec
from tests.support.kinesis import clients, settings_for

ITEMS = TableSchema("public", "items", (Column("id", 20, "bigint", True), Column("n", 25, "text")))
OTHER = TableSchema("public", "other", (Column("id", 20, "bigint", True), Column("n", 25, "text")))


def events(
    keys: range | list[int], lsn0: int = 1000, table: TableSchema = ITEMS
) -> list[SourceEvent]:
    return [
        SourceEvent(Operation.CREATE, table, Position(lsn0 + i, 0), after=(str(k), f"n{k}"))
        for i, k in enumerate(keys)
    ]


def key(event: SourceEvent) -> int:
    assert event.after is not None
    return int(event.after[0] or 0)


@pytest.fixture
def endpoint(moto_server: Any) -> str:
    return str(moto_server.endpoint_url)


async def provisioned(settings: KinesisSettings) -> None:
    await KinesisProvisioner(settings).provision()


async def publish(
    settings: KinesisSettings, batches: list[list[SourceEvent]], **kw: Any
) -> list[DeliveryAck]:
    acks: list[DeliveryAck] = []

    async def on_ack(name: str, ack: DeliveryAck) -> None:
        acks.append(ack)

    publisher = KinesisPublisher(settings, ArrowBatchCodec(), on_ack, **kw)
    publisher.start()
    try:
        for i, evs in enumerate(batches):
            await publisher.send(OutboundBatch(i + 1, settings.pipeline_id, ("slot",), evs))
        assert await publisher.drain(30)
    finally:
        await publisher.stop()
    return acks


async def take(
    chunks: AsyncIterator[SourceChunk], count: int, timeout: float = 20
) -> list[SourceChunk]:
    """Chunks until `count` events (or records, for empty chunks) came."""
    out: list[SourceChunk] = []
    seen = 0
    while seen < count:
        chunk = await asyncio.wait_for(anext(chunks), timeout)
        out.append(chunk)
        seen += len(chunk.events) or (1 if chunk.ack is not None else 0)
    return out


def stored_checkpoints(settings: KinesisSettings) -> dict[str, str | None]:
    _, dynamodb = clients(settings)
    table = LeaseTable(dynamodb, settings.checkpoint_table, settings.pipeline_id)
    return {lease.shard_id: lease.checkpoint for lease in table.leases()}


def all_streams(kinesis: Any) -> set[str]:
    """Every stream name, through list_streams' pages."""
    names: list[str] = []
    page = kinesis.list_streams()
    names += page["StreamNames"]
    while page.get("HasMoreStreams"):
        page = kinesis.list_streams(ExclusiveStartStreamName=names[-1])
        names += page["StreamNames"]
    return set(names)


def test_provisioning_is_idempotent_and_teardown_removes_only_what_it_created(
    endpoint: str,
) -> None:
    settings = settings_for(endpoint, tables=("public.items", "public.other"), shards=3)
    kinesis, dynamodb = clients(settings)
    foreign = settings.dlq_stream(settings.streams["public.other"])
    assert foreign is not None
    kinesis.create_stream(StreamName=foreign, ShardCount=1)  # someone else's, same name

    async def scenario() -> None:
        await provisioned(settings)
        await provisioned(settings)  # again: nothing changes, nothing fails

    asyncio.run(scenario())
    for stream in settings.streams.values():
        summary = kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
        assert (summary["StreamStatus"], summary["OpenShardCount"]) == ("ACTIVE", 3)
    assert (
        dynamodb.describe_table(TableName=settings.checkpoint_table)["Table"]["TableStatus"]
        == "ACTIVE"
    )
    asyncio.run(KinesisProvisioner(settings).teardown())
    left = all_streams(kinesis)  # the worker's moto holds other tests' streams too
    assert not left & set(settings.streams.values())
    assert foreign in left  # not tagged as ours: kept
    assert kinesis.list_tags_for_stream(StreamName=foreign)["Tags"] == [] or all(
        t["Key"] != TAG for t in kinesis.list_tags_for_stream(StreamName=foreign)["Tags"]
    )
    assert settings.checkpoint_table not in dynamodb.list_tables()["TableNames"]
    kinesis.delete_stream(StreamName=foreign)


def test_published_changes_are_read_in_order_per_lane_with_their_positions(endpoint: str) -> None:
    settings = settings_for(endpoint, tables=("public.items", "public.other"), shards=2)
    batches = [
        events(range(0, 40), 1000),
        events(range(40, 80), 2000) + events(range(5), 2500, OTHER),
    ]

    async def scenario() -> list[SourceChunk]:
        await provisioned(settings)
        acks = await publish(settings, batches)
        assert sorted(a.batch_id for a in acks) == [1, 2] and all(a.durable for a in acks)
        source = KinesisEventSource(settings, ArrowBatchCodec())
        await source.start()
        try:
            return await take(source.chunks(), 85)
        finally:
            await source.stop()

    chunks = asyncio.run(scenario())
    by_lane: dict[str, list[SourceEvent]] = {}
    for chunk in chunks:
        by_lane.setdefault(chunk.lane, []).extend(chunk.events)
    assert len(by_lane) == 4  # 2 lanes x 2 tables (80 keys spread over both lanes)
    lanes_of_key: dict[tuple[str, int], set[str]] = {}
    for lane, evs in by_lane.items():
        positions = [e.position for e in evs]
        assert positions == sorted(positions), lane
        for e in evs:
            lanes_of_key.setdefault((e.table.table, key(e)), set()).add(lane)
    assert all(len(v) == 1 for v in lanes_of_key.values())
    assert len(lanes_of_key) == 85


def test_a_shard_checkpoint_moves_only_over_its_durable_prefix(endpoint: str) -> None:
    """Two lanes in one shard: the later record acked first does not move the checkpoint
    (the earlier one is not durable yet); a restart redelivers both."""
    settings = settings_for(endpoint, shards=1, lanes_per_table=2)

    async def scenario() -> None:
        await provisioned(settings)
        await publish(settings, [events(range(0, 20), 1000)])
        source = KinesisEventSource(settings, ArrowBatchCodec())
        await source.start()
        chunks = source.chunks()
        first, second = await take(chunks, 20)
        assert first.lane != second.lane
        await source.ack(second.lane, [second.ack])
        await asyncio.sleep(0.6)  # past the checkpoint interval and a lease renewal
        assert list(stored_checkpoints(settings).values()) == [None]
        await source.stop()
        again = KinesisEventSource(settings, ArrowBatchCodec())
        await again.start()
        chunks = again.chunks()
        replay = await take(chunks, 20)
        assert [c.lane for c in replay] == [first.lane, second.lane]
        assert [e.position for c in replay for e in c.events] == [
            e.position for c in (first, second) for e in c.events
        ]
        await again.ack(replay[0].lane, [replay[0].ack])
        await again.ack(replay[1].lane, [replay[1].ack])
        await asyncio.sleep(0.6)
        assert list(stored_checkpoints(settings).values()) == [replay[1].ack.sequence_text]
        await again.stop()
        await publish(settings, [events(range(20, 25), 3000)])
        third = KinesisEventSource(settings, ArrowBatchCodec())
        await third.start()
        rest = await take(third.chunks(), 5)
        assert sorted(key(e) for c in rest for e in c.events) == list(range(20, 25))
        await third.stop()

    asyncio.run(scenario())


async def _die(source: KinesisEventSource) -> None:
    """A replica that vanished: it stops reading and renewing, releases nothing."""
    assert source._lease_task is not None
    source._lease_task.cancel()
    for owned in source._owned.values():
        assert owned.task is not None
        owned.task.cancel()
    await asyncio.sleep(0)


def test_two_replicas_never_read_one_shard_and_a_dead_ones_shards_are_taken_over(
    endpoint: str,
) -> None:
    settings = settings_for(endpoint, shards=4, lease_seconds=2.0)

    async def scenario() -> None:
        await provisioned(settings)
        await publish(settings, [events(range(0, 200), 1000)])
        a = KinesisEventSource(settings, ArrowBatchCodec(), worker_id="a")
        b = KinesisEventSource(settings, ArrowBatchCodec(), worker_id="b")
        await a.start()
        await b.start()
        # b announced itself after a took everything: a hands over down to its share
        for _ in range(100):
            if len(a._owned) == 2 and len(b._owned) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(a._owned) == len(b._owned) == 2, (a._owned.keys(), b._owned.keys())
        assert not set(a._owned) & set(b._owned)
        read_a = await take(a.chunks(), 1)
        for chunk in read_a:
            await a.ack(chunk.lane, [chunk.ack])
        await asyncio.sleep(0.5)
        a_shards = set(a._owned)
        await _die(a)
        for _ in range(100):
            if len(b._owned) == 4:
                break
            await asyncio.sleep(0.1)
        assert set(b._owned) >= a_shards
        # b reads everything a did not make durable, and nothing a did
        total = 200 - sum(len(c.events) for c in read_a)
        got = []
        chunks = b.chunks()
        while len(got) < total:
            chunk = await asyncio.wait_for(anext(chunks), 20)
            got += [key(e) for e in chunk.events]
        done_by_a = {key(e) for c in read_a for e in c.events}
        assert sorted(got) == sorted(set(range(200)) - done_by_a)
        await b.stop()

    asyncio.run(scenario())


def test_a_lost_lease_revokes_its_lanes_and_late_acks_move_nothing(endpoint: str) -> None:
    settings = settings_for(endpoint, shards=1)

    async def scenario() -> None:
        await provisioned(settings)
        await publish(settings, [events(range(0, 10), 1000)])
        source = KinesisEventSource(settings, ArrowBatchCodec(), worker_id="a")
        await source.start()
        chunks = source.chunks()
        first = (await take(chunks, 10))[0]
        _, dynamodb = clients(settings)
        stream = settings.streams["public.items"]
        shard = first.ack.shard_id
        dynamodb.update_item(  # another replica took it (as after our lease expired)
            TableName=settings.checkpoint_table,
            Key={"lease_key": {"S": lease_key(settings.pipeline_id, stream, shard)}},
            UpdateExpression="SET #o = :o",
            ExpressionAttributeNames={"#o": "owner"},
            ExpressionAttributeValues={":o": {"S": "thief"}},
        )
        revoked = await asyncio.wait_for(anext(chunks), 10)
        assert revoked.revoked == frozenset({first.lane}) and not revoked.events
        await source.ack(first.lane, [first.ack])
        await asyncio.sleep(0.5)
        assert stored_checkpoints(settings) == {shard: None}
        await source.stop()

    asyncio.run(scenario())


def test_a_poison_record_goes_to_the_dlq_stream_and_reading_goes_on(endpoint: str) -> None:
    settings = settings_for(endpoint, shards=1)
    stream = settings.streams["public.items"]
    dlq = settings.dlq_stream(stream)
    assert dlq is not None

    async def scenario() -> None:
        await provisioned(settings)
        kinesis, _ = clients(settings)
        kinesis.put_record(StreamName=stream, Data=b"\xff not a batch", PartitionKey="k0")
        await publish(settings, [events(range(0, 3), 1000)])
        source = KinesisEventSource(settings, ArrowBatchCodec())
        await source.start()
        chunks = source.chunks()
        poison, good = await take(chunks, 4)
        assert poison.events == [] and poison.ack is not None
        assert [key(e) for e in good.events] == [0, 1, 2]
        await source.ack(poison.lane, [poison.ack])
        await source.ack(good.lane, [good.ack])
        await asyncio.sleep(0.5)
        assert list(stored_checkpoints(settings).values()) == [good.ack.sequence_text]
        await source.stop()
        shard = kinesis.list_shards(StreamName=dlq)["Shards"][0]["ShardId"]
        it = kinesis.get_shard_iterator(
            StreamName=dlq, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
        )
        records = kinesis.get_records(ShardIterator=it["ShardIterator"])["Records"]
        assert len(records) == 1
        header, data = decode_dead_letter(records[0]["Data"])
        assert data == b"\xff not a batch"
        assert header["stream"] == stream and header["partition_key"] == "k0"
        assert header["sequence_number"] == poison.ack.sequence_text and header["error"]

    asyncio.run(scenario())


class Flaky:
    """The real client, with some calls failing first (what moto cannot be told to do)."""

    def __init__(self, real: Any, fail: Callable[[str, dict[str, Any]], Any]) -> None:
        self._real = real
        self._fail = fail
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._real, name)

        def call(**kwargs: Any) -> Any:
            self.calls.append(name)
            injected = self._fail(name, kwargs)
            if injected is not None:
                return injected(method, kwargs)
            return method(**kwargs)

        return call


def client_error(code: str, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"injected {code}"}}, operation)


def test_an_expired_iterator_is_replaced_without_loss_or_duplicates(endpoint: str) -> None:
    settings = settings_for(endpoint, shards=1, max_records_per_shard=3)
    state = {"gets": 0}

    def fail(name: str, kwargs: dict[str, Any]) -> Any:
        if name == "get_records":
            state["gets"] += 1
            if state["gets"] in (2, 4):

                def raise_expired(method: Any, kw: dict[str, Any]) -> Any:
                    raise client_error("ExpiredIteratorException", "GetRecords")

                return raise_expired
        return None

    async def scenario() -> list[int]:
        await provisioned(settings)
        await publish(settings, [events([k], 1000 + k) for k in range(10)])
        kinesis, _ = clients(settings)
        flaky = Flaky(kinesis, fail)
        source = KinesisEventSource(settings, ArrowBatchCodec(), kinesis_client=flaky)
        await source.start()
        try:
            chunks = await take(source.chunks(), 10)
        finally:
            await source.stop()
        assert flaky.calls.count("get_shard_iterator") >= 3  # the first, then after each expiry
        return [key(e) for c in chunks for e in c.events]

    assert sorted(asyncio.run(scenario())) == list(range(10))


def test_publisher_retries_throttled_and_partly_failed_puts_until_every_record_is_in(
    endpoint: str,
) -> None:
    settings = settings_for(endpoint, shards=2)
    state = {"puts": 0}
    acked_while_failing: list[int] = []

    def fail(name: str, kwargs: dict[str, Any]) -> Any:
        if name != "put_records":
            return None
        state["puts"] += 1
        n = state["puts"]
        if n == 1:  # the whole call throttled

            def throttled(method: Any, kw: dict[str, Any]) -> Any:
                raise client_error("ProvisionedThroughputExceededException", "PutRecords")

            return throttled
        if n in (2, 3):  # the first record fails, the others go in

            def partial(method: Any, kw: dict[str, Any]) -> Any:
                records = kw["Records"]
                rest = (
                    method(StreamName=kw["StreamName"], Records=records[1:])
                    if records[1:]
                    else {"Records": []}
                )
                failed = {
                    "ErrorCode": "ProvisionedThroughputExceededException",
                    "ErrorMessage": "injected",
                }
                return {"FailedRecordCount": 1, "Records": [failed, *rest["Records"]]}

            return partial
        return None

    async def scenario() -> None:
        await provisioned(settings)
        kinesis, _ = clients(settings)
        flaky = Flaky(kinesis, fail)
        acks: list[DeliveryAck] = []

        async def on_ack(name: str, ack: DeliveryAck) -> None:
            if state["puts"] <= 3:
                acked_while_failing.append(ack.batch_id)
            acks.append(ack)

        publisher = KinesisPublisher(settings, ArrowBatchCodec(), on_ack, kinesis_client=flaky)
        publisher.start()
        await publisher.send(
            OutboundBatch(1, settings.pipeline_id, ("slot",), events(range(0, 30), 1000))
        )
        await publisher.send(
            OutboundBatch(2, settings.pipeline_id, ("slot",), events(range(0, 30), 2000))
        )
        assert await publisher.drain(30)
        await publisher.stop()
        assert sorted(a.batch_id for a in acks) == [1, 2]
        assert publisher.stats.records_failed >= 3
        source = KinesisEventSource(settings, ArrowBatchCodec())
        await source.start()
        chunks = await take(source.chunks(), 60)
        await source.stop()
        by_lane: dict[str, list[Position]] = {}
        for c in chunks:
            by_lane.setdefault(c.lane, []).extend(e.position for e in c.events)
        everything = sorted(p for ps in by_lane.values() for p in ps)
        assert everything == sorted(e.position for b in (1000, 2000) for e in events(range(30), b))
        for positions in by_lane.values():  # retried records never land behind later ones
            assert positions == sorted(positions)

    asyncio.run(scenario())
    assert acked_while_failing == []


def test_the_monitor_reports_millis_behind_latest_per_shard(endpoint: str) -> None:
    settings = settings_for(endpoint, shards=2)

    async def scenario() -> dict[str, Any]:
        await provisioned(settings)
        await publish(settings, [events(range(0, 20), 1000)])
        source = KinesisEventSource(settings, ArrowBatchCodec(), worker_id="w1")
        await source.start()
        chunks = await take(source.chunks(), 20)
        for c in chunks:
            await source.ack(c.lane, [c.ack])
        await asyncio.sleep(1.5)  # a lease renewal stores MillisBehindLatest
        monitor = KinesisMonitor(settings, interval_seconds=0.2)
        await monitor.start()
        try:
            reading = await monitor.lag()
            health = await monitor.health()
        finally:
            await monitor.stop()
            await source.stop()
        assert health.status.value == "ok"
        return reading

    reading = asyncio.run(scenario())
    assert len(reading["shards"]) == 2
    for shard in reading["shards"].values():
        assert shard["owner"] == "w1"
        assert shard["millis_behind_latest"] == 0
        assert shard["checkpoint"] is not None
    assert reading["unowned_shards"] == []
