"""`cdc status`: reads a running pipeline's stages over HTTP, and says so when it cannot."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import psycopg

from tests.support.pipeline import (
    REPO,
    http_status,
    new_pipeline,
    tables_equal,
    wait_until,
    write_configs,
)
from tests.support.workload import TABLES


def test_status_once_json_reports_a_running_pipeline(pg, tmp_path: Path) -> None:
    source_dsn, replica_dsn, files = new_pipeline(pg, tmp_path, snapshot_mode="never")
    log = (tmp_path / "run.log").open("wb")
    run = subprocess.Popen(files.argv("run"), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 60, "ready")
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            wait_until(
                lambda: (
                    conn.execute(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                        (files.slot,),
                    ).fetchone()
                    == (True,)
                ),
                60,
                "streaming",
            )
            conn.execute(
                "INSERT INTO public.orders (id, amount) SELECT g, g FROM generate_series(1, 40) g"
            )
            conn.execute("INSERT INTO public.customers (id, name) VALUES (1, 'a'), (2, 'b')")
        wait_until(lambda: tables_equal(source_dsn, replica_dsn, TABLES), 60, "replicated")

        def status() -> dict:
            done = subprocess.run(
                files.argv("status", "--once", "--json", "--interval", "0.5"),
                capture_output=True,
                text=True,
                cwd=REPO,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            return dict(json.loads(done.stdout))

        # the sink counts a batch just after its commit, so a moment after the rows show
        wait_until(lambda: status()["sinks"][0].get("events") == 42, 30, "sink counts")
        view = status()
        assert view["pipeline"] == files.pipeline_id
        assert view["ingest"]["status"] == "ok" and view["ingest"]["ready"] is True
        assert view["ingest"]["events_read"] == 42
        assert isinstance(view["ingest"]["slot_lag_bytes"], int)
        assert {t["table"]: t["events_read"] for t in view["tables"]} == {
            "public.orders": 40,
            "public.customers": 2,
        }
        [sink] = view["sinks"]
        assert sink["sink"] == "replica" and sink["status"] == "ok" and sink["ready"] is True
        assert sink["url"].startswith("http://127.0.0.1:")
        assert sink["events"] == 42 and sink["dead_letters"] == 0
        assert sink["unacked_batches"] == 0 and sink["in_flight_batches"] == 0
        assert {t["table"]: t["events"] for t in sink["tables"]} == {
            "public.orders": 40,
            "public.customers": 2,
        }
        assert sink["events_per_second"] == 0.0  # nothing changed between the two scrapes
        lat = sink["latency_seconds"]
        assert lat["window"] == "lifetime" and lat["count"] == 42
        assert 0 < lat["p50"] <= lat["p99"] < 60

        # the table view renders the same data
        done = subprocess.run(
            files.argv("status", "--once", "--interval", "0.2"),
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "replica" in done.stdout and "public.orders" in done.stdout
    finally:
        run.send_signal(signal.SIGTERM)
        code = run.wait(90)
        log.close()
    assert code == 0, (tmp_path / "run.log").read_text()[-4000:]


def test_status_of_a_pipeline_that_is_not_running_exits_1(tmp_path: Path) -> None:
    files = write_configs(
        tmp_path,
        host="127.0.0.1",
        port=5432,
        source_db="src",
        replica_db="dst",
        tables=TABLES,
        pipeline_id="stopped",
    )
    done = subprocess.run(
        files.argv("status", "--once", "--json"),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert "pipeline 'stopped' is not reachable" in done.stderr
    assert f"127.0.0.1:{files.health_port}" in done.stderr
