"""The webhook sink against a real HTTP receiver (tests/support/webhook_receiver.py) that
injects 500s, 429 with Retry-After, answers slower than the timeout and 400 for one poisoned
key; dead letters in a real PostgreSQL (transport_mode direct's table); `cdc dlq list` and
`cdc dlq replay` as the operator runs them."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.config import load_pipeline, load_platform
from adapters.webhook.payload import event_id
from adapters.webhook.sink import WebhookGoneError, WebhookSinkWriter
from domain.errors import CdcError
from domain.events import Column, Operation, Position, SourceEvent, TableSchema
from domain.ports import SinkBatch
from services import registry
from services.wire import decode_batch, encode_batch
from tests.support.pipeline import REPO, cdc_argv
from tests.support.webhook_receiver import Faults, WebhookReceiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ITEMS = TableSchema(
    "public",
    "items",
    (
        Column("id", 20, "bigint", is_key=True),
        Column("name", 25, "text"),
        Column("amount", 1700, "numeric(12,2)"),
    ),
)
LANE = "hook_slot"
POISONED = 7


def changes(keys: int = 30, rounds: int = 20) -> list[SourceEvent]:
    out: list[SourceEvent] = []
    minor = 0
    for r in range(rounds):
        for k in range(1, keys + 1):
            minor += 1
            op = Operation.CREATE if r == 0 else Operation.UPDATE
            if r == rounds - 1 and k % 5 == 0:
                out.append(
                    SourceEvent(
                        Operation.DELETE,
                        ITEMS,
                        Position(1000 + r, minor),
                        before=(str(k), None, None),
                    )
                )
                continue
            after = (str(k), f"k{k} r{r}", f"{k}.{r:02d}")
            out.append(SourceEvent(op, ITEMS, Position(1000 + r, minor), after=after))
    return out


def write_files(tmp_path: Path, pg: Any, db: str, url: str, **webhook: Any) -> tuple[Path, Path]:
    pipeline = {
        "pipeline_id": "hooks",
        "source": {
            "host": pg.host,
            "port": pg.port,
            "database": db,
            "username": "postgres",
            "tables": ["public.items"],
        },
        "sinks": [
            {
                "sink_id": "crm",
                "sink_type": "webhook",
                "webhook": {
                    "url": url,
                    "hmac_secret": SECRET,
                    "timeout_seconds": 0.5,
                    "max_retries": 20,
                    "batch_size": 20,
                    "max_in_flight_requests": 3,
                    "linger_ms": 0,
                    **webhook,
                },
            }
        ],
    }
    platform = {
        "transport_mode": "direct",
        "retry": {"initial_wait_seconds": 0.05, "max_wait_seconds": 0.3},
        "dlq": {"max_retries": 2},
    }
    p, q = tmp_path / "pipeline.yaml", tmp_path / "platform.yaml"
    p.write_text(yaml.safe_dump(pipeline))
    q.write_text(yaml.safe_dump(platform))
    return p, q


def build_writer(pipeline_file: Path, platform_file: Path) -> WebhookSinkWriter:
    platform = load_platform(platform_file)
    pipeline = load_pipeline(pipeline_file, platform=platform)
    assert not registry.check(pipeline, platform)
    return registry.build_webhook_writer(pipeline, pipeline.sinks[0], platform)


async def deliver(writer: WebhookSinkWriter, events: list[SourceEvent], size: int = 100) -> Any:
    await writer.start()
    try:
        for i in range(0, len(events), size):
            batch: SinkBatch = decode_batch(
                encode_batch(i + 1, "hooks", LANE, events[i : i + size])
            )
            await writer.write(batch)
        return await writer.flush()
    finally:
        await writer.stop()


def cdc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cdc_argv(*args), cwd=REPO, capture_output=True, text=True, timeout=120)


def check_order_and_duplicates(receiver: WebhookReceiver) -> None:
    copies: dict[str, dict[str, Any]] = {}
    for e in receiver.events:
        # A duplicate is only ever the same change again, same id, same content.
        assert copies.setdefault(e["id"], e) == e
    last: dict[str, tuple[int, int]] = {}
    for e in receiver.unique_events():
        key = json.dumps(e["key"], sort_keys=True)
        position = tuple(int(x) for x in e["position"].split(":"))
        assert position > last.get(key, (0, 0)), f"key {key} out of order at {e['position']}"
        last[key] = position  # type: ignore[assignment]


@pytest.mark.slow
def test_faults_dead_letters_and_replay(pg: Any, tmp_path: Path) -> None:
    db = pg.new_database("hooks")
    faults = Faults(
        every_500=5,
        every_429=7,
        retry_after="1",
        every_slow=11,
        slow_seconds=1.0,
        poisoned_keys={json.dumps({"id": POISONED})},
    )
    events = changes()
    poisoned = [e for e in events if e.key.get("id") == str(POISONED)]
    expected = {event_id("hooks", LANE, e) for e in events}
    poisoned_ids = {event_id("hooks", LANE, e) for e in poisoned}
    with WebhookReceiver(SECRET, faults) as receiver:
        pipeline_file, platform_file = write_files(tmp_path, pg, db, receiver.url)
        writer = build_writer(pipeline_file, platform_file)
        durable = asyncio.run(deliver(writer, events))
        assert durable == {LANE: events[-1].position}

        assert receiver.bad_signatures == []
        got = {e["id"] for e in receiver.events}
        assert got == expected - poisoned_ids  # everything else, nothing poisoned
        check_order_and_duplicates(receiver)
        statuses = set(receiver.statuses)
        assert {200, 400, 429, 500} <= statuses, statuses
        assert len(receiver.events) > len(got), "a slow answer is retried (duplicates)"
        assert receiver.retry_gaps and min(receiver.retry_gaps) >= 0.9, receiver.retry_gaps
        assert receiver.max_in_flight <= 3
        assert writer.dead_lettered == len(poisoned)

        listed = cdc(
            "dlq", "list", str(pipeline_file), "--platform-config", str(platform_file), "--json"
        )
        assert listed.returncode == 0, listed.stderr
        letters = [json.loads(line) for line in listed.stdout.splitlines()]
        assert len(letters) == len(poisoned)
        for letter in letters:
            assert {"id", "sink_id", "table", "key", "error"} <= set(letter)
            assert letter["sink_id"] == "crm" and letter["table"] == "public.items"
            assert letter["key"] == {"id": POISONED}
            assert letter["error"].startswith("HTTP 400")
            assert letter["error_class"] == "HTTP 400" and letter["attempts"] >= 1
        assert {x["event_id"] for x in letters} == poisoned_ids
        human = cdc("dlq", "list", str(pipeline_file), "--platform-config", str(platform_file))
        assert f"{len(poisoned)} dead letter(s)" in human.stdout

        # Still refused: replay keeps them (same rows, one attempt more).
        again = cdc(
            "dlq",
            "replay",
            str(pipeline_file),
            "--platform-config",
            str(platform_file),
            "--id",
            letters[0]["id"],
        )
        assert again.returncode == 1 and "0 dead letter(s)" in again.stdout.replace(
            "replayed 0 dead letter(s)", "0 dead letter(s)"
        ), again.stdout + again.stderr
        kept = cdc(
            "dlq", "list", str(pipeline_file), "--platform-config", str(platform_file), "--json"
        )
        assert len(kept.stdout.splitlines()) == len(poisoned)

        faults.poisoned_keys.clear()  # the receiver is fixed
        before = len(receiver.events)
        replay = cdc(
            "dlq", "replay", str(pipeline_file), "--platform-config", str(platform_file), "--all"
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert f"replayed {len(poisoned)} dead letter(s)" in replay.stdout
        replayed = receiver.events[before:]
        assert {e["id"] for e in replayed} == poisoned_ids  # the original ids
        assert receiver.bad_signatures == []
        check_order_and_duplicates(receiver)
        empty = cdc(
            "dlq", "list", str(pipeline_file), "--platform-config", str(platform_file), "--json"
        )
        assert empty.stdout == ""


def test_a_4xx_batch_is_halved_until_only_the_refused_change_is_dead_lettered(
    pg: Any, tmp_path: Path
) -> None:
    db = pg.new_database("halve")
    events = changes(keys=16, rounds=1)
    with WebhookReceiver(SECRET, Faults(poisoned_keys={json.dumps({"id": 5})})) as receiver:
        files = write_files(tmp_path, pg, db, receiver.url, batch_size=16)
        writer = build_writer(*files)
        asyncio.run(deliver(writer, events, size=16))
        assert len(receiver.unique_events()) == 15
        assert receiver.key_overlaps == []
        # 16 -> 8 -> 4 -> 2 -> 1: one refused request per level, halves of the rest delivered
        assert receiver.statuses.count(400) == 5, receiver.statuses
        assert writer.dead_lettered == 1


def test_410_gone_stops_the_sink_with_a_clear_error(pg: Any, tmp_path: Path) -> None:
    db = pg.new_database("gone")
    with WebhookReceiver(SECRET, Faults(gone=True)) as receiver:
        writer = build_writer(*write_files(tmp_path, pg, db, receiver.url))

        async def go() -> tuple[str, str, str]:
            await writer.start()
            try:
                batch = decode_batch(encode_batch(1, "hooks", LANE, changes(3, 1)))
                with pytest.raises(WebhookGoneError) as first:
                    await writer.write(batch)
                with pytest.raises(WebhookGoneError):  # and every later batch, no request
                    await writer.write(batch)
                health = await writer.health()
                return str(first.value), health.status.value, str(health.detail)
            finally:
                await writer.stop()

        message, status, detail = asyncio.run(go())
        assert "410 Gone" in message and receiver.url.removesuffix("/hook") in message
        assert status == "error" and "410" in detail
        assert receiver.requests == 1


def test_with_dlq_disabled_a_refused_change_holds_the_batch(pg: Any, tmp_path: Path) -> None:
    db = pg.new_database("nodlq")
    with WebhookReceiver(SECRET, Faults(poisoned_keys={json.dumps({"id": 2})})) as receiver:
        pipeline_file, platform_file = write_files(tmp_path, pg, db, receiver.url)
        platform_file.write_text(
            yaml.safe_dump({"transport_mode": "direct", "dlq": {"enabled": False}})
        )
        writer = build_writer(pipeline_file, platform_file)

        async def go() -> str:
            await writer.start()
            try:
                batch = decode_batch(encode_batch(1, "hooks", LANE, changes(3, 1)))
                with pytest.raises(CdcError) as failed:
                    await writer.write(batch)
                return str(failed.value)
            finally:
                await writer.stop()

        message = asyncio.run(go())
        assert "dlq.enabled is false" in message
        assert writer.dead_lettered == 0
        listed = cdc(
            "dlq", "list", str(pipeline_file), "--platform-config", str(platform_file), "--json"
        )
        assert listed.stdout == ""


DOCS = TableSchema(
    "public", "items", (Column("id", 20, "bigint", is_key=True), Column("doc", 3802, "jsonb"))
)


def test_a_change_whose_value_has_no_json_form_is_dead_lettered(pg: Any, tmp_path: Path) -> None:
    """A text its type does not parse (here malformed JSON) cannot go into a body: the
    change goes to the dead letters instead of failing every delivery of its batch."""
    db = pg.new_database("nojson")
    events = [
        SourceEvent(Operation.CREATE, DOCS, Position(5, 1), after=("1", '{"a": 1}')),
        SourceEvent(Operation.CREATE, DOCS, Position(5, 2), after=("2", "{not json")),
        SourceEvent(Operation.CREATE, DOCS, Position(5, 3), after=("3", "[]")),
    ]
    with WebhookReceiver(SECRET) as receiver:
        files = write_files(tmp_path, pg, db, receiver.url)
        writer = build_writer(*files)
        durable = asyncio.run(deliver(writer, events))
        assert [e["key"]["id"] for e in receiver.unique_events()] == [1, 3]
        assert writer.dead_lettered == 1
        assert durable == {LANE: Position(5, 3)}
        listed = cdc("dlq", "list", str(files[0]), "--platform-config", str(files[1]), "--json")
        assert listed.returncode == 0, listed.stderr
        letters = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [x["event_id"] for x in letters] == [event_id("hooks", LANE, events[1])]
        assert "no JSON form" in letters[0]["error"]
        assert letters[0]["after"] == {"id": 2, "doc": "{not json"}  # shown as its text

    with WebhookReceiver(SECRET) as receiver:  # dlq disabled: the batch is held, none sent
        pipeline_file, platform_file = files
        platform_file.write_text(
            yaml.safe_dump({"transport_mode": "direct", "dlq": {"enabled": False}})
        )
        writer = build_writer(pipeline_file, platform_file)
        with pytest.raises(CdcError, match=r"dlq\.enabled is false"):
            asyncio.run(deliver(writer, events))
        assert receiver.requests == 0


def test_a_dead_letter_that_cannot_be_stored_holds_the_batch(pg: Any, tmp_path: Path) -> None:
    db = pg.new_database("dlqdown")
    with WebhookReceiver(SECRET, Faults(poisoned_keys={json.dumps({"id": 2})})) as receiver:
        pipeline_file, platform_file = write_files(tmp_path, pg, db, receiver.url)
        platform_file.write_text(
            yaml.safe_dump(
                {
                    "transport_mode": "direct",
                    "retry": {"initial_wait_seconds": 0.05, "max_wait_seconds": 0.1},
                    # nothing listens there
                    "dlq": {"max_retries": 1, "postgres_dsn": "host=127.0.0.1 port=1 dbname=x"},
                }
            )
        )
        writer = build_writer(pipeline_file, platform_file)

        async def go() -> str:
            await writer.start()
            try:
                batch = decode_batch(encode_batch(1, "hooks", LANE, changes(3, 1)))
                with pytest.raises(CdcError) as failed:
                    await writer.write(batch)
                return str(failed.value)
            finally:
                await writer.stop()

        assert "cannot store dead letter" in asyncio.run(go())


def test_key_changes_and_truncates_keep_their_order_with_requests_in_flight(
    pg: Any, tmp_path: Path
) -> None:
    """One change per request, 4 requests at once, every answer 50 ms late: a change of a
    key waits for the request holding that key (an update that changed the key holds the
    old key too; a truncate holds the whole table)."""
    db = pg.new_database("order")
    minor = 0

    def at() -> Position:
        nonlocal minor
        minor += 1
        return Position(1, minor)

    events = [SourceEvent(Operation.CREATE, ITEMS, at(), after=("1", "a", "1.00"))]
    events += [
        SourceEvent(Operation.CREATE, ITEMS, at(), after=(str(k), "x", "0.00"))
        for k in range(10, 20)
    ]
    events += [
        SourceEvent(Operation.UPDATE, ITEMS, at(), after=("1", f"v{i}", "1.00")) for i in range(5)
    ]
    events.append(
        SourceEvent(
            Operation.UPDATE, ITEMS, at(), before=("1", "v4", "1.00"), after=("2", "moved", "1.00")
        )
    )
    events += [
        SourceEvent(Operation.UPDATE, ITEMS, at(), after=("2", f"w{i}", "2.00")) for i in range(3)
    ]
    events.append(SourceEvent(Operation.TRUNCATE, ITEMS, at()))
    events += [
        SourceEvent(Operation.CREATE, ITEMS, at(), after=(str(k), "y", "0.00"))
        for k in range(30, 40)
    ]
    faults = Faults(every_slow=1, slow_seconds=0.05)
    with WebhookReceiver(SECRET, faults) as receiver:
        files = write_files(
            tmp_path,
            pg,
            db,
            receiver.url,
            batch_size=1,
            max_in_flight_requests=4,
            timeout_seconds=5,
        )
        writer = build_writer(*files)
        asyncio.run(deliver(writer, events, size=len(events)))
        assert receiver.key_overlaps == []
        assert receiver.max_in_flight > 1  # independent keys did overlap
        arrived = [e["position"] for e in receiver.events]
        assert len(arrived) == len(events)
        place = {p: i for i, p in enumerate(arrived)}
        chain = [str(e.position) for e in events if e.key.get("id") in ("1", "2")]
        assert [place[p] for p in chain] == sorted(place[p] for p in chain)
        truncate = place[str(events[-11].position)]
        assert all(place[str(e.position)] < truncate for e in events[:-11])
        assert all(place[str(e.position)] > truncate for e in events[-10:])
        assert receiver.state()["public.items"].keys() == {
            json.dumps({"id": k}) for k in range(30, 40)
        }
