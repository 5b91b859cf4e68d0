"""transport_mode kinesis with a webhook sink, real processes: `cdc capture` (WAL -> Kinesis,
moto_server) -> `cdc ingest` -> `cdc sink` (webhook) -> a real HTTP receiver that refuses
the changes of a few poisoned keys with 400. The sink is killed with SIGKILL mid-stream and
started again. Row by row every other change arrives; the poisoned keys' changes are in the
DLQ stream, `cdc dlq list --json` shows each once (a restart may dead-letter one again), and
after the receiver is fixed `cdc dlq replay --all` delivers them: the receiver then equals
the source row by row."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.kinesis import AWS_ENV
from tests.support.pipeline import (
    REPO,
    PipelineFiles,
    Stage,
    cdc_argv,
    free_port,
    new_pipeline,
    sink_stage,
    stage_logs,
    wait_until,
)
from tests.support.webhook_receiver import Faults, WebhookReceiver
from tests.support.webhook_state import differences, source_state
from tests.support.workload import run_workload

pytestmark = pytest.mark.slow

SECRET = "whsec_c2VjcmV0LWZvci10aGUtZTJlLXRlc3Q="
POISONED = frozenset(json.dumps({"id": k}) for k in (5, 17, 33, 64, 101, 150, 199))


def kinesis_webhook_configs(files: PipelineFiles, endpoint_url: str, url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    pipeline = yaml.safe_load(files.pipeline.read_text())
    pipeline["topic_prefix"] = f"kwh{tag}"
    pipeline["sinks"] = [
        {
            "sink_id": "hook",
            "sink_type": "webhook",
            "webhook": {
                "url": url,
                "hmac_secret": SECRET,
                "batch_size": 100,
                "max_in_flight_requests": 3,
                "timeout_seconds": 5,
            },
        }
    ]
    files.pipeline.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    platform = yaml.safe_load(files.platform.read_text())
    platform["transport_mode"] = "kinesis"
    platform["kinesis"] = {
        "region": "us-east-1",
        "endpoint_url": endpoint_url,
        "shard_count": 2,
        "checkpoint_table_name": f"cp-{tag}",
        "poll_interval_seconds": 0.1,
    }
    platform["wal_reader"] = {"status_interval_seconds": 1.0, "batch_timeout_seconds": 0.2}
    platform["retry"] = {"initial_wait_seconds": 0.05, "max_wait_seconds": 0.5}
    files.platform.write_text(yaml.safe_dump(platform, sort_keys=False))


def cdc(files: PipelineFiles, *args: str) -> subprocess.CompletedProcess[str]:
    argv = cdc_argv(*args, str(files.pipeline), "--platform-config", str(files.platform))
    env = {**os.environ, **AWS_ENV}
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def test_kill_9_of_the_webhook_sink_with_kinesis_dead_letters_and_replay(
    pg: Any, tmp_path: Path, moto_server: Any
) -> None:
    source_dsn, _, files = new_pipeline(pg, tmp_path, seed_rows=200, batch_max_events=300)
    faults = Faults(poisoned_keys=set(POISONED))
    with WebhookReceiver(SECRET, faults) as receiver:
        kinesis_webhook_configs(files, str(moto_server.endpoint_url), receiver.url)
        port = free_port()
        sink = sink_stage(files, tmp_path, port, "hook", AWS_ENV)
        capture = Stage(
            "capture", files.argv("capture", "--http-port", str(free_port())), tmp_path, AWS_ENV
        )
        ingest = Stage(
            "ingest",
            files.argv("ingest", "--sink-endpoint", f"hook=127.0.0.1:{port}"),
            tmp_path,
            AWS_ENV,
        )
        stages = (ingest, capture, sink)
        kills: list[int] = []
        try:
            sink.start()
            capture.start()
            ingest.start()
            wait_until(
                lambda: len(receiver.unique_events()) >= 190,
                120,
                "snapshot delivered\n" + stage_logs(*stages),
            )

            def chaos(done: int) -> None:
                if done > 3_000 and not kills:
                    kills.append(len(receiver.events))
                    sink.kill9()
                    time.sleep(0.5)
                    sink.start()

            run_workload(source_dsn, changes=6_000, big_transaction=1_000, on_progress=chaos)
            assert kills, "the sink was not killed"
            expected = source_state(source_dsn)
            wait_until(
                lambda: not differences(expected, receiver.state(), POISONED),
                180,
                "receiver = source but the poisoned keys\n" + stage_logs(*stages),
                interval=0.5,
            )
            assert receiver.bad_signatures == []
            assert all(json.dumps(e["key"]) not in POISONED for e in receiver.events)

            listed = cdc(files, "dlq", "list", "--json")
            assert listed.returncode == 0, listed.stderr
            letters = [json.loads(line) for line in listed.stdout.splitlines()]
            assert letters, "no dead letters listed"
            assert {json.dumps(x["key"]) for x in letters} <= POISONED
            assert {x["sink_id"] for x in letters} == {"hook"}
            assert all(x["error"].startswith("HTTP 400") for x in letters)
            ids = [x["event_id"] for x in letters]
            assert len(ids) == len(set(ids)), "a change is listed twice"

            faults.poisoned_keys.clear()  # the receiver is fixed
            replay = cdc(files, "dlq", "replay", "--all")
            assert replay.returncode == 0, replay.stdout + replay.stderr
            assert f"replayed {len(letters)} dead letter(s)" in replay.stdout
            # Row by row, the poisoned keys included.
            assert differences(expected, receiver.state()) == []
            assert cdc(files, "dlq", "list", "--json").stdout == ""
            print(
                f"received {len(receiver.events)} events, {len(receiver.unique_events())}"
                f" distinct, {len(letters)} dead letters replayed, killed after {kills[0]}"
            )
        finally:
            for stage in stages:
                if stage.alive():
                    stage.terminate()
