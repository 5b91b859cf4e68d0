"""PostgreSQL -> cdc ingest -> cdc sink (webhook) -> a real HTTP receiver, through real
processes; the sink is killed with SIGKILL mid-stream and started again."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.pipeline import (
    free_port,
    ingest_stage,
    new_pipeline,
    sink_stage,
    stage_logs,
    wait_until,
)
from tests.support.webhook_receiver import Faults, WebhookReceiver
from tests.support.webhook_state import differences, source_state
from tests.support.workload import run_workload

SECRET = "whsec_c2VjcmV0LWZvci10aGUtZTJlLXRlc3Q="


def _use_webhook(files: Any, url: str, **webhook: Any) -> None:
    pipeline = yaml.safe_load(files.pipeline.read_text())
    pipeline["sinks"] = [
        {
            "sink_id": "hook",
            "sink_type": "webhook",
            "webhook": {"url": url, "hmac_secret": SECRET, **webhook},
        }
    ]
    files.pipeline.write_text(yaml.safe_dump(pipeline, sort_keys=False))


def test_410_gone_stops_the_sink_stage_with_exit_2(pg: Any, tmp_path: Path) -> None:
    _, _, files = new_pipeline(pg, tmp_path, seed_rows=5)
    with WebhookReceiver(SECRET, Faults(gone=True)) as receiver:
        _use_webhook(files, receiver.url)
        port = free_port()
        sink = sink_stage(files, tmp_path, port, "hook").start()
        ingest = ingest_stage(files, tmp_path, {"hook": port}).start()
        try:
            wait_until(lambda: not sink.alive(), 60, "the sink stops\n" + stage_logs(sink, ingest))
            assert sink.process is not None and sink.process.returncode == 2
            log = sink.log_path.read_text()
            assert "sink.halted" in log and "410 Gone" in log
            assert receiver.requests >= 1 and receiver.accepted == []
        finally:
            for stage in (ingest, sink):
                if stage.alive():
                    stage.terminate()


@pytest.mark.slow
def test_kill_9_of_the_webhook_sink_loses_nothing_and_repeats_only_same_ids(
    pg: Any, tmp_path: Path
) -> None:
    source_dsn, _, files = new_pipeline(pg, tmp_path, seed_rows=200, batch_max_events=300)
    token, api_key = "tok-e2e-4f1c9a", "key-e2e-77d2b0"
    expect = {"authorization": f"Bearer {token}", "x-api-key": api_key}
    with WebhookReceiver(SECRET, Faults(every_500=17), expect_headers=expect) as receiver:
        _use_webhook(
            files,
            receiver.url,
            batch_size=100,
            max_in_flight_requests=3,
            timeout_seconds=5,
            bearer_token=token,
            headers={"X-Api-Key": api_key},
        )
        platform = yaml.safe_load(files.platform.read_text())
        platform["retry"] = {"initial_wait_seconds": 0.05, "max_wait_seconds": 0.5}
        files.platform.write_text(yaml.safe_dump(platform, sort_keys=False))

        port = free_port()
        sink = sink_stage(files, tmp_path, port, "hook").start()
        ingest = ingest_stage(files, tmp_path, {"hook": port}).start()
        kills: list[int] = []
        killed_at: list[float] = []
        try:
            wait_until(
                lambda: len(receiver.unique_events()) >= 200,
                90,
                "snapshot delivered\n" + stage_logs(sink, ingest),
            )

            def chaos(done: int) -> None:
                if done > 4_000 and not kills:
                    kills.append(len(receiver.events))
                    killed_at.append(time.monotonic())
                    sink.kill9()
                    time.sleep(0.5)
                    sink.start()

            run_workload(source_dsn, changes=8_000, big_transaction=2_000, on_progress=chaos)
            assert kills, "the sink was not killed"
            expected = source_state(source_dsn)
            wait_until(
                lambda: not differences(expected, receiver.state()),
                180,
                "receiver = source\n" + stage_logs(sink, ingest),
            )
        finally:
            for stage in (ingest, sink):
                if stage.alive():
                    stage.terminate()
        unique = receiver.unique_events()
        print(
            f"received {len(receiver.events)} events, {len(unique)} distinct ids,"
            f" {receiver.statuses.count(500)} injected 500s, killed after {kills[0]}"
        )
        assert len(unique) > 5_000
        # Row by row: every change arrived (applied once per id, in arrival order).
        assert differences(expected, receiver.state()) == []
        assert receiver.bad_signatures == []  # signed, with the bearer token and header
        # Never two requests of one key at once, but for the killed sink's last requests,
        # which the receiver may still be reading when the restarted sink sends them again.
        overlaps = [
            (key, round(at - killed_at[0], 2))
            for key, at in zip(receiver.key_overlaps, receiver.overlap_times, strict=True)
            if not 0 <= at - killed_at[0] < 5
        ]
        assert overlaps == [], overlaps[:5]
        for stage in (sink, ingest):  # secrets never logged (the sink logs at INFO here)
            text = stage.log_path.read_text()
            assert "webhook_sink.started" in text or stage is ingest
            assert not any(secret in text for secret in (token, api_key, SECRET, SECRET[6:]))
        # A change seen twice is the same change: same id, same content, nothing else.
        first: dict[str, dict[str, Any]] = {}
        by_place: dict[tuple[str, str], str] = {}
        for e in receiver.events:
            assert first.setdefault(e["id"], e) == e
            assert by_place.setdefault((e["table"], e["position"]), e["id"]) == e["id"]
        # Per-key order of first arrivals follows the source's positions.
        last: dict[tuple[str, str], tuple[int, int]] = {}
        for e in receiver.unique_events():
            place = (e["table"], json.dumps(e["key"], sort_keys=True))
            position = tuple(int(x) for x in e["position"].split(":"))
            assert position > last.get(place, (-1, -1)), (place, e["position"])
            last[place] = position  # type: ignore[assignment]
