"""PostgreSQL -> ingest (direct) -> gRPC -> Iceberg sink, through real processes: a SQL
catalog (SQLite) and a warehouse on local files, or on S3 (SeaweedFS) when the stack
fixture is there. Read back with pyiceberg, compared row by row with the source."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psycopg

from tests.support.iceberg import (
    assert_equal,
    duplicate_keys,
    equal,
    iceberg_sink,
    load_table,
    use_sinks,
)
from tests.support.pipeline import (
    REPO,
    cdc_argv,
    free_port,
    ingest_stage,
    new_pipeline,
    running_stages,
    sink_stage,
    stage_logs,
    wait_until,
)
from tests.support.workload import TABLES, run_workload


def test_direct_to_iceberg_upsert_and_append_on_s3_equal_the_source(
    pg, seaweedfs_s3, tmp_path: Path
) -> None:
    source_dsn, _, files = new_pipeline(pg, tmp_path, seed_rows=300, batch_max_events=500)
    bucket = f"lake-{tmp_path.name[-20:].lower().replace('_', '-')}"
    seaweedfs_s3.bucket(bucket)
    lake = iceberg_sink("lake", tmp_path, s3=seaweedfs_s3, bucket=bucket)
    log = iceberg_sink(
        "log", tmp_path, write_mode="append", namespace="log", s3=seaweedfs_s3, bucket=bucket
    )
    use_sinks(files, [lake, log])
    with running_stages(files, tmp_path, sink_ids=("lake", "log")) as (ingest, sinks):
        made = run_workload(source_dsn, changes=4_000, big_transaction=1_500)
        assert made >= 4_000
        wait_until(
            lambda: equal(source_dsn, lake, TABLES) and equal(source_dsn, log, TABLES),
            120,
            "iceberg = source\n" + stage_logs(ingest, *sinks.values()),
        )
    assert_equal(source_dsn, lake, TABLES)
    assert_equal(source_dsn, log, TABLES)
    for table in TABLES:
        assert duplicate_keys(lake, table) == 0
    # The append table holds every change: more rows than live keys.
    orders = load_table(log, "public.orders").scan().to_arrow()
    assert set(orders.column("_cdc_op").to_pylist()) >= {"c", "u", "d"}
    # `cdc lakehouse snapshots --json`: one object per line with the stored positions.
    out = subprocess.run(
        cdc_argv(
            "lakehouse",
            "snapshots",
            str(files.pipeline),
            "--platform-config",
            str(files.platform),
            "--sink-id",
            "lake",
            "--table",
            "public.orders",
            "--json",
        ),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    snaps = [json.loads(line) for line in out]
    assert snaps and all({"snapshot_id", "timestamp_ms", "operation"} <= s.keys() for s in snaps)
    assert snaps[-1]["positions"] and snaps[-1]["current"]
    # The files are on S3, not local.
    listed = seaweedfs_s3.client().list_objects_v2(Bucket=bucket, Prefix="lake/")
    assert any(o["Key"].endswith(".parquet") for o in listed.get("Contents", []))


def test_kill_9_of_the_iceberg_sink_mid_stream_loses_and_duplicates_nothing(
    pg, tmp_path: Path
) -> None:
    source_dsn, _, files = new_pipeline(pg, tmp_path, seed_rows=100, batch_max_events=200)
    lake = iceberg_sink("lake", tmp_path, batch_size=1500, flush_interval_seconds=2.0)
    use_sinks(files, [lake])
    port = free_port()
    sink = sink_stage(files, tmp_path, port, "lake").start()
    ingest = ingest_stage(files, tmp_path, {"lake": port}).start()
    kills: list[int] = []

    def chaos(done: int) -> None:
        if (done > 1_500 and not kills) or (done > 3_500 and len(kills) == 1):
            kills.append(done)
            sink.kill9()  # buffered, accepted batches die with it: they are resent
            time.sleep(0.3)
            sink.start()

    try:
        wait_until(lambda: ingest.alive() and sink.alive(), 30, "stages up")
        run_workload(source_dsn, changes=5_000, big_transaction=1_000, on_progress=chaos)
        assert len(kills) == 2
        wait_until(
            lambda: equal(source_dsn, lake, TABLES),
            120,
            "iceberg = source after kill -9\n" + stage_logs(ingest, sink),
        )
        assert_equal(source_dsn, lake, TABLES)
        for table in TABLES:
            assert duplicate_keys(lake, table) == 0, table
    finally:
        for stage in (ingest, sink):
            if stage.alive():
                stage.terminate()


def test_add_column_reaches_the_table_and_an_unsafe_change_stops_the_sink(
    pg, tmp_path: Path
) -> None:
    source_dsn, _, files = new_pipeline(pg, tmp_path, seed_rows=10)
    lake = iceberg_sink("lake", tmp_path)
    use_sinks(files, [lake])
    port = free_port()
    sink = sink_stage(files, tmp_path, port, "lake").start()
    ingest = ingest_stage(files, tmp_path, {"lake": port}).start()
    try:
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO orders (id, customer_id, amount) VALUES (1, 1, 10.5)")
            wait_until(lambda: equal(source_dsn, lake, ["public.orders"]), 60, "first row")
            conn.execute("ALTER TABLE orders ADD COLUMN color text")
            conn.execute(
                "INSERT INTO orders (id, customer_id, amount, color) VALUES (2, 1, 3, 'red')"
            )
            wait_until(lambda: equal(source_dsn, lake, ["public.orders"]), 60, "added column")
            table = load_table(lake, "public.orders")
            assert table.scan().to_arrow().sort_by("id").column("color").to_pylist() == [
                None,
                "red",
            ]
            conn.execute("ALTER TABLE orders ALTER COLUMN amount TYPE text")
            conn.execute("INSERT INTO orders (id, customer_id, amount) VALUES (3, 1, 'lots')")
        wait_until(lambda: not sink.alive(), 60, "the sink stops\n" + stage_logs(sink))
        assert sink.process is not None and sink.process.returncode == 2, stage_logs(sink)
        text = sink.log_path.read_text()
        assert "column 'amount' changed from decimal(12, 2) to string" in text, stage_logs(sink)
        # Nothing of the refused change was applied.
        assert sorted(
            load_table(lake, "public.orders").scan().to_arrow().column("id").to_pylist()
        ) == [1, 2]
    finally:
        for stage in (ingest, sink):
            if stage.alive():
                stage.terminate()
