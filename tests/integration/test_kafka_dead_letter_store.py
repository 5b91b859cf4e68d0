"""`cdc dlq list` and `cdc dlq replay` on a kafka pipeline, against the real broker (Tansu):
the webhook sink (real HTTP receiver) rejects a poisoned key, the kafka error router writes
it to the DLQ topic; a message the consumer could not decode sits there too. The CLI lists
both, replays the sink's letter once the receiver is fixed, and no longer lists it (a marker
on the compacted `<prefix>.__cdc_dlq_replayed` topic); the undecodable one stays."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka.admin import AdminClient, NewTopic

from adapters.config import load_pipeline, load_platform
from adapters.kafka.consumer import lane_of
from adapters.kafka.dead_letters import DeadLetterProducer, Poison
from adapters.webhook.payload import event_id
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from services import registry
from services.wire import decode_batch, encode_batch
from tests.support.pipeline import REPO, cdc_argv
from tests.support.webhook_receiver import Faults, WebhookReceiver

pytestmark = pytest.mark.integration

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ITEMS = TableSchema(
    "public",
    "items",
    (Column("id", 20, "bigint", is_key=True), Column("name", 25, "text")),
)
POISONED = 3


def cdc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cdc_argv(*args), cwd=REPO, capture_output=True, text=True, timeout=120)


def listed(pipeline_file: Path, platform_file: Path) -> list[dict[str, Any]]:
    out = cdc("dlq", "list", str(pipeline_file), "--platform-config", str(platform_file), "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_kafka_dead_letters_are_listed_replayed_and_then_gone(
    tansu_broker: Any, schema_registry: Any, tmp_path: Path
) -> None:
    bootstrap = tansu_broker.bootstrap_servers
    prefix = f"dlq{uuid.uuid4().hex[:8]}"
    topic = f"{prefix}.public.items"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics(
        [NewTopic(topic, 1, 1), NewTopic(f"{topic}.dlq", 1, 1)]
    ).values():
        future.result(15)

    faults = Faults(poisoned_keys={json.dumps({"id": POISONED})})
    with WebhookReceiver(SECRET, faults) as receiver:
        pipeline_file, platform_file = tmp_path / "pipeline.yaml", tmp_path / "platform.yaml"
        pipeline_file.write_text(
            yaml.safe_dump(
                {
                    "pipeline_id": "kdlq",
                    "topic_prefix": prefix,
                    "source": {"database": "shop", "tables": ["public.items"]},
                    "sinks": [
                        {
                            "sink_id": "crm",
                            "sink_type": "webhook",
                            "webhook": {
                                "url": receiver.url,
                                "hmac_secret": SECRET,
                                "max_retries": 2,
                                "batch_size": 10,
                                "linger_ms": 0,
                            },
                        }
                    ],
                }
            )
        )
        platform_file.write_text(
            yaml.safe_dump(
                {
                    "transport_mode": "kafka",
                    "kafka": {
                        "bootstrap_servers": bootstrap,
                        "schema_registry_url": schema_registry.url,
                    },
                    "retry": {"initial_wait_seconds": 0.05, "max_wait_seconds": 0.2},
                    "dlq": {"max_retries": 1},
                }
            )
        )
        platform = load_platform(platform_file)
        pipeline = load_pipeline(pipeline_file, platform=platform)
        assert not registry.check(pipeline, platform)

        # The sink, as `cdc run` builds it on kafka: rejected changes go to the DLQ topic.
        lane = lane_of(topic, 0)
        events = [
            SourceEvent(Operation.CREATE, ITEMS, Position(10 + k, 0), after=(str(k), f"n{k}"))
            for k in range(1, 6)
        ]
        writer = registry.build_webhook_writer(pipeline, pipeline.sinks[0], platform)

        async def deliver() -> None:
            await writer.start()
            try:
                await writer.write(decode_batch(encode_batch(1, "kdlq", lane, events)))
                await writer.flush()
            finally:
                await writer.stop()

        asyncio.run(deliver())
        assert writer.dead_lettered == 1
        poisoned_id = event_id("kdlq", lane, events[POISONED - 1])
        assert poisoned_id not in {e["id"] for e in receiver.events}

        # A message the consumer could not decode, as the source dead-letters it.
        source_dead = DeadLetterProducer({"bootstrap.servers": bootstrap}, "dlq")
        source_dead.send(Poison(topic, 0, 77, b"k", b"\x00garbage", "AvroError", "bad magic"))
        source_dead.close()

        letters = listed(pipeline_file, platform_file)
        assert len(letters) == 2, letters
        sink_letter = next(x for x in letters if x["sink_id"] == "crm")
        assert sink_letter["table"] == "public.items"
        assert sink_letter["key"] == {"id": POISONED} and sink_letter["op"] == "c"
        assert sink_letter["error"].startswith("HTTP 400") and sink_letter["replayable"]
        assert sink_letter["event_id"] == poisoned_id
        assert sink_letter["id"].startswith(f"{topic}.dlq:0:")
        undecoded = next(x for x in letters if x["sink_id"] == "")
        assert undecoded["table"] == "public.items" and undecoded["error"] == "bad magic"
        assert undecoded["error_class"] == "AvroError" and not undecoded["replayable"]
        assert undecoded["position"].startswith("77")

        # Still refused: dead-lettered again, so the old record is marked replaced and the
        # new one (the replay's attempts) is listed instead: still one letter of the sink.
        refused = cdc(
            "dlq",
            "replay",
            str(pipeline_file),
            "--platform-config",
            str(platform_file),
            "--id",
            sink_letter["id"],
        )
        assert refused.returncode == 1 and "replayed 0" in refused.stdout, refused.stderr
        letters = listed(pipeline_file, platform_file)
        (sink_letter_2,) = [x for x in letters if x["sink_id"] == "crm"]
        assert sink_letter_2["id"] != sink_letter["id"]
        assert sink_letter_2["event_id"] == poisoned_id
        assert sink_letter_2["attempts"] >= 1 and sink_letter_2["error"].startswith("HTTP 400")

        faults.poisoned_keys.clear()  # the receiver is fixed
        replay = cdc(
            "dlq", "replay", str(pipeline_file), "--platform-config", str(platform_file), "--all"
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert "replayed 1 dead letter(s)" in replay.stdout
        assert "cannot be replayed" in replay.stderr
        assert poisoned_id in {e["id"] for e in receiver.events}  # the original id
        assert receiver.bad_signatures == []

        after = listed(pipeline_file, platform_file)
        assert [x["id"] for x in after] == [undecoded["id"]]

        # Asking for the undecodable one by id: not delivered, exit 1, still listed.
        again = cdc(
            "dlq",
            "replay",
            str(pipeline_file),
            "--platform-config",
            str(platform_file),
            "--id",
            undecoded["id"],
        )
        assert again.returncode == 1, again.stdout + again.stderr
        assert [x["id"] for x in listed(pipeline_file, platform_file)] == [undecoded["id"]]
