"""PostgreSQL -> ingest -> gRPC -> sink service -> PostgreSQL, through real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.support.pipeline import (
    REPO,
    CommitAudit,
    assert_tables_equal,
    cdc_argv,
    free_port,
    http_json,
    http_status,
    ingest_stage,
    new_pipeline,
    parse_lsn,
    sink_stage,
    tables_equal,
    wait_until,
    write_configs,
)
from tests.support.workload import TABLES, create_tables, run_workload


def _show_logs(*stages: object) -> str:
    return "\n".join(f"--- {s.name} ---\n{s.log_tail()}" for s in stages)  # type: ignore[attr-defined]


def test_cdc_run_replicates_snapshot_and_10k_changes(pg, tmp_path: Path) -> None:
    source_dsn, replica_dsn, files = new_pipeline(pg, tmp_path, seed_rows=300)
    log = (tmp_path / "run.log").open("wb")
    run = subprocess.Popen(
        cdc_argv("run", str(files.pipeline), "--platform-config", str(files.platform)),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 60, "ready")
        # `ps` tells the stages apart by their single-stage command lines.
        ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
        assert "ingest " + str(files.pipeline) in ps
        assert "sink " + str(files.pipeline) in ps and "--sink-id replica" in ps
        made = run_workload(source_dsn, changes=10_000, big_transaction=5_000)
        assert made >= 10_000
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 120, "sink = source")
        assert_tables_equal(source_dsn, replica_dsn, TABLES)
        metrics = tmp_path / "metrics.txt"
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{files.health_port}/metrics") as r:
            metrics.write_bytes(r.read())
        assert "cdc_ingest_events_read_total" in metrics.read_text()
    finally:
        run.send_signal(signal.SIGTERM)
        code = run.wait(90)
        log.close()
    assert code == 0, (tmp_path / "run.log").read_text()[-4000:]
    # The final position was confirmed on shutdown: nothing left to replay.
    with psycopg.connect(source_dsn) as conn:
        lag = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (files.slot,),
        ).fetchone()
    assert lag is not None and lag[0] < 1_000_000, lag


def test_kill_9_sink_and_ingest_mid_stream_loses_and_duplicates_nothing(pg, tmp_path: Path) -> None:
    source_dsn, replica_dsn, files = new_pipeline(pg, tmp_path, seed_rows=100, batch_max_events=200)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE PUBLICATION {files.publication} FOR TABLE {', '.join(TABLES)}")
    audit = CommitAudit(source_dsn, files.publication, files.slot, files.slot + "_audit")
    audit.create()
    sink_port = free_port()
    sink = sink_stage(files, tmp_path, sink_port).start()
    ingest = ingest_stage(files, tmp_path, {"replica": sink_port}).start()
    stop_sampling = threading.Event()

    def sampler() -> None:
        while not stop_sampling.is_set():
            with contextlib.suppress(psycopg.Error):
                audit.sample(replica_dsn, files.pipeline_id)
            time.sleep(0.05)

    sampling = threading.Thread(target=sampler, daemon=True)
    try:
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 60, "ready")
        with psycopg.connect(source_dsn) as conn:
            initial = conn.execute(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name=%s",
                (files.slot,),
            ).fetchone()
        assert initial is not None
        sampling.start()
        kills: list[str] = []

        def chaos(done: int) -> None:
            if done > 6_000 and "sink" not in kills:
                kills.append("sink")
                sink.kill9()
                time.sleep(0.5)
                sink.start()
            elif done > 8_000 and "ingest" not in kills:
                kills.append("ingest")
                ingest.kill9()
                time.sleep(0.5)
                ingest.start()

        run_workload(source_dsn, changes=10_000, big_transaction=5_000, on_progress=chaos)
        assert kills == ["sink", "ingest"]
        wait_until(
            lambda: tables_equal(source_dsn, replica_dsn, TABLES),
            120,
            "sink = source after kills\n" + _show_logs(sink, ingest),
        )
        assert_tables_equal(source_dsn, replica_dsn, TABLES)
        time.sleep(1.5)  # let the final confirmations land in the samples
    finally:
        stop_sampling.set()
        if sampling.is_alive():
            sampling.join(5)
        for stage in (ingest, sink):
            if stage.alive():
                stage.terminate()
    # No duplicates: primary keys guarantee it in the replica, and row counts match above.
    violations = audit.violations(parse_lsn(initial[0]))
    assert len(audit.samples) > 20
    assert not violations, violations[:3]


def test_unreachable_source_retries_reports_503_and_resumes(
    fresh_pg_server, tmp_path: Path
) -> None:
    server = fresh_pg_server
    server.create_database("src")
    server.create_database("replica")
    source_dsn, replica_dsn = server.dsn("src"), server.dsn("replica")
    create_tables(source_dsn)
    files = write_configs(
        tmp_path,
        host=server.host,
        port=server.port,
        source_db="src",
        replica_db="replica",
        tables=TABLES,
    )
    sink_port = free_port()
    sink = sink_stage(files, tmp_path, sink_port).start()
    ingest = ingest_stage(files, tmp_path, {"replica": sink_port}).start()
    try:
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 60, "ready")
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO public.orders (id, amount) VALUES (1, 1.50)")
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 30, "first row")
        server.stop("immediate")
        wait_until(lambda: http_status(files.health_port, "/readyz") == 503, 30, "503")
        body = http_json(files.health_port, "/readyz")
        assert body["components"]["source"]["status"] == "error", body
        assert http_status(files.health_port, "/healthz") == 200
        time.sleep(2)  # several retries while down
        assert ingest.alive(), ingest.log_tail()
        server.start()
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO public.orders (id, amount) VALUES (2, 2.50)")
        wait_until(
            lambda: tables_equal(source_dsn, replica_dsn, TABLES),
            60,
            "resumed\n" + _show_logs(sink, ingest),
        )
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 30, "ready again")
        assert "source.unreachable" in ingest.log_path.read_text() or "source.disconnected" in (
            ingest.log_path.read_text()
        )
    finally:
        for stage in (ingest, sink):
            if stage.alive():
                assert stage.terminate() == 0, stage.log_tail()


@pytest.mark.parametrize(
    ("pipeline_text", "needle"),
    [
        ("pipeline_id: p\nsource: {database: d, tables: [public.t]}\nsinkz: []\n", "sinkz"),
        ("pipeline_id: p\nsource: {database: d, tables: [public.t], port: abc}\n", "source.port"),
        (
            "pipeline_id: p\nsource:\n  database: ${NOPE_NOT_SET}\n  tables: [public.t]\n",
            "NOPE_NOT_SET",
        ),
        ("pipeline_id: p\nsource: {database: d, tables: [public.t]\n", "line"),
        ("pipeline_id: p\nsource: {tables: [public.t]}\n", "source.database"),
    ],
)
def test_cli_config_errors_exit_2_naming_the_field(
    tmp_path: Path, pipeline_text: str, needle: str
) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(pipeline_text)
    for command in ("validate", "run", "ingest"):
        result = subprocess.run(
            cdc_argv(command, str(path)), capture_output=True, text=True, cwd=REPO, timeout=60
        )
        assert result.returncode == 2, (command, result.stderr)
        assert needle in result.stderr and "pipeline.yaml" in result.stderr, result.stderr


def test_cli_validate_accepts_the_examples() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "validate",
            "examples/pipeline.yaml",
            "--platform-config",
            "examples/platform.yaml",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "ok: pipeline" in result.stdout


def test_cdc_run_restarts_a_child_that_dies_and_the_others_carry_on(pg, tmp_path: Path) -> None:
    source_dsn, replica_dsn, files = new_pipeline(pg, tmp_path, snapshot_mode="never")
    log = (tmp_path / "run.log").open("wb")
    run = subprocess.Popen(
        cdc_argv("run", str(files.pipeline), "--platform-config", str(files.platform)),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )

    def child_pids(marker: str) -> list[int]:
        ps = subprocess.run(
            ["ps", "-eww", "-o", "pid=,ppid=,args="], capture_output=True, text=True
        ).stdout
        return [
            int(line.split()[0])
            for line in ps.splitlines()
            if int(line.split()[1]) == run.pid and marker in line
        ]

    try:
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 60, "ready")
        [sink_pid] = child_pids("--sink-id replica")
        [ingest_pid] = child_pids(" ingest ")
        os.kill(sink_pid, signal.SIGKILL)
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO public.orders (id, amount) VALUES (7, 7.00)")
        wait_until(
            lambda: (
                len(child_pids("--sink-id replica")) == 1
                and child_pids("--sink-id replica")[0] != sink_pid
            ),
            30,
            "sink restarted",
        )
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "replicated")
        assert child_pids(" ingest ") == [ingest_pid], "the ingest stage kept running"
    finally:
        run.send_signal(signal.SIGTERM)
        code = run.wait(90)
        log.close()
    assert code == 0
    assert "child.died" in (tmp_path / "run.log").read_text()
