"""`cdc dlq replay` on a pubsub pipeline, against the Pub/Sub emulator and a real webhook
receiver: a replay the sink refuses again publishes a new dead letter, and the old message
must go, so `cdc dlq list` shows the change once (as for Kafka, whose store only appends);
once the receiver is fixed the replay delivers it and nothing is listed."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.config import load_pipeline, load_platform
from adapters.webhook.payload import event_id
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from services import pubsub_transport, registry
from services.cli.main import main as cdc_main
from services.wire import decode_batch, encode_batch
from tests.support.webhook_receiver import Faults, WebhookReceiver

pytestmark = pytest.mark.integration

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ITEMS = TableSchema(
    "public",
    "items",
    (Column("id", 20, "bigint", is_key=True), Column("name", 25, "text")),
)
POISONED = 2


@pytest.fixture
def emulator(pubsub_emulator: Any) -> Iterator[Any]:
    old = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = pubsub_emulator.host_port
    yield pubsub_emulator
    if old is None:
        os.environ.pop("PUBSUB_EMULATOR_HOST", None)
    else:
        os.environ["PUBSUB_EMULATOR_HOST"] = old


def test_a_refused_replay_leaves_the_change_listed_once(
    emulator: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from adapters.pubsub.provisioner import PubSubProvisioner, SubscriptionSettings

    pipeline_id = f"pdl{uuid.uuid4().hex[:6]}"
    faults = Faults(poisoned_keys={json.dumps({"id": POISONED})})
    with WebhookReceiver(SECRET, faults) as receiver:
        pipeline_file, platform_file = tmp_path / "pipeline.yaml", tmp_path / "platform.yaml"
        pipeline_file.write_text(
            yaml.safe_dump(
                {
                    "pipeline_id": pipeline_id,
                    "source": {"database": "shop", "tables": ["public.items"]},
                    "sinks": [
                        {
                            "sink_id": "crm",
                            "sink_type": "webhook",
                            "webhook": {
                                "url": receiver.url,
                                "hmac_secret": SECRET,
                                "max_retries": 1,
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
                    "transport_mode": "pubsub",
                    "pubsub": {"project_id": "it"},
                    "retry": {"initial_wait_seconds": 0.05, "max_wait_seconds": 0.2},
                    "dlq": {"max_retries": 1},
                }
            )
        )
        platform = load_platform(platform_file)
        pipeline = load_pipeline(pipeline_file, platform=platform)
        names = pubsub_transport.names(pipeline, platform)
        provisioner = PubSubProvisioner(names, SubscriptionSettings())
        asyncio.run(provisioner.provision())
        try:
            # The sink as `cdc run` builds it on pubsub: a refused change goes to the DLQ topic.
            events = [
                SourceEvent(Operation.CREATE, ITEMS, Position(10 + k, 0), after=(str(k), f"n{k}"))
                for k in range(1, 4)
            ]
            writer = registry.build_webhook_writer(pipeline, pipeline.sinks[0], platform)

            async def deliver() -> None:
                await writer.start()
                try:
                    await writer.write(decode_batch(encode_batch(1, pipeline_id, "k", events)))
                    await writer.flush()
                finally:
                    await writer.stop()

            asyncio.run(deliver())
            assert writer.dead_lettered == 1
            poisoned_id = event_id(pipeline_id, "k", events[POISONED - 1])

            def listed() -> list[dict[str, Any]]:
                capsys.readouterr()
                argv = ["dlq", "list", str(pipeline_file), "--platform-config"]
                assert cdc_main([*argv, str(platform_file), "--json"]) == 0
                return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

            (letter,) = listed()
            assert letter["event_id"] == poisoned_id and letter["error"].startswith("HTTP 400")

            # Refused again: the replay dead-letters a new message; the old one must go.
            argv = ["dlq", "replay", str(pipeline_file), "--platform-config", str(platform_file)]
            capsys.readouterr()
            assert cdc_main([*argv, "--id", letter["id"]]) == 1
            assert "replayed 0" in capsys.readouterr().out
            after_refusal = listed()
            assert [x["event_id"] for x in after_refusal] == [poisoned_id], after_refusal
            assert after_refusal[0]["id"] != letter["id"]

            faults.poisoned_keys.clear()  # the receiver is fixed
            capsys.readouterr()
            assert cdc_main([*argv, "--all"]) == 0
            assert "replayed 1 dead letter(s)" in capsys.readouterr().out
            assert poisoned_id in {e["id"] for e in receiver.events}
            assert listed() == []
        finally:
            provisioner.teardown_report()
