"""Every stage serves its own /metrics: real ingest and sink processes, real PostgreSQL, and
counts that must match the changes made at the source."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import psycopg
import yaml

from services.status import Scrape, latency, parse_metrics
from tests.support.pipeline import (
    PipelineFiles,
    Stage,
    free_port,
    http_json,
    http_status,
    new_pipeline,
    stage_logs,
    wait_until,
)


def _metrics(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return Scrape(url="", at=0.0, samples=parse_metrics(resp.read().decode()))


def _stages(files: PipelineFiles, tmp_path: Path) -> tuple[Stage, Stage, int]:
    grpc_port, http_port = free_port(), free_port()
    sink = Stage(
        "sink-replica",
        files.argv(
            "sink", "--sink-id", "replica", "--port", str(grpc_port), "--http-port", str(http_port)
        ),
        tmp_path,
    )
    ingest = Stage(
        "ingest",
        files.argv(
            "ingest",
            "--sink-endpoint",
            f"replica=127.0.0.1:{grpc_port}",
            "--sink-http-endpoint",
            f"replica=127.0.0.1:{http_port}",
        ),
        tmp_path,
    )
    return sink, ingest, http_port


def test_ingest_and_sink_metrics_count_every_change(pg, tmp_path: Path) -> None:
    source_dsn, replica_dsn, files = new_pipeline(pg, tmp_path, snapshot_mode="never")
    # The operator's own target table: a note longer than 3 characters is rejected there
    # and goes to the dead letters.
    with psycopg.connect(replica_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.orders (id integer PRIMARY KEY, customer_id bigint,"
            " amount numeric(12, 2), note varchar(3), placed_at timestamptz, paid boolean)"
        )
    sink, ingest, sink_http = _stages(files, tmp_path)
    sink.start()
    ingest.start()
    try:
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 60, "ingest ready")
        assert http_status(sink_http, "/healthz") == 200
        assert http_status(sink_http, "/readyz") == 200
        ready = http_json(sink_http, "/readyz")
        assert ready["sink_id"] == "replica" and ready["status"] == "ok", ready
        listed = http_json(files.health_port, "/readyz")["sink_http_endpoints"]
        assert listed == {"replica": f"127.0.0.1:{sink_http}"}
        wait_until(lambda: "replication.started" in ingest.log_path.read_text(), 60, "streaming")

        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO public.orders (id, amount, note)"
                " SELECT g, g, 'ok' FROM generate_series(1, 120) g"
            )
            conn.execute("UPDATE public.orders SET amount = amount + 1 WHERE id <= 30")
            conn.execute("DELETE FROM public.orders WHERE id > 110")
            conn.execute("INSERT INTO public.orders (id, amount, note) VALUES (500, 1, 'long')")
            for i in range(1, 8):  # seven small transactions
                conn.execute(
                    "INSERT INTO public.customers (id, name) VALUES (%s, %s)", (i, f"c{i}")
                )
        orders, customers = 120 + 30 + 10 + 1, 7

        def sink_done() -> bool:
            return _metrics(sink_http).total("cdc_sink_events_total") >= orders + customers

        wait_until(sink_done, 60, "the sink's counters reach every change")
        wait_until(
            lambda: (
                _metrics(files.health_port).total("cdc_ingest_events_acked_total")
                >= orders + customers
            ),
            30,
            "every change acked",
        )
        inn, out = _metrics(files.health_port), _metrics(sink_http)

        # ingest: per table read and sent, acked by outcome
        assert inn.by("cdc_ingest_events_read_total", "table") == {
            "public.orders": orders,
            "public.customers": customers,
        }
        assert inn.by("cdc_ingest_events_sent_total", "table", sink="replica") == {
            "public.orders": orders,
            "public.customers": customers,
        }
        acked = inn.by("cdc_ingest_events_acked_total", "outcome", sink="replica")
        assert acked == {"written": orders + customers - 1, "skipped": 0, "dead_lettered": 1}
        assert inn.total("cdc_ingest_batches_sent_total", sink="replica") >= 1
        assert inn.total("cdc_ingest_batch_events_count") == inn.total(
            "cdc_ingest_batches_sent_total"
        )
        assert inn.total("cdc_ingest_batch_events_sum") == orders + customers
        assert inn.total("cdc_ingest_unacked_batches", sink="replica") == 0
        assert inn.total("cdc_ingest_ack_latency_seconds_count") == inn.total(
            "cdc_ingest_batches_sent_total"
        )
        assert inn.total("cdc_ingest_commits_total") >= 1
        assert inn.total("cdc_ingest_ready") == 1
        assert inn.by("cdc_ingest_schema_version", "table") == {
            "public.orders": 1,
            "public.customers": 1,
        }
        # the slot monitor's reading (polled at start) as gauges
        assert inn.total("cdc_source_slot_active") == 1
        assert inn.values("cdc_source_slot_lag_bytes") and inn.values(
            "cdc_source_slot_retained_wal_bytes"
        )
        # only the ingest's own metrics: nothing of the sink stage
        assert not [n for n in inn.samples if n.startswith("cdc_sink_")]

        # sink: per table, dead letters, and one latency observation per change
        assert out.by("cdc_sink_events_total", "table") == {
            "public.orders": orders,
            "public.customers": customers,
        }
        assert out.total("cdc_sink_dead_letters_total") == 1
        assert out.total("cdc_sink_events_skipped_total") == 0
        assert out.total("cdc_sink_batches_total", result="rejected") == 0
        assert out.total("cdc_sink_batches_total", result="written") == inn.total(
            "cdc_ingest_batches_sent_total"
        )
        assert out.total("cdc_sink_in_flight_batches") == 0
        assert out.total("cdc_sink_ready") == 1
        count = out.total("cdc_sink_end_to_end_latency_seconds_count")
        assert count == orders + customers
        total_seconds = out.total("cdc_sink_end_to_end_latency_seconds_sum")
        assert 0 < total_seconds < count * 60
        buckets = out.values("cdc_sink_end_to_end_latency_seconds_bucket")
        assert len(buckets) == 21  # 20 bounds, 1 ms .. 60 s, and +Inf
        p99 = latency(None, out, "cdc_sink_end_to_end_latency_seconds")["p99"]
        assert p99 is not None and 0 < p99 < 60
        assert not [n for n in out.samples if n.startswith(("cdc_ingest_", "cdc_source_"))]
        with psycopg.connect(replica_dsn) as conn:
            dead = conn.execute("SELECT count(*) FROM public._cdc_dead_letters").fetchone()
        assert dead == (1,)
    except BaseException:
        print(stage_logs(ingest, sink))
        raise
    finally:
        codes = [s.terminate() for s in (ingest, sink) if s.alive()]
    assert codes == [0, 0], stage_logs(ingest, sink)


def test_a_sink_database_outage_shows_as_retries_and_not_ready(
    pg, fresh_pg_server, tmp_path: Path
) -> None:
    """The replica on a server of its own, stopped mid-stream: the sink's /readyz turns 503,
    its retries counter grows, and once it is back every change is counted exactly once."""
    source_dsn, _, files = new_pipeline(pg, tmp_path, snapshot_mode="never")
    fresh_pg_server.create_database("replica")
    replica_dsn = fresh_pg_server.dsn("replica")
    spec = yaml.safe_load(files.pipeline.read_text())
    spec["sinks"][0]["postgres"].update(
        host=fresh_pg_server.host,
        port=fresh_pg_server.port,
        database="replica",
        connect_timeout_seconds=2,
    )
    files.pipeline.write_text(yaml.safe_dump(spec, sort_keys=False))
    sink, ingest, sink_http = _stages(files, tmp_path)
    sink.start()
    ingest.start()
    try:
        wait_until(lambda: http_status(files.health_port, "/readyz") == 200, 60, "ingest ready")
        wait_until(lambda: "replication.started" in ingest.log_path.read_text(), 60, "streaming")
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO public.orders (id, amount) VALUES (1, 1)")
        wait_until(
            lambda: _metrics(sink_http).total("cdc_sink_events_total") == 1, 30, "first change"
        )
        assert _metrics(sink_http).total("cdc_sink_write_retries_total") == 0

        fresh_pg_server.stop()
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO public.orders (id, amount) SELECT g, g FROM generate_series(2, 50) g"
            )
        wait_until(
            lambda: _metrics(sink_http).total("cdc_sink_write_retries_total") >= 2,
            60,
            "the sink retrying",
        )
        wait_until(lambda: http_status(sink_http, "/readyz") == 503, 30, "sink not ready")
        assert _metrics(sink_http).total("cdc_sink_ready") == 0
        assert _metrics(files.health_port).total("cdc_ingest_unacked_batches") >= 1

        fresh_pg_server.start()
        wait_until(
            lambda: _metrics(sink_http).total("cdc_sink_events_total") == 50, 90, "caught up"
        )
        wait_until(lambda: http_status(sink_http, "/readyz") == 200, 30, "sink ready again")
        out = _metrics(sink_http)
        assert out.total("cdc_sink_ready") == 1
        assert out.total("cdc_sink_end_to_end_latency_seconds_count") == 50
        # the changes that waited out the outage are the slow tail
        assert latency(None, out, "cdc_sink_end_to_end_latency_seconds")["p99"] >= 1.0
        with psycopg.connect(replica_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM public.orders").fetchone() == (50,)
    except BaseException:
        print(stage_logs(ingest, sink))
        raise
    finally:
        if not fresh_pg_server.is_running():
            fresh_pg_server.start()
        codes = [s.terminate() for s in (ingest, sink) if s.alive()]
    assert codes == [0, 0], stage_logs(ingest, sink)
