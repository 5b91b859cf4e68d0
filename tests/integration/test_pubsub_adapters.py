"""The Pub/Sub provisioner and backlog monitor against the emulator (the `pubsub_emulator`
fixture): resources created once with the configured settings, a second provision changes
nothing, teardown removes them; the monitor's local estimate follows what is in flight."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from domain.events import Column, Operation, Position, SourceEvent, TableSchema

pytestmark = pytest.mark.integration

T = TableSchema("public", "t", (Column("id", 20, "bigint", True),))


@pytest.fixture
def emulator(pubsub_emulator: Any) -> Iterator[Any]:
    os.environ["PUBSUB_EMULATOR_HOST"] = pubsub_emulator.host_port
    yield pubsub_emulator


def test_provision_is_idempotent_and_teardown_removes_everything(emulator: Any) -> None:
    from google.api_core import exceptions as gexc
    from google.cloud import pubsub_v1

    from adapters.pubsub.naming import PipelineNames
    from adapters.pubsub.provisioner import PubSubProvisioner, SubscriptionSettings

    names = PipelineNames.of("it", "cdc", f"prov{uuid.uuid4().hex[:6]}", "dlq")
    settings = SubscriptionSettings(ordered=True, ack_deadline_seconds=42, max_delivery_attempts=7)
    first = PubSubProvisioner(names, settings)
    asyncio.run(first.provision())
    assert len(first.created) == 4
    again = PubSubProvisioner(names, settings)
    asyncio.run(again.provision())
    assert again.created == []  # nothing new, nothing replaced
    subscriber = pubsub_v1.SubscriberClient()
    try:
        sub = subscriber.get_subscription(request={"subscription": names.subscription_path})
        assert sub.enable_message_ordering is True
        assert sub.ack_deadline_seconds == 42
        assert sub.dead_letter_policy.dead_letter_topic == names.dlq_topic_path
        assert sub.dead_letter_policy.max_delivery_attempts == 7
        keep = subscriber.get_subscription(request={"subscription": names.dlq_subscription_path})
        assert keep.topic == names.dlq_topic_path
        asyncio.run(first.teardown())
        assert len(first.report) == 4 and all(r.startswith("deleted") for r in first.report)
        with pytest.raises(gexc.NotFound):
            subscriber.get_subscription(request={"subscription": names.subscription_path})
        asyncio.run(first.teardown())  # a second undeploy says so, fails nothing
        assert all("did not exist" in r for r in first.report)
    finally:
        subscriber.close()


def test_monitor_local_estimate_follows_the_messages_in_flight(emulator: Any) -> None:
    from google.cloud import pubsub_v1

    from adapters.pubsub.monitor import PubSubMonitor
    from adapters.pubsub.naming import PipelineNames
    from adapters.pubsub.provisioner import PubSubProvisioner, SubscriptionSettings
    from adapters.pubsub.source import PubSubEventSource, SourceSettings
    from services.capture.payload import ArrowBatchCodec

    names = PipelineNames.of("it", "cdc", f"mon{uuid.uuid4().hex[:6]}", "dlq")
    provisioner = PubSubProvisioner(names, SubscriptionSettings(ack_deadline_seconds=10))
    asyncio.run(provisioner.provision())
    codec = ArrowBatchCodec()
    publisher = pubsub_v1.PublisherClient(
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    )
    for i in range(3):
        event = SourceEvent(Operation.CREATE, T, Position(10 + i, 0), after=(str(i),))
        data = codec.encode("p", f"k{i}", [event])
        publisher.publish(names.topic_path, data, ordering_key=f"k{i}").result(10)
    publisher.stop()

    async def scenario() -> None:
        source = PubSubEventSource(
            SourceSettings(names.subscription_path, names.dlq_topic_path), codec
        )
        monitor = PubSubMonitor(source, "it", names.subscription, use_monitoring_api=False)
        await source.start()
        await monitor.start()
        try:
            idle = await monitor.lag()
            assert idle["outstanding_messages"] == 0 and idle["source"] == "local_estimate"
            chunks = source.chunks()
            got = []
            while sum(len(c.events) for c in got) < 3:
                got.append(await asyncio.wait_for(anext(chunks), 20))
            time.sleep(0.2)
            busy = await monitor.lag()
            assert busy["outstanding_messages"] == 3
            assert busy["oldest_unacked_age_seconds"] > 0.1
            for chunk in got:
                await source.ack(chunk.lane, [chunk.ack])
            done = await monitor.lag()
            assert done["outstanding_messages"] == 0 and done["acked"] == 3
        finally:
            await monitor.stop()
            await source.stop()

    try:
        asyncio.run(scenario())
    finally:
        provisioner.teardown_report()


def test_dead_letters_on_the_dlq_topic_are_listed_fetched_and_removed(
    emulator: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ErrorRouter (a webhook sink's) publishes to the DLQ topic; `cdc dlq` lists, fetches
    and removes through the keeping subscription; a message the ingest could not read is
    not a change and is not listed (it stays)."""
    from google.cloud import pubsub_v1

    from adapters.pubsub.dead_letters import PubSubDeadLetters
    from adapters.pubsub.naming import PipelineNames
    from adapters.pubsub.provisioner import PubSubProvisioner, SubscriptionSettings
    from domain.ports import DeadLetter
    from services.capture.payload import ArrowBatchCodec
    from services.cli.main import main

    pipeline_id = f"dl{uuid.uuid4().hex[:6]}"
    names = PipelineNames.of("it", "cdc", pipeline_id, "dlq")
    provisioner = PubSubProvisioner(names, SubscriptionSettings())
    asyncio.run(provisioner.provision())
    store = PubSubDeadLetters(
        pipeline_id, names.dlq_topic_path, names.dlq_subscription_path, ArrowBatchCodec()
    )
    events = [
        SourceEvent(Operation.CREATE, T, Position(100 + i, i), after=(str(i),)) for i in range(3)
    ]
    publisher = pubsub_v1.PublisherClient()
    try:
        asyncio.run(
            store.dead_letter(
                [
                    DeadLetter(
                        ev,
                        f"HTTP 400 for {i}",
                        "sink",
                        pipeline_id=pipeline_id,
                        sink_id="hook" if i < 2 else "other",
                        lane=f"k{i}",
                        error_class="http_400",
                        attempts=3,
                    )
                    for i, ev in enumerate(events)
                ]
            )
        )
        publisher.publish(names.dlq_topic_path, b"not a batch", cdc_stage="ingest").result(10)

        async def scenario() -> None:
            listed = await store.list()
            assert [(d.sink_id, d.lane, d.event.position) for d in listed] == [
                ("hook", "k0", Position(100, 0)),
                ("hook", "k1", Position(101, 1)),
                ("other", "k2", Position(102, 2)),
            ]
            assert listed[0].error == "HTTP 400 for 0" and listed[0].attempts == 3
            assert listed[0].location == names.dlq_topic_path
            assert [d.lane for d in await store.list(sink_id="hook")] == ["k0", "k1"]
            assert len(await store.list(limit=1)) == 1
            fetched = await store.fetch([listed[1].id])
            assert [d.id for d in fetched] == [listed[1].id]
            assert await store.remove([listed[0].id]) == 1
            assert [d.id for d in await store.list()] == [listed[1].id, listed[2].id]
            await store.close()

        asyncio.run(scenario())

        # `cdc dlq list` finds the same store through the registry
        (tmp_path / "pipeline.yaml").write_text(
            f"pipeline_id: {pipeline_id}\nsource:\n  database: shop\n  tables: [public.t]\n"
            "sinks:\n  - sink_id: hook\n    sink_type: webhook\n"
            "    webhook: {url: 'http://127.0.0.1:9/x'}\n"
        )
        (tmp_path / "platform.yaml").write_text(
            "transport_mode: pubsub\npubsub: {project_id: it}\n"
        )
        capsys.readouterr()
        code = main(
            [
                "dlq",
                "list",
                str(tmp_path / "pipeline.yaml"),
                "--platform-config",
                str(tmp_path / "platform.yaml"),
            ]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert "2 dead letter(s)" in out and "HTTP 400 for 1" in out
        # the ingest's unreadable message is still there for inspection
        subscriber = pubsub_v1.SubscriberClient()
        left = subscriber.pull(
            request={"subscription": names.dlq_subscription_path, "max_messages": 10}, timeout=10
        )
        assert b"not a batch" in [m.message.data for m in left.received_messages]
        subscriber.close()
    finally:
        publisher.stop()
        provisioner.teardown_report()
