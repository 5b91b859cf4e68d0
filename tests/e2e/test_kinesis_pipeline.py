"""transport_mode kinesis end to end, real processes against moto_server (Kinesis +
DynamoDB) and real PostgreSQL: `cdc capture` (WAL -> Kinesis) -> `cdc ingest` (Kinesis ->
sinks) -> `cdc sink` (PostgreSQL).

- exact, row by row, through kill -9 of the capture and of the ingest mid-stream, and no
  change applied twice (a change-log sink shows every position at most once);
- two ingest replicas share the shards through DynamoDB leases; one is killed, the other
  takes its shards over; exact;
- a throttled or partly failed put leaves the slot's confirmed LSN behind the data that was
  not published (read from pg_replication_slots), and everything arrives once puts succeed;
- `cdc run` supervises capture, ingest and sink; `cdc undeploy` removes the streams.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from adapters.postgres.source.catalog import parse_lsn
from tests.support.aws_fault_proxy import AwsFaultProxy
from tests.support.kinesis import AWS_ENV
from tests.support.pipeline import (
    PipelineFiles,
    Stage,
    assert_tables_equal,
    cdc_run_stage,
    free_port,
    http_status,
    new_pipeline,
    sink_stage,
    stage_logs,
    tables_equal,
    wait_until,
)
from tests.support.workload import TABLES, run_workload

pytestmark = pytest.mark.slow


def kinesis_configs(files: PipelineFiles, endpoint_url: str, shards: int = 2) -> None:
    """Turn a direct pipeline's files into a kinesis one (names unique to the test), with a
    change-log sink next to the replica."""
    tag = uuid.uuid4().hex[:8]
    pipeline = yaml.safe_load(files.pipeline.read_text())
    pipeline["topic_prefix"] = f"e2e{tag}"
    first = pipeline["sinks"][0]
    pipeline["sinks"].append(
        {
            "sink_id": "log",
            "sink_type": "postgres",
            "postgres": {**first["postgres"], "target_schema": "changelog", "write_mode": "append"},
        }
    )
    files.pipeline.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    platform = yaml.safe_load(files.platform.read_text())
    platform["transport_mode"] = "kinesis"
    platform["kinesis"] = {
        "region": "us-east-1",
        "endpoint_url": endpoint_url,
        "shard_count": shards,
        "checkpoint_table_name": f"cp-{tag}",
        "poll_interval_seconds": 0.1,
        "max_records_per_shard": 100,
    }
    platform["wal_reader"] = {"status_interval_seconds": 1.0, "batch_timeout_seconds": 0.2}
    platform["retry"] = {"initial_wait_seconds": 0.2, "max_wait_seconds": 2.0}
    files.platform.write_text(yaml.safe_dump(platform, sort_keys=False))


def replica_files(files: PipelineFiles, directory: Path) -> PipelineFiles:
    """The same pipeline for a second ingest replica: its own health and gRPC ports."""
    directory.mkdir(parents=True, exist_ok=True)
    platform = yaml.safe_load(files.platform.read_text())
    platform["health_port"] = free_port()
    platform["ingest"]["grpc_port"] = free_port()
    (directory / "platform.yaml").write_text(yaml.safe_dump(platform, sort_keys=False))
    (directory / "pipeline.yaml").write_text(files.pipeline.read_text())
    return PipelineFiles(
        directory / "pipeline.yaml",
        directory / "platform.yaml",
        files.pipeline_id,
        files.slot,
        files.publication,
        platform["health_port"],
    )


class KinesisStages:
    """capture + ingest + one sink stage per sink id; restartable one by one."""

    def __init__(self, files: PipelineFiles, log_dir: Path, name: str = "") -> None:
        self.files = files
        self.log_dir = log_dir
        self.name = name
        self.sink_ports = {s: free_port() for s in ("replica", "log")}
        self.sinks = {
            s: sink_stage(files, log_dir, p, s, AWS_ENV) for s, p in self.sink_ports.items()
        }
        for s, stage in self.sinks.items():
            stage.name = f"sink-{s}{name}"
            stage.log_path = log_dir / f"{stage.name}.log"

    def capture(self) -> Stage:
        argv = self.files.argv("capture", "--http-port", str(free_port()))
        return Stage(f"capture{self.name}", argv, self.log_dir, AWS_ENV)

    def ingest(self) -> Stage:
        argv = self.files.argv("ingest")
        for sink_id, port in self.sink_ports.items():
            argv += ["--sink-endpoint", f"{sink_id}=127.0.0.1:{port}"]
        return Stage(f"ingest{self.name}", argv, self.log_dir, AWS_ENV)


def duplicates(replica_dsn: str) -> list[tuple[Any, ...]]:
    """Changes the change-log sink holds more than once (same table and position)."""
    with psycopg.connect(replica_dsn) as conn:
        rows: list[tuple[Any, ...]] = []
        for table in ("orders", "customers"):
            exists = conn.execute("SELECT to_regclass(%s)", (f"changelog.{table}_changes",))
            if exists.fetchone() == (None,):
                continue
            rows += conn.execute(
                f"SELECT '{table}', _position_major, _position_minor, count(*)"
                f" FROM changelog.{table}_changes"
                " GROUP BY _position_major, _position_minor HAVING count(*) > 1 LIMIT 5"
            ).fetchall()
    return rows


def changes_logged(replica_dsn: str) -> int:
    with psycopg.connect(replica_dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM changelog.orders_changes)"
            " + (SELECT count(*) FROM changelog.customers_changes)"
        ).fetchone()
    assert row is not None
    return int(row[0])


def wait_equal(source_dsn: str, replica_dsn: str, timeout: float, *stages: Stage) -> None:
    wait_until(
        lambda: tables_equal(source_dsn, replica_dsn, TABLES),
        timeout,
        "sink = source\n" + stage_logs(*stages, lines=60),
        interval=0.5,
    )
    assert_tables_equal(source_dsn, replica_dsn, TABLES)


class Workload:
    def __init__(self, dsn: str, changes: int) -> None:
        self.done = 0
        self.finished = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(dsn, changes), daemon=True)

    def _run(self, dsn: str, changes: int) -> None:
        try:
            run_workload(dsn, changes, big_transaction=2000, on_progress=self._progress)
        finally:
            self.finished.set()

    def _progress(self, n: int) -> None:
        self.done = n

    def start(self) -> Workload:
        self._thread.start()
        return self


@pytest.fixture
def stages_to_stop() -> Iterator[list[Stage]]:
    started: list[Stage] = []
    yield started
    for stage in started:
        if stage.alive():
            stage.terminate(60)


def started(registry: list[Stage], stage: Stage) -> Stage:
    registry.append(stage.start())
    return stage


def ingest_ready(files: PipelineFiles) -> bool:
    return http_status(files.health_port, "/readyz") == 200


def test_exact_through_kill_9_of_capture_and_of_ingest(
    pg: Any, tmp_path: Path, moto_server: Any, stages_to_stop: list[Stage]
) -> None:
    source_dsn, replica_dsn, files = new_pipeline(pg, tmp_path, seed_rows=500)
    kinesis_configs(files, moto_server.endpoint_url)
    k = KinesisStages(files, tmp_path)
    for sink in k.sinks.values():
        started(stages_to_stop, sink)
    capture = started(stages_to_stop, k.capture())
    ingest = started(stages_to_stop, k.ingest())
    wait_until(lambda: ingest_ready(files), 90, "ingest ready\n" + stage_logs(capture, ingest))
    work = Workload(source_dsn, 6000).start()
    wait_until(lambda: work.done > 1500, 120, "workload progress")
    capture.kill9()
    capture = started(stages_to_stop, k.capture())
    wait_until(lambda: work.done > 3500, 120, "workload progress")
    ingest.kill9()
    ingest = started(stages_to_stop, k.ingest())
    work.finished.wait(300)
    wait_equal(source_dsn, replica_dsn, 180, capture, ingest, *k.sinks.values())
    assert duplicates(replica_dsn) == []
    # the seed rows and the big transaction at least (the workload's count includes updates
    # and deletes that matched no row)
    assert changes_logged(replica_dsn) >= 500 + 2000
    for stage in (capture, ingest, *k.sinks.values()):
        assert stage.terminate(60) == 0, stage_logs(stage)


def test_two_ingest_replicas_share_shards_and_one_takes_over_when_the_other_is_killed(
    pg: Any, tmp_path: Path, moto_server: Any, stages_to_stop: list[Stage]
) -> None:
    source_dsn, replica_dsn, files = new_pipeline(pg, tmp_path / "a", seed_rows=300)
    kinesis_configs(files, moto_server.endpoint_url, shards=2)
    other = replica_files(files, tmp_path / "b")
    a = KinesisStages(files, tmp_path, "-a")
    b = KinesisStages(other, tmp_path, "-b")
    for sink in (*a.sinks.values(), *b.sinks.values()):
        started(stages_to_stop, sink)
    capture = started(stages_to_stop, a.capture())
    ingest_a = started(stages_to_stop, a.ingest())
    wait_until(lambda: ingest_ready(files), 90, "ingest a ready\n" + stage_logs(capture, ingest_a))
    ingest_b = started(stages_to_stop, b.ingest())
    wait_until(lambda: ingest_ready(other), 90, "ingest b ready\n" + stage_logs(ingest_b))

    def owned(port: int) -> list[str]:
        from tests.support.pipeline import http_json

        health = http_json(port, "/readyz")
        return list(health["components"]["kinesis"]["shards_owned"])

    # 2 tables x 2 shards: a took all, then handed over down to its share when b came
    wait_until(
        lambda: len(owned(files.health_port)) == 2 and len(owned(other.health_port)) == 2,
        60,
        "leases balanced\n" + stage_logs(ingest_a, ingest_b),
    )
    assert not set(owned(files.health_port)) & set(owned(other.health_port))
    work = Workload(source_dsn, 4000).start()
    wait_until(lambda: work.done > 1500, 120, "workload progress")
    ingest_a.kill9()
    work.finished.wait(300)
    wait_until(lambda: len(owned(other.health_port)) == 4, 60, "b took a's shards")
    wait_equal(source_dsn, replica_dsn, 180, capture, ingest_b)
    assert duplicates(replica_dsn) == []
    assert "kinesis.lease_taken" in ingest_b.log_path.read_text()


def confirmed_lsn(dsn: str, slot: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    assert row is not None and row[0] is not None
    return parse_lsn(str(row[0]))


def current_lsn(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


@pytest.mark.parametrize("mode", ["throttle", "partial", "fail_all_records"])
def test_a_failing_publisher_leaves_the_slot_behind_what_it_did_not_publish(
    mode: str, pg: Any, tmp_path: Path, moto_server: Any, stages_to_stop: list[Stage]
) -> None:
    source_dsn, replica_dsn, files = new_pipeline(pg, tmp_path, seed_rows=50)
    with AwsFaultProxy(moto_server.endpoint_url) as proxy:
        kinesis_configs(files, proxy.endpoint_url)
        k = KinesisStages(files, tmp_path)
        capture = started(stages_to_stop, k.capture())
        wait_until(
            lambda: proxy.put_calls > 0 and confirmed_lsn(source_dsn, files.slot) > 0,
            90,
            "snapshot published\n" + stage_logs(capture),
        )
        # everything so far in; then puts fail
        before = current_lsn(source_dsn)
        wait_until(
            lambda: confirmed_lsn(source_dsn, files.slot) >= before,
            60,
            "slot confirmed the snapshot\n" + stage_logs(capture),
        )
        proxy.mode = mode
        failed_before = proxy.failed_records
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO public.customers (id, name) SELECT g, 'failing ' || g"
                " FROM generate_series(10001, 10300) g"
            )
        after_insert = current_lsn(source_dsn)
        wait_until(
            lambda: proxy.failed_records > failed_before + 3,
            60,
            "puts failing\n" + stage_logs(capture),
        )
        for _ in range(3):  # several status intervals: the slot must not move past the insert
            time.sleep(1.5)
            assert confirmed_lsn(source_dsn, files.slot) < after_insert, stage_logs(capture)
        assert capture.alive(), stage_logs(capture)
        proxy.mode = "pass"
        wait_until(
            lambda: confirmed_lsn(source_dsn, files.slot) >= after_insert,
            60,
            "slot confirmed after recovery\n" + stage_logs(capture),
        )
        # nothing lost: read it all through the ingest
        for sink in k.sinks.values():
            started(stages_to_stop, sink)
        ingest = started(stages_to_stop, k.ingest())
        wait_equal(source_dsn, replica_dsn, 120, capture, ingest)
        assert duplicates(replica_dsn) == []
        for stage in (capture, ingest):
            assert stage.terminate(60) == 0, stage_logs(stage)


def test_cdc_run_supervises_capture_ingest_and_sinks_and_undeploy_removes_the_streams(
    pg: Any, tmp_path: Path, moto_server: Any, stages_to_stop: list[Stage]
) -> None:
    import boto3

    source_dsn, replica_dsn, files = new_pipeline(pg, tmp_path, seed_rows=200)
    kinesis_configs(files, moto_server.endpoint_url)
    run = started(stages_to_stop, cdc_run_stage(files, tmp_path, env=AWS_ENV))
    wait_until(lambda: ingest_ready(files), 120, "pipeline ready\n" + stage_logs(run))
    run_workload(source_dsn, 1000, big_transaction=300)
    wait_equal(source_dsn, replica_dsn, 120, run)
    assert run.terminate(60) == 0, stage_logs(run)
    kinesis = boto3.client(
        "kinesis",
        endpoint_url=moto_server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    prefix = yaml.safe_load(files.pipeline.read_text())["topic_prefix"]
    ours = [f"{prefix}-public-{t}{dlq}" for t in ("orders", "customers") for dlq in ("", "-dlq")]

    def exists(stream: str) -> bool:
        try:
            kinesis.describe_stream_summary(StreamName=stream)
            return True
        except kinesis.exceptions.ResourceNotFoundException:
            return False

    assert all(exists(s) for s in ours)  # 2 tables + their DLQ streams
    done = subprocess.run(
        files.argv("undeploy", "--yes"),
        capture_output=True,
        text=True,
        env={**os.environ, **AWS_ENV},
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deleted Kinesis stream" in done.stdout
    assert not any(exists(s) for s in ours)
