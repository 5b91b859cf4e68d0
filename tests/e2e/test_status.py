"""`cdc status`: reads a running pipeline's stages over HTTP, and says so when it cannot."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psycopg

from tests.support.pipeline import (
    REPO,
    free_port,
    http_status,
    new_pipeline,
    tables_equal,
    wait_until,
    write_configs,
)
from tests.support.workload import TABLES


def _interruptible() -> None:
    """Runs in the child before exec: Ctrl-C (SIGINT) back to its default. A background job of
    a non-interactive shell (`make test &`, a CI step under nohup) starts with SIGINT ignored,
    children inherit that, and Python then installs no KeyboardInterrupt handler: `cdc status`
    would keep running after the SIGINT this test sends, as a user's Ctrl-C never could."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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

        # a sink URL given on the command line wins over the one the ingest lists
        dead_port = free_port()
        done = subprocess.run(
            files.argv(
                "status",
                "--once",
                "--json",
                "--interval",
                "0.2",
                "--sink-url",
                f"replica=http://127.0.0.1:{dead_port}",
            ),
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        [sink] = json.loads(done.stdout)["sinks"]
        assert sink["status"] == "unreachable" and sink["ready"] is False
        assert sink["url"] == f"http://127.0.0.1:{dead_port}"

        # live: one JSON document per scrape until interrupted, then exit 0
        live = subprocess.Popen(
            files.argv("status", "--json", "--interval", "0.3"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            preexec_fn=_interruptible,
        )
        assert live.stdout is not None
        frames = [json.loads(live.stdout.readline()) for _ in range(2)]
        live.send_signal(signal.SIGINT)
        assert live.wait(30) == 0, live.stderr.read() if live.stderr else ""
        assert all(f["sinks"][0]["events"] == 42 for f in frames)
        # the live table view: runs until interrupted, leaves its last frame, exits 0
        live = subprocess.Popen(
            files.argv("status", "--interval", "0.3"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            preexec_fn=_interruptible,
        )
        time.sleep(4.0)  # start-up, two scrapes, the first frame
        live.send_signal(signal.SIGINT)
        out, err = live.communicate(timeout=30)
        assert live.returncode == 0, err
        assert "replica" in out and "public.customers" in out, out

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
