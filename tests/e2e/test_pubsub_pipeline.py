"""transport_mode pubsub end to end against Google's Pub/Sub emulator and real PostgreSQL:
PostgreSQL -> `cdc capture` (WAL reader -> key-hash lanes -> Pub/Sub) -> `cdc ingest`
(pull, ack after the sinks) -> `cdc sink` -> PostgreSQL, compared row by row; kill -9 of the
capture and of the ingest mid-stream; a poison message dead-lettered; and a publish that
fails leaves the slot's confirmed LSN before the data it could not publish."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from adapters.postgres.source.catalog import parse_lsn
from services.net import find_free_port as free_port
from tests.support.pipeline import (
    PipelineFiles,
    Stage,
    assert_tables_equal,
    http_status,
    ingest_stage,
    new_pipeline,
    sink_stage,
    stage_logs,
    tables_equal,
    wait_until,
)
from tests.support.workload import TABLES, run_workload

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROJECT = "cdc-e2e"


@pytest.fixture
def emulator_env(pubsub_emulator: Any) -> Iterator[dict[str, str]]:
    previous = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = pubsub_emulator.host_port
    try:
        yield {"PUBSUB_EMULATOR_HOST": pubsub_emulator.host_port}
    finally:
        if previous is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = previous


def pubsub_platform(files: PipelineFiles, **overrides: Any) -> None:
    """Turn the direct pipeline's platform.yaml into a pubsub one."""
    platform = yaml.safe_load(files.platform.read_text())
    platform.update(
        {
            "transport_mode": "pubsub",
            "pubsub": {"project_id": PROJECT, "lanes": 4, "ack_deadline_seconds": 10},
            "wal_reader": {
                "status_interval_seconds": 1.0,
                "batch_size": 200,
                "batch_timeout_seconds": 0.05,
            },
            "retry": {"max_attempts": 3, "initial_wait_seconds": 0.2, "max_wait_seconds": 1.0},
        }
    )
    for key, value in overrides.items():
        if isinstance(value, dict):
            platform.setdefault(key, {}).update(value)
        else:
            platform[key] = value
    files.platform.write_text(yaml.safe_dump(platform, sort_keys=False))


def names_of(files: PipelineFiles) -> Any:
    from adapters.pubsub.naming import PipelineNames

    return PipelineNames.of(PROJECT, "cdc", files.pipeline_id, "dlq")


def capture_stage(files: PipelineFiles, log_dir: Path, env: dict[str, str]) -> Stage:
    return Stage("capture", files.argv("capture", "--http-port", str(free_port())), log_dir, env)


def confirmed_lsn(dsn: str, slot: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    assert row is not None and row[0] is not None
    return parse_lsn(row[0])


def current_lsn(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(row[0])


def test_cdc_run_pubsub_replicates_snapshot_and_changes_exactly(
    pg: Any, tmp_path: Path, emulator_env: dict[str, str]
) -> None:
    source_dsn, replica_dsn, files = new_pipeline(
        pg, tmp_path, seed_rows=500, pipeline_id="ps-run", batch_max_events=500
    )
    pubsub_platform(files)
    run = Stage("run", files.argv("run"), tmp_path, emulator_env).start()
    try:
        wait_until(
            lambda: http_status(files.health_port, "/readyz") == 200 or not run.alive(),
            90,
            "ingest ready",
        )
        assert run.alive(), run.log_tail()
        run_workload(source_dsn, changes=5_000, big_transaction=2_000)
        wait_until(
            lambda: tables_equal(source_dsn, replica_dsn, TABLES),
            120,
            "replica = source\n" + run.log_tail(60),
        )
        assert_tables_equal(source_dsn, replica_dsn, TABLES)
    finally:
        code = run.terminate(60) if run.alive() else run.process.returncode  # type: ignore[union-attr]
    assert code == 0, run.log_tail(60)
    # the capture confirmed what it published: the slot is at (or near) the end of the WAL
    assert confirmed_lsn(source_dsn, files.slot) > 0

    undeploy = subprocess.run(
        files.argv("undeploy", "--yes"),
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **emulator_env),
    )
    assert undeploy.returncode == 0, undeploy.stderr
    n = names_of(files)
    assert f"deleted Pub/Sub topic {n.topic_path}" in undeploy.stdout
    assert f"deleted Pub/Sub subscription {n.dlq_subscription_path}" in undeploy.stdout
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (files.slot,)
        ).fetchone() == (0,)


def test_kill_9_capture_and_ingest_mid_stream_exact_without_duplicates(
    pg: Any, tmp_path: Path, emulator_env: dict[str, str]
) -> None:
    source_dsn, replica_dsn, files = new_pipeline(
        pg, tmp_path, seed_rows=200, pipeline_id="ps-kill", batch_max_events=300
    )
    pubsub_platform(files)
    sink_port = free_port()
    sink = sink_stage(files, tmp_path, sink_port, env=emulator_env).start()
    ingest = ingest_stage(files, tmp_path, {"replica": sink_port}, env=emulator_env).start()
    capture = capture_stage(files, tmp_path, emulator_env).start()
    stages = (capture, ingest, sink)
    try:
        wait_until(
            lambda: http_status(files.health_port, "/readyz") == 200,
            90,
            "ingest ready\n" + stage_logs(*stages),
        )
        kills: list[str] = []

        def chaos(done: int) -> None:
            if done > 3_000 and "capture" not in kills:
                kills.append("capture")
                capture.kill9()
                time.sleep(0.5)
                capture.start()
            elif done > 6_000 and "ingest" not in kills:
                kills.append("ingest")
                ingest.kill9()
                time.sleep(0.5)
                ingest.start()

        run_workload(source_dsn, changes=9_000, big_transaction=3_000, on_progress=chaos)
        assert kills == ["capture", "ingest"]
        wait_until(
            lambda: tables_equal(source_dsn, replica_dsn, TABLES),
            180,
            "replica = source after kills\n" + stage_logs(*stages),
        )
        assert_tables_equal(source_dsn, replica_dsn, TABLES)
        # nothing applied twice: every row of the replica is the source's, and the
        # offsets of every lane are positions the capture published (no lane went back)
        with psycopg.connect(replica_dsn, autocommit=True) as conn:
            lanes = conn.execute(
                "SELECT partition FROM public._cdc_offsets WHERE pipeline_id = %s",
                (files.pipeline_id,),
            ).fetchall()
        assert {lane for (lane,) in lanes} <= {f"k{i}" for i in range(4)}
        assert len(lanes) > 1  # spread over lanes
    finally:
        for stage in stages:
            if stage.alive():
                stage.terminate()


def test_poison_message_is_dead_lettered_and_the_lane_goes_on(
    pg: Any, tmp_path: Path, emulator_env: dict[str, str]
) -> None:
    """A message that is not a cdc.v2 batch on a lane between good ones: it ends on the DLQ
    topic's subscription with the error in its attributes; the changes around it arrive."""
    from google.cloud import pubsub_v1

    source_dsn, replica_dsn, files = new_pipeline(
        pg, tmp_path, seed_rows=50, pipeline_id="ps-poison"
    )
    pubsub_platform(files)
    n = names_of(files)
    sink_port = free_port()
    sink = sink_stage(files, tmp_path, sink_port, env=emulator_env).start()
    ingest = ingest_stage(files, tmp_path, {"replica": sink_port}, env=emulator_env).start()
    capture = capture_stage(files, tmp_path, emulator_env).start()
    stages = (capture, ingest, sink)
    publisher = pubsub_v1.PublisherClient(
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    )
    subscriber = pubsub_v1.SubscriberClient()
    try:
        wait_until(
            lambda: http_status(files.health_port, "/readyz") == 200,
            90,
            "ingest ready\n" + stage_logs(*stages),
        )
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "snapshot")
        publisher.publish(
            n.topic_path, b"\x08\xff garbage", ordering_key="k1", cdc_lane="k1"
        ).result(10)
        run_workload(source_dsn, changes=1_000, big_transaction=200)
        wait_until(
            lambda: tables_equal(source_dsn, replica_dsn, TABLES),
            120,
            "replica = source\n" + stage_logs(*stages),
        )
        pulled = subscriber.pull(
            request={"subscription": n.dlq_subscription_path, "max_messages": 10}, timeout=30
        )
        letters = [m.message for m in pulled.received_messages]
        assert [m.data for m in letters] == [b"\x08\xff garbage"]
        assert letters[0].attributes["cdc_stage"] == "ingest"
        assert letters[0].attributes["cdc_error"]
        assert letters[0].attributes["cdc_lane"] == "k1"
    finally:
        publisher.stop()
        subscriber.close()
        for stage in stages:
            if stage.alive():
                stage.terminate()


def test_subscription_dead_letter_policy_moves_a_message_nacked_too_often(
    emulator_env: dict[str, str],
) -> None:
    """The backstop when the DLQ publish itself fails: the message is nacked and the
    subscription's dead-letter policy moves it after max_delivery_attempts. On an unordered
    subscription: the emulator stalls a key of an ordered one with a dead-letter policy."""
    import uuid

    from google.cloud import pubsub_v1

    from adapters.pubsub.naming import PipelineNames
    from adapters.pubsub.provisioner import PubSubProvisioner, SubscriptionSettings
    from adapters.pubsub.source import PubSubEventSource, SourceSettings
    from services.capture.payload import ArrowBatchCodec

    names = PipelineNames.of(PROJECT, "cdc", f"dl{uuid.uuid4().hex[:8]}", "dlq")
    provisioner = PubSubProvisioner(
        names, SubscriptionSettings(ordered=False, ack_deadline_seconds=10, max_delivery_attempts=5)
    )
    asyncio.run(provisioner.provision())
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    try:
        publisher.publish(names.topic_path, b"poison").result(10)
        # dlq_topic_path None: the source leaves dead letters to the subscription's policy
        source = PubSubEventSource(SourceSettings(names.subscription_path, None), ArrowBatchCodec())

        async def consume() -> None:
            await source.start()
            chunks = source.chunks()
            task = asyncio.ensure_future(anext(chunks))
            await asyncio.sleep(25)  # every delivery is nacked at once
            task.cancel()
            await source.stop()

        asyncio.run(consume())
        deadline = time.monotonic() + 60
        letters: list[Any] = []
        while not letters and time.monotonic() < deadline:
            pulled = subscriber.pull(
                request={"subscription": names.dlq_subscription_path, "max_messages": 10},
                timeout=10,
            )
            letters = [m.message for m in pulled.received_messages]
        assert [m.data for m in letters] == [b"poison"]
    finally:
        publisher.stop()
        subscriber.close()
        provisioner.teardown_report()


def test_failed_publishes_leave_the_slot_before_the_data_then_resume(
    pg: Any, tmp_path: Path, emulator_env: dict[str, str]
) -> None:
    """The topic disappears: every publish fails. (1) While the capture retries, the slot's
    confirmed LSN stays before the changes; once the topic is back (resume_publish) they
    are published and the slot moves past them. (2) When the retries run out the capture
    exits 1 and the slot stays before what was not published."""
    from google.cloud import pubsub_v1

    source_dsn, _replica_dsn, files = new_pipeline(
        pg, tmp_path, pipeline_id="ps-fail", snapshot_mode="never"
    )
    pubsub_platform(
        files,
        retry={
            "max_attempts": 6,
            "initial_wait_seconds": 1.0,
            "max_wait_seconds": 2.0,
            "jitter": False,
        },
    )
    n = names_of(files)
    capture = capture_stage(files, tmp_path, emulator_env).start()
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    check = n.subscription_path + "-check"
    try:
        wait_until(
            lambda: _slot_exists(source_dsn, files.slot) or not capture.alive(),
            60,
            "slot created\n" + capture.log_tail(),
        )
        time.sleep(1.0)
        publisher.delete_topic(request={"topic": n.topic_path})
        before = current_lsn(source_dsn)
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO public.customers (id, name) SELECT g, 'f' || g"
                " FROM generate_series(1, 50) g"
            )
        time.sleep(2.5)  # a few failed attempts
        assert confirmed_lsn(source_dsn, files.slot) <= before
        publisher.create_topic(request={"name": n.topic_path})
        subscriber.create_subscription(request={"name": check, "topic": n.topic_path})
        wait_until(
            lambda: confirmed_lsn(source_dsn, files.slot) > before,
            30,
            "slot past the data once published\n" + capture.log_tail(),
        )
        received = _pull_all(subscriber, check, 50)
        assert sorted(received) == list(range(1, 51))
        assert "capture.publish_failed" in capture.log_path.read_text()

        # (2) the topic goes away for good
        publisher.delete_topic(request={"topic": n.topic_path})
        before = current_lsn(source_dsn)
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO public.customers (id, name) SELECT g, 'g' || g"
                " FROM generate_series(51, 60) g"
            )
        wait_until(lambda: not capture.alive(), 60, "capture gave up\n" + capture.log_tail())
        assert capture.process is not None and capture.process.returncode == 1
        assert confirmed_lsn(source_dsn, files.slot) <= before
        assert "capture.stopped_on_publish_failure" in capture.log_path.read_text()
    finally:
        if capture.alive():
            capture.terminate()
        publisher.stop()
        subscriber.close()


def _slot_exists(dsn: str, slot: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone() == (1,)


def _pull_all(subscriber: Any, subscription: str, rows: int) -> list[int]:
    from services.capture.payload import ArrowBatchCodec

    codec = ArrowBatchCodec()
    keys: list[int] = []
    deadline = time.monotonic() + 30
    while len(keys) < rows and time.monotonic() < deadline:
        pulled = subscriber.pull(
            request={"subscription": subscription, "max_messages": 100}, timeout=10
        )
        for item in pulled.received_messages:
            keys += [int(e.key["id"]) for e in codec.decode(item.message.data)]
        if pulled.received_messages:
            subscriber.acknowledge(
                request={
                    "subscription": subscription,
                    "ack_ids": [m.ack_id for m in pulled.received_messages],
                }
            )
    return keys
