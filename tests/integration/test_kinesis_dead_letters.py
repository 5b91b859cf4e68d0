"""The kinesis transport's dead letters against a real emulator (moto_server) and a real HTTP
receiver (tests/support/webhook_receiver.py): a webhook sink's refused change goes to the
DLQ stream of its table, `cdc dlq list --json` shows it, `cdc dlq replay --all` delivers it
once the receiver is fixed and it is no longer listed (a "removed" marker in the lease
table: records cannot be deleted from a stream).

Failures moto cannot produce on demand (a refused or partly failed put_records) are
injected by wrapping the real client: the other calls still go to the emulator."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.exceptions import ClientError

from adapters.config import load_pipeline, load_platform
from adapters.kinesis.dead_letters import PUT_ATTEMPTS, KinesisDeadLetters
from adapters.kinesis.leases import LeaseTable
from adapters.kinesis.provisioner import KinesisProvisioner
from adapters.kinesis.source import encode_dead_letter
from adapters.webhook.payload import event_id
from adapters.webhook.sink import WebhookSinkWriter
from domain.errors import SinkUnavailableError
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import DeadLetter, SinkBatch
from services import registry
from services.capture.payload import ArrowBatchCodec
from services.kinesis import kinesis_settings
from tests.support.kinesis import clients, set_aws_env, settings_for
from tests.support.pipeline import REPO, cdc_argv
from tests.support.webhook_receiver import Faults, WebhookReceiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ITEMS = TableSchema("public", "items", (Column("id", 20, "bigint", True), Column("n", 25, "text")))
OTHER = TableSchema("public", "other", (Column("id", 20, "bigint", True), Column("n", 25, "text")))
POISONED = 7


def change(k: int, lsn: int, table: TableSchema = ITEMS) -> SourceEvent:
    return SourceEvent(Operation.CREATE, table, Position(lsn, 0), after=(str(k), f"n{k}"))


@pytest.fixture
def endpoint(moto_server: Any) -> str:
    return str(moto_server.endpoint_url)


class FailingPuts:
    """The real client; put_records answers with `answer(method, kwargs)` while it is set."""

    def __init__(self, real: Any, answer: Callable[[Any, dict[str, Any]], Any] | None) -> None:
        self._real = real
        self.answer = answer
        self.puts = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._real, name)
        if name != "put_records":
            return method

        def put_records(**kwargs: Any) -> Any:
            self.puts += 1
            if self.answer is None:
                return method(**kwargs)
            return self.answer(method, kwargs)

        return put_records


def first_refused(method: Any, kwargs: dict[str, Any]) -> Any:
    """The first record refused (throttled), the others put for real."""
    records = kwargs["Records"]
    rest = method(StreamName=kwargs["StreamName"], Records=records[1:]) if records[1:] else {}
    refused = {"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "injected"}
    return {"FailedRecordCount": 1, "Records": [refused, *rest.get("Records", [])]}


def unavailable(method: Any, kwargs: dict[str, Any]) -> Any:
    raise ClientError(
        {"Error": {"Code": "ServiceUnavailable", "Message": "injected"}}, "PutRecords"
    )


def test_dead_letters_are_put_listed_per_sink_and_removed_by_marker(endpoint: str) -> None:
    settings = settings_for(endpoint, tables=("public.items", "public.other"), shards=1)
    items_dlq = settings.dlq_stream(settings.streams["public.items"])
    other_dlq = settings.dlq_stream(settings.streams["public.other"])
    letters = [
        DeadLetter(
            change(k, 100 + k, ITEMS if k < 2 else OTHER),
            f"HTTP 400 for {k}",
            "sink",
            pipeline_id=settings.pipeline_id,
            sink_id="hook" if k != 1 else "other-hook",
            lane=f"lane{k}",
            error_class="HTTP 400",
            attempts=k + 1,
        )
        for k in range(3)
    ]

    async def scenario() -> None:
        await KinesisProvisioner(settings).provision()
        kinesis, dynamodb = clients(settings)
        flaky = FailingPuts(kinesis, None)
        flaky.answer = lambda method, kw: (
            first_refused(method, kw) if flaky.puts == 1 else method(**kw)
        )
        store = KinesisDeadLetters(
            settings, ArrowBatchCodec(), kinesis_client=flaky, dynamodb_client=dynamodb
        )
        # The first put (items' DLQ stream) refuses lane0's record: it is put again after
        # lane1's; then the other table's DLQ stream.
        await store.dead_letter(letters)
        assert flaky.puts == 3
        # The source's poison record (not a change) in the same DLQ stream is not listed.
        kinesis.put_record(
            StreamName=items_dlq,
            Data=encode_dead_letter({"stage": "kinesis-source", "error": "x"}, b"\xff"),
            PartitionKey="k",
        )
        listed = await store.list()
        assert [(d.sink_id, d.lane, d.event.position, d.location) for d in listed] == [
            ("other-hook", "lane1", Position(101, 0), items_dlq),
            ("hook", "lane0", Position(100, 0), items_dlq),
            ("hook", "lane2", Position(102, 0), other_dlq),
        ]
        assert listed[1].error == "HTTP 400 for 0" and listed[0].attempts == 2
        assert listed[2].error_class == "HTTP 400" and listed[2].event.table == OTHER
        assert [d.lane for d in await store.list(sink_id="hook")] == ["lane0", "lane2"]
        assert len(await store.list(limit=1)) == 1
        assert [d.id for d in await store.fetch([listed[1].id])] == [listed[1].id]

        assert await store.remove([listed[0].id, "nope/1"]) == 1
        assert await store.remove([listed[0].id]) == 0  # removed already
        assert [d.id for d in await store.list()] == [listed[1].id, listed[2].id]
        # The marker lives in the lease table, and is not taken for a shard lease.
        table = LeaseTable(dynamodb, settings.checkpoint_table, settings.pipeline_id)
        assert all("#dlq-removed" not in lease.key for lease in table.leases())
        marker = dynamodb.get_item(
            TableName=settings.checkpoint_table,
            Key={"lease_key": {"S": f"{settings.pipeline_id}/#dlq-removed/{listed[0].id}"}},
            ConsistentRead=True,
        )
        assert "Item" in marker
        # Its retention outlives the default 24 hours.
        summary = kinesis.describe_stream_summary(StreamName=items_dlq)
        assert summary["StreamDescriptionSummary"]["RetentionPeriodHours"] == 168

        # A put Kinesis keeps refusing raises (the sink then holds its position back).
        flaky.answer = unavailable
        before = flaky.puts
        with pytest.raises(ClientError, match="ServiceUnavailable"):
            await store.dead_letter(letters[:1])
        assert flaky.puts - before == PUT_ATTEMPTS
        assert len(await store.list()) == 2  # nothing half-written
        await store.close()
        await KinesisProvisioner(settings).teardown()

    asyncio.run(scenario())


def write_files(tmp_path: Path, endpoint: str, url: str) -> tuple[Path, Path]:
    tag = uuid.uuid4().hex[:8]
    pipeline = {
        "pipeline_id": f"k{tag}",
        "topic_prefix": f"t{tag}",
        "source": {"database": "shop", "tables": ["public.items"]},
        "sinks": [
            {
                "sink_id": "crm",
                "sink_type": "webhook",
                "webhook": {
                    "url": url,
                    "hmac_secret": SECRET,
                    "timeout_seconds": 2,
                    "batch_size": 10,
                    "linger_ms": 0,
                },
            }
        ],
    }
    platform = {
        "transport_mode": "kinesis",
        "kinesis": {
            "region": "us-east-1",
            "endpoint_url": endpoint,
            "checkpoint_table_name": f"cp-{tag}",
        },
        "retry": {"initial_wait_seconds": 0.05, "max_wait_seconds": 0.3},
        "dlq": {"max_retries": 2},
    }
    p, q = tmp_path / "pipeline.yaml", tmp_path / "platform.yaml"
    p.write_text(yaml.safe_dump(pipeline))
    q.write_text(yaml.safe_dump(platform))
    return p, q


def cdc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cdc_argv(*args), cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_refused_webhook_change_is_dead_lettered_listed_and_replayed(
    endpoint: str, tmp_path: Path
) -> None:
    set_aws_env()  # moto takes any credentials; the `cdc` subprocesses inherit them
    faults = Faults(poisoned_keys={json.dumps({"id": POISONED})})
    with WebhookReceiver(SECRET, faults) as receiver:
        pipeline_file, platform_file = write_files(tmp_path, endpoint, receiver.url)
        platform = load_platform(platform_file)
        pipeline = load_pipeline(pipeline_file, platform=platform)
        assert not registry.check(pipeline, platform)  # a webhook sink with kinesis: accepted
        settings = kinesis_settings(pipeline, platform)
        lane = f"{settings.streams['public.items']}/0"
        provisioner = KinesisProvisioner(settings)
        asyncio.run(provisioner.provision())
        events = [change(k, 1000 + k) for k in range(1, 13)]
        poisoned_ids = {event_id(pipeline.pipeline_id, lane, e) for e in events[POISONED - 1 :][:1]}
        writer = registry.build_webhook_writer(pipeline, pipeline.sinks[0], platform)
        try:

            async def deliver(w: WebhookSinkWriter) -> Any:
                await w.start()
                try:
                    await w.write(SinkBatch(pipeline.pipeline_id, lane, 1, events, lanes=[lane]))
                    return await w.flush()
                finally:
                    await w.stop()

            # The DLQ stream unavailable: the refused change is not acknowledged.
            kinesis, _ = clients(settings)
            failing = KinesisDeadLetters(
                settings, ArrowBatchCodec(), kinesis_client=FailingPuts(kinesis, unavailable)
            )
            held = WebhookSinkWriter(
                pipeline.sinks[0].webhook,  # type: ignore[arg-type]
                pipeline.pipeline_id,
                "crm",
                router=failing,
                retry=platform.retry,
                dlq_enabled=True,
                dlq_max_retries=1,
            )
            with pytest.raises(SinkUnavailableError, match="cannot store dead letter"):
                asyncio.run(deliver(held))

            durable = asyncio.run(deliver(writer))
            assert durable == {lane: events[-1].position}
            assert receiver.bad_signatures == []
            delivered = {e["id"] for e in receiver.events}
            assert delivered == {event_id(pipeline.pipeline_id, lane, e) for e in events} - (
                poisoned_ids
            )

            listed = cdc(
                "dlq", "list", str(pipeline_file), "--platform-config", str(platform_file), "--json"
            )
            assert listed.returncode == 0, listed.stderr
            letters = [json.loads(line) for line in listed.stdout.splitlines()]
            assert len(letters) == 1, letters
            letter = letters[0]
            assert letter["sink_id"] == "crm" and letter["table"] == "public.items"
            assert letter["key"] == {"id": POISONED} and letter["error"].startswith("HTTP 400")
            assert letter["event_id"] in poisoned_ids
            assert letter["location"] == settings.dlq_stream(settings.streams["public.items"])

            # Still refused: it stays, listed once (its newest record, a new id).
            again = cdc(
                "dlq",
                "replay",
                str(pipeline_file),
                "--platform-config",
                str(platform_file),
                "--id",
                letter["id"],
            )
            assert again.returncode == 1, again.stdout + again.stderr
            assert "replayed 0 dead letter(s); 1 not delivered" in again.stdout
            kept = cdc(
                "dlq", "list", str(pipeline_file), "--platform-config", str(platform_file), "--json"
            )
            [newer] = [json.loads(line) for line in kept.stdout.splitlines()]
            assert newer["id"] != letter["id"] and newer["event_id"] == letter["event_id"]

            faults.poisoned_keys.clear()  # the receiver is fixed
            before = len(receiver.events)
            replay = cdc(
                "dlq",
                "replay",
                str(pipeline_file),
                "--platform-config",
                str(platform_file),
                "--all",
            )
            assert replay.returncode == 0, replay.stdout + replay.stderr
            assert "replayed 1 dead letter(s)" in replay.stdout
            assert {e["id"] for e in receiver.events[before:]} == poisoned_ids  # same id
            assert receiver.bad_signatures == []
            empty = cdc(
                "dlq", "list", str(pipeline_file), "--platform-config", str(platform_file), "--json"
            )
            assert empty.returncode == 0 and empty.stdout == "", empty.stdout + empty.stderr
        finally:
            asyncio.run(provisioner.teardown())
